"""`aa_compile.export.onnx` on the repository's model families: HF Llama and GPT-2 from configs,
the T-FREE LM (trigram bag embedding) and the HAT model (window attention, word pooling, guide
add). Each exports with its aa:: ops translated and onnxruntime matches eager (float32, within
1e-4 of the largest output magnitude; `onnx` checks that itself on the example inputs, and the
tests run the file again on inputs of other sizes where dimensions are dynamic)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")

from aa_compile.export import ExportError, onnx  # noqa: E402
from aa_compile.export.wrappers import CausalLMLogits, HATBytes, TFreeWords  # noqa: E402
from aa_compile.models.hat import HATConfig, HATModel  # noqa: E402
from aa_compile.models.tfree import TFreeLM, TrigramTokenizer  # noqa: E402
from aa_compile.models.tfree.lm import TFreeLMConfig  # noqa: E402

RTOL = 1e-4


def _run(path, *inputs) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


def _assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= RTOL * want.abs().max().item()


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg), {"aa::rms_norm": 5}


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg), {}  # LayerNorm: no aa:: op, exported as is


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_hugging_face_models(build, tmp_path):
    torch.manual_seed(0)
    hf, ops = build()
    model = CausalLMLogits(hf.eval())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    report = onnx(model, (ids,), tmp_path / "hf.onnx", dynamic_shapes=({1: "seq"},))
    assert {name: calls for name, (calls, _) in report.ops.items()} == ops
    other = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(other)
    _assert_matches(_run(tmp_path / "hf.onnx", other), want)


def test_tfree_lm_dynamic_batch_sequence_and_trigrams(tmp_path):
    torch.manual_seed(0)
    tok = TrigramTokenizer(vocab_size=256, m=4)
    lm = TFreeLM(TFreeLMConfig(vocab_size=256, m=4, d_model=32, n_layers=1, n_heads=2,
                               max_seq_len=32)).eval()
    first = TFreeWords.example(tok, [["hello", "world", "foo"], ["one", "two", "three"]])
    model = TFreeWords(lm)
    report = onnx(model, first, tmp_path / "tfree.onnx", dynamic_shapes=model.dynamic_shapes())
    assert {name: calls for name, (calls, _) in report.ops.items()} == {
        "aa::tfree_words_to_csr": 1, "aa::trigram_bag": 1, "aa::rms_norm": 3}
    assert report.dynamic[2] == {0: "batch", 1: "seq"}
    # other words, other trigram counts, other batch x seq grids (batch 1 included)
    for words in ([["longer", "words", "here"], ["and", "a", "b"]], [["a", "bb", "ccc", "dd"]],
                  [["x", "y"], ["zz", "w"], ["q", "longerword"]]):
        other = TFreeWords.example(tok, words)
        with torch.no_grad():
            want = model(*other)
        assert want.shape[:2] == (len(words), len(words[0]))
        _assert_matches(_run(tmp_path / "tfree.onnx", *other), want)


def test_tfree_sequence_beyond_its_rope_table_needs_a_bound(tmp_path):
    """An unbounded sequence dimension: the model caps it at max_seq_len, so the export says
    which dimension and how to bound it."""
    from torch.export import Dim

    torch.manual_seed(0)
    tok = TrigramTokenizer(vocab_size=256, m=4)
    lm = TFreeLM(TFreeLMConfig(vocab_size=256, m=4, d_model=32, n_layers=1, n_heads=2,
                               max_seq_len=32)).eval()
    first = TFreeWords.example(tok, [["hello", "world", "foo"], ["one", "two", "three"]])
    with pytest.raises(ExportError, match=r"shape\[1\] \(seq\).*Dim\(.seq., min=2, max=32\)"):
        onnx(TFreeWords(lm), first, tmp_path / "t.onnx",
             dynamic_shapes=({0: "trigrams"}, {0: "trigrams"}, {0: "batch", 1: Dim("seq")}))


def _hat():
    torch.manual_seed(0)
    hat = HATModel(HATConfig.tiny(sliding_window=7)).eval()
    with torch.no_grad():
        for name, p in hat.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return hat


def test_hat_model_every_byte_batch_size_dynamic(tmp_path):
    hat = _hat()
    example = HATBytes.example(hat, ["Hello world, this is a test.", "Zweites Dokument!"])
    report = onnx(HATBytes(hat), example, tmp_path / "hat.onnx",
                  dynamic_shapes=HATBytes.dynamic_shapes())
    calls = {name: n for name, (n, _) in report.ops.items()}
    cfg = hat.config
    assert calls["aa::window_attention"] == cfg.encoder.n_layers + cfg.decoder.n_layers
    assert calls["aa::word_pool"] == 1
    assert calls["aa::guide_add_rms_norm"] == 1
    assert report.max_rel_error[0] <= RTOL
    assert report.dynamic[1] == {0: "words + 1"} and report.dynamic[8] == {
        0: "words", 1: "longest_word"}
    # one document of one word; three documents; one long word: every size differs
    for texts in (["One"], ["a b c", "Another, longer document with words", "x"],
                  ["Supercalifragilistic expialidocious"]):
        other = HATBytes.example(hat, texts)
        with torch.no_grad():
            want = HATBytes(hat)(*other)
        _assert_matches(_run(tmp_path / "hat.onnx", *other), want)


def test_hat_model_static(tmp_path):
    hat = _hat()
    example = HATBytes.example(hat, ["Hello world, this is a test.", "Zweites Dokument!"])
    report = onnx(HATBytes(hat), example, tmp_path / "hat.onnx")
    assert report.dynamic == {} and report.max_rel_error[0] <= RTOL
