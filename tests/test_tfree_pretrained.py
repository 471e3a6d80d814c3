"""Released T-FREE checkpoints (the public trigrams repository's folder) <-> `TFreeLM`.

The fixture writes a tiny checkpoint by hand in the layout the public trainer saves and its
``InferencePipe`` reads: ``transformer/transformer.pt`` (``torch.save`` of the
``TransformerLMHeadModel`` state dict: ``transformer.embeddings.embedding.weight``,
``transformer.layers.i.{input_layernorm, attention.{query,key,value,dense},
post_attention_layernorm, mlp.{dense_in,swiglu,dense_out}}.weight``, ``transformer.norm.weight``,
``lm_head.weight``), ``transformer/transformer_config.yaml`` (the architecture config as JSON),
``tokenizer/tokenizer.pt`` (the nine entries of ``TrigramTokenizer.save``) and
``tokenizer/tokenizer_config.yaml``, without using the module under test. The forward is checked
against an independent float64 restatement of the public one written here from the same names:
the md5 slot rule with lowercase sharing, the embedding sum, complex (interleaved-pair) RoPE,
the -10000 masked softmax attention, the ``silu(dense_in) * swiglu`` MLP, RMSNorm and the head;
the first generated word against the public "sigmoid version" dictionary score.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aa_compile.models import checkpoint
from aa_compile.models.tfree import TFreeLM, TFreeLMConfig, TrigramTokenizer
from aa_compile.models.tfree.pretrained import check_trigram_table, probe_trigram_ids

VOCAB, M, K_LOWER, HIDDEN, HEADS, LAYERS, SEQ = 61, 3, 1, 16, 2, 2, 32
MLP_FACTOR = 2.6875  # int(16 * 2.6875) = 43
WORDS = ["Hello", "World", "again", "hello", "world", "<|endoftext|>", "Again"]
PROMPT = "Hello World again"
PROMPT_WORDS = ["Hello", "World", "again"]
LAYER_NAMES = ["input_layernorm.weight", "attention.query.weight", "attention.key.weight",
               "attention.value.weight", "attention.dense.weight",
               "post_attention_layernorm.weight", "mlp.dense_in.weight", "mlp.swiglu.weight",
               "mlp.dense_out.weight"]


def architecture(**edit) -> dict:
    """transformer_config.yaml as the public TransformerArchitectureConfig.save writes it."""
    raw = {"use_flash": True, "embedding_normalization": False, "embedding_aggregation": "sum",
           "norm": "rms", "mlp_type": "swiglu", "init": "pythia", "bias_terms": False,
           "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_layers": LAYERS,
           "num_attention_heads": HEADS, "rotary_embedding_base": 10000,
           "sequence_length": SEQ, "mlp_factor": MLP_FACTOR, "precision": "float32",
           "layernorm_epsilon": 1e-5, "init_std_global_gain": 1.0}
    raw.update(edit)
    return raw


def tokenizer_config(**edit) -> dict:
    raw = {"lowercase": False, "vocab_size": VOCAB, "sequence_length": SEQ,
           "vocab_population": M, "vocab_population_partial_lowercase": K_LOWER,
           "do_classic_tokenization": False, "prefix_path_tokenizer_file": "", "seed": 42,
           "initialize": "hash", "entire_words": False, "end_of_text": "<|endoftext|>",
           "word_edge_weight": 1, "cache_dir": None}
    raw.update(edit)
    return raw


def released_state(dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ff = int(HIDDEN * MLP_FACTOR)

    def rand(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    state = {"transformer.embeddings.embedding.weight": rand(VOCAB, HIDDEN)}
    shapes = {"input_layernorm.weight": (HIDDEN,), "attention.query.weight": (HIDDEN, HIDDEN),
              "attention.key.weight": (HIDDEN, HIDDEN), "attention.value.weight": (HIDDEN, HIDDEN),
              "attention.dense.weight": (HIDDEN, HIDDEN),
              "post_attention_layernorm.weight": (HIDDEN,), "mlp.dense_in.weight": (ff, HIDDEN),
              "mlp.swiglu.weight": (ff, HIDDEN), "mlp.dense_out.weight": (HIDDEN, ff)}
    for i in range(LAYERS):
        for name in LAYER_NAMES:
            t = rand(*shapes[name])
            state[f"transformer.layers.{i}.{name}"] = (1 + t) if "norm" in name else t
    state["transformer.norm.weight"] = 1 + rand(HIDDEN)
    state["lm_head.weight"] = rand(VOCAB, HIDDEN, scale=1.0)
    return state


def tokenizer_state(words=WORDS, table=None) -> dict:
    """tokenizer.pt's nine entries (public TrigramTokenizer.save); the dictionary tensors are
    left None, as a tokenizer saved before generate_tokenizer.py ran holds them."""
    return {"trigram_to_vocab": table, "words_to_weights_word_indices": None,
            "words_to_weights_token_indices": None, "words_to_weights_word_indices_edges": None,
            "words_to_weights_token_indices_edges": None, "word_trigram_counts": None,
            "word_counts": None, "words": list(words), "word_counter_full": {}}


def write_released(root: Path, state=None, arch=None, tok=None, tok_state=None,
                   training: dict | None = None) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "tokenizer").mkdir(parents=True)
    torch.save(state if state is not None else released_state(), root / "transformer" /
               "transformer.pt")
    (root / "transformer" / "transformer_config.yaml").write_text(
        json.dumps(arch or architecture(), indent=4))
    torch.save(tok_state if tok_state is not None else tokenizer_state(),
               root / "tokenizer" / "tokenizer.pt")
    (root / "tokenizer" / "tokenizer_config.yaml").write_text(
        json.dumps(tok or tokenizer_config(), indent=4))
    if training is not None:
        (root / "context").mkdir()
        (root / "context" / "config.yml").write_text(json.dumps(training))
    return root


@pytest.fixture
def released(tmp_path):
    return write_released(tmp_path / "ckpt")


# -- an independent restatement of the public code ------------------------------------------


def md5(text: str) -> int:
    return int(hashlib.md5(text.encode()).hexdigest(), 16)


def base_slots(tid: int) -> list[int]:
    chosen: set[int] = set()
    for k in range(M):
        j = 0
        while True:
            slot = md5(f"{tid}_{k}_{j}") % VOCAB
            j += 1
            if slot not in chosen:
                chosen.add(slot)
                break
    return sorted(chosen)


def trigram_slots(tri: bytes) -> list[int]:
    """The public table row of a trigram: sorted md5 slots; a case variant of an
    ``[a-z ]^3`` pattern takes the last K_LOWER slots of its lowercase pattern."""
    tid = tri[0] + 256 * tri[1] + 65536 * tri[2]
    row = base_slots(tid)
    text = tri.decode("latin-1")
    lower = text.lower()
    if lower != text and all(c in "abcdefghijklmnopqrstuvwxyz " for c in lower):
        low = lower.encode()
        row[M - K_LOWER:] = base_slots(low[0] + 256 * low[1] + 65536 * low[2])[M - K_LOWER:]
    return row


def word_trigrams(word: str) -> list[bytes]:
    b = f" {word} ".encode()
    return sorted({b[i:i + 3] for i in range(len(b) - 2)})


def word_rows(word: str) -> list[list[int]]:
    if "<|" in word:
        return [[md5(f"{word}_{i}") % VOCAB for i in range(M - K_LOWER)]
                + [md5(f"{word.lower()}_lower_{i}") % VOCAB for i in range(K_LOWER)]]
    return [trigram_slots(t) for t in word_trigrams(word)]


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def complex_rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x ``[S, H, D]``: pairs (2i, 2i+1) as complex numbers turned by position * theta^(-2i/D)."""
    s, _, d = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float64), freqs)
    turn = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    xc = torch.view_as_complex(x.reshape(s, x.shape[1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * turn).reshape(x.shape)


def public_logits(state: dict, words: list[str], aggregation: str = "sum") -> torch.Tensor:
    """``[S, v]`` float64 logits of the public forward for one sequence of words."""
    st = {k: v.double() for k, v in state.items()}
    emb = st["transformer.embeddings.embedding.weight"]
    rows = []
    for w in words:
        per_trigram = [emb[r].sum(0) if aggregation == "sum" else emb[r].mean(0)
                       for r in word_rows(w)]
        rows.append(torch.stack(per_trigram).sum(0))
    x = torch.stack(rows)
    s, hd = x.shape[0], HIDDEN // HEADS
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        h = rms(x, st[p + "input_layernorm.weight"])
        q = complex_rope((h @ st[p + "attention.query.weight"].T).view(s, HEADS, hd))
        k = complex_rope((h @ st[p + "attention.key.weight"].T).view(s, HEADS, hd))
        v = (h @ st[p + "attention.value.weight"].T).view(s, HEADS, hd)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(mask, -10000.0).softmax(-1)
        att = torch.einsum("hqk,khd->qhd", probs, v).reshape(s, HIDDEN)
        x = x + att @ st[p + "attention.dense.weight"].T
        h = rms(x, st[p + "post_attention_layernorm.weight"])
        mlp = F.silu(h @ st[p + "mlp.dense_in.weight"].T) * (h @ st[p + "mlp.swiglu.weight"].T)
        x = x + mlp @ st[p + "mlp.dense_out.weight"].T
    return rms(x, st["transformer.norm.weight"]) @ st["lm_head.weight"].T


def public_greedy(logits_row: torch.Tensor, words: list[str]) -> str:
    """The public decode_trigram ("sigmoid version") on one row, greedy."""
    p = torch.sigmoid(logits_row)
    best, best_score = None, -math.inf
    for w in words:
        inner, edge, n = set(), set(), 0
        if "<|" in w:
            inner, n = set(word_rows(w)[0]), 1
        else:
            for t in word_trigrams(w):
                (edge if t.startswith(b" ") or t.endswith(b" ") else inner).update(
                    trigram_slots(t))
                n += 1
        raw = sum(p[i] for i in inner) + sum(p[i] for i in edge)
        score = raw / (M * n) + (raw - p.sum()) / (VOCAB - n * M)
        if score > best_score:
            best, best_score = w, float(score)
    return best


def run_model(model: TFreeLM, words: list[str]) -> torch.Tensor:
    from aa_compile.models.tfree.lm import TFreeInputs

    inp = TFreeInputs.from_words(model.tokenizer, [words], targets=False)
    return model(inp.trigram_slots, inp.word_of_trigram, 1, inp.seq)[0]


# -- mapping and config ---------------------------------------------------------------------


def test_every_released_tensor_lands_in_the_named_parameter(released):
    state = released_state()
    model = TFreeLM.from_pretrained(released)
    own = model.state_dict()
    hd = HIDDEN // HEADS
    # within a head our rows are the released even rows, then the odd ones (by hand: hd = 8)
    order = [h * hd + j for h in range(HEADS) for j in (0, 2, 4, 6, 1, 3, 5, 7)]
    expect = {"embed.weight": state["transformer.embeddings.embedding.weight"],
              "norm.weight": state["transformer.norm.weight"],
              "head.proj.weight": state["lm_head.weight"]}
    ours = {"input_layernorm": "attn_norm", "attention.value": "attn.v_proj",
            "attention.dense": "attn.o_proj", "post_attention_layernorm": "mlp_norm",
            "mlp.dense_in": "mlp.gate_proj", "mlp.swiglu": "mlp.up_proj",
            "mlp.dense_out": "mlp.down_proj"}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        for theirs, mine in ours.items():
            expect[f"layers.{i}.{mine}.weight"] = state[f"{p}{theirs}.weight"]
        expect[f"layers.{i}.attn.q_proj.weight"] = state[p + "attention.query.weight"][order]
        expect[f"layers.{i}.attn.k_proj.weight"] = state[p + "attention.key.weight"][order]
    assert set(expect) == set(own)
    for name, tensor in expect.items():
        assert torch.equal(own[name], tensor), name


def test_config_fields_are_read(tmp_path):
    root = write_released(
        tmp_path / "c", arch=architecture(layernorm_epsilon=1e-6, rotary_embedding_base=500),
        tok=tokenizer_config(lowercase=True, entire_words=True),
        training={"training": {"loss_pos_weight": 7.0, "loss_scale": 3.0}})
    model = TFreeLM.from_pretrained(root)
    cfg, tok = model.config, model.tokenizer
    assert (cfg.vocab_size, cfg.m, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_seq_len) == (
        VOCAB, M, HIDDEN, LAYERS, HEADS, SEQ)
    assert cfg.d_ff == 43 and model.layers[0].mlp.gate_proj.out_features == 43
    assert (cfg.norm_eps, cfg.rope_theta, cfg.aggregation) == (1e-6, 500.0, "sum")
    assert (cfg.pos_weight, cfg.loss_scale) == (7.0, 3.0)
    assert (tok.hash_mode, tok.k_lower, tok.lowercase, tok.entire_words) == (
        "reference", K_LOWER, True, True)
    assert model.released.words == WORDS


def test_loss_settings_default_to_the_released_7b(released):
    cfg = TFreeLM.from_pretrained(released).config
    assert (cfg.pos_weight, cfg.loss_scale) == (300.0, 100.0)


def test_old_saved_configs_keep_their_mlp_width():
    """A config saved before d_ff / norm_eps / rope_theta existed builds the same model."""
    cfg = checkpoint.config_from_dict("tfree", {"vocab_size": 64, "m": 2, "d_model": 48,
                                                "n_layers": 1, "n_heads": 2})
    assert (cfg.d_ff, cfg.norm_eps, cfg.rope_theta) == (None, 1e-6, 10000.0)
    assert TFreeLM(cfg).layers[0].mlp.gate_proj.out_features == 256  # 8/3 * 48 -> 256


# -- faithfulness ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_forward_matches_the_public_forward(tmp_path, aggregation):
    root = write_released(tmp_path / aggregation,
                          arch=architecture(embedding_aggregation=aggregation))
    model = TFreeLM.from_pretrained(root)
    assert model.tokenizer.words(PROMPT) == PROMPT_WORDS
    got = run_model(model, PROMPT_WORDS + ["<|endoftext|>"]).double()
    want = public_logits(released_state(), PROMPT_WORDS + ["<|endoftext|>"], aggregation)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the permutation matters: the released rows as they are give other logits
    wrong = TFreeLM(model.config)
    state = released_state()
    wrong.load_state_dict({
        "embed.weight": state["transformer.embeddings.embedding.weight"],
        "norm.weight": state["transformer.norm.weight"],
        "head.proj.weight": state["lm_head.weight"],
        **{f"layers.{i}.{mine}": state[f"transformer.layers.{i}.{theirs}"]
           for i in range(LAYERS) for theirs, mine in zip(LAYER_NAMES, [
               "attn_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight",
               "attn.v_proj.weight", "attn.o_proj.weight", "mlp_norm.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"])}})
    wrong.tokenizer = model.tokenizer
    far = (run_model(wrong, PROMPT_WORDS + ["<|endoftext|>"]).double() - want).abs().max()
    assert far > 1e-2


def test_first_generated_word_is_the_public_decode(released):
    model = TFreeLM.from_pretrained(released)
    logits = public_logits(released_state(), PROMPT_WORDS)
    words = model.generate(model.tokenizer, PROMPT, 3, words=model.released.words)
    assert words[0] == public_greedy(logits[-1], WORDS)


def test_dtypes_as_stored_or_converted(tmp_path):
    root = write_released(tmp_path / "bf", state=released_state(torch.bfloat16),
                          arch=architecture(precision="bfloat16"))
    assert TFreeLM.from_pretrained(root).embed.weight.dtype == torch.bfloat16
    model = TFreeLM.from_pretrained(root, dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.head.proj.weight,
                       released_state(torch.bfloat16)["lm_head.weight"].float())
    words = model.generate(model.tokenizer, PROMPT, 2, words=model.released.words)
    assert len(words) >= 1


def test_builds_on_meta_and_loads_weights_only(released, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    built_on = []
    real_init = TFreeLM.__init__

    def init(self, cfg):
        built_on.append(torch.empty(0).device.type)
        real_init(self, cfg)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(TFreeLM, "__init__", init)
    model = TFreeLM.from_pretrained(released)
    assert calls and all(c is True for c in calls)
    assert built_on == ["meta"]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


# -- round trips ----------------------------------------------------------------------------


def _same_files(a: Path, b: Path) -> None:
    for sub in ("transformer/transformer.pt", "tokenizer/tokenizer.pt"):
        x = torch.load(a / sub, weights_only=True)
        y = torch.load(b / sub, weights_only=True)
        assert list(x) == list(y), sub
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
                assert x[key].view(torch.uint8).equal(y[key].view(torch.uint8)), key
            else:
                assert x[key] == y[key], key
    for sub in ("transformer/transformer_config.yaml", "tokenizer/tokenizer_config.yaml"):
        assert json.loads((a / sub).read_text()) == json.loads((b / sub).read_text()), sub


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_save_is_bit_exact(tmp_path, dtype):
    src = write_released(tmp_path / "src", state=released_state(dtype),
                         arch=architecture(precision=str(dtype).removeprefix("torch.")),
                         training={"training": {"loss_pos_weight": 300.0}})
    model = TFreeLM.from_pretrained(src)
    files = model.save_pretrained(tmp_path / "out")
    assert {f.relative_to(tmp_path / "out").as_posix() for f in files} == {
        "transformer/transformer.pt", "transformer/transformer_config.yaml",
        "tokenizer/tokenizer.pt", "tokenizer/tokenizer_config.yaml", "context/config.yml"}
    _same_files(src, tmp_path / "out")


def test_fresh_model_round_trip_and_its_dictionary(tmp_path):
    cfg = TFreeLMConfig(vocab_size=VOCAB, m=M, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                        max_seq_len=SEQ, d_ff=43, norm_eps=1e-5)
    tok = TrigramTokenizer(VOCAB, M, K_LOWER, hash_mode="reference")
    torch.manual_seed(0)
    model = TFreeLM(cfg)
    model.save_pretrained(tmp_path / "m", tokenizer=tok, words=["Hi", "<|ws|>"])
    arch = json.loads((tmp_path / "m/transformer/transformer_config.yaml").read_text())
    assert int(arch["hidden_size"] * arch["mlp_factor"]) == 43
    state = torch.load(tmp_path / "m/tokenizer/tokenizer.pt", weights_only=True)
    assert state["trigram_to_vocab"] is None and state["words"] == ["Hi", "<|ws|>"]
    # the public get_sparse_word_list_from_words layout, restated: "Hi" has the trigrams
    # " Hi", "Hi " (both edges), "<|ws|>" is one whole-word inner pattern
    edge = {(0, s) for t in (b" Hi", b"Hi ") for s in trigram_slots(t)}
    inner = {(1, s) for s in word_rows("<|ws|>")[0]}
    assert set(zip(state["words_to_weights_word_indices_edges"].tolist(),
                   state["words_to_weights_token_indices_edges"].tolist())) == edge
    assert set(zip(state["words_to_weights_word_indices"].tolist(),
                   state["words_to_weights_token_indices"].tolist())) == inner
    assert state["word_trigram_counts"].tolist() == [2, 1]
    again = TFreeLM.from_pretrained(tmp_path / "m")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert again.released.words == ["Hi", "<|ws|>"]


# -- the trigram table ----------------------------------------------------------------------


def test_trigram_table_is_checked_against_the_hash():
    tok = TrigramTokenizer(VOCAB, M, K_LOWER, hash_mode="reference")
    ids = probe_trigram_ids(WORDS)
    table = torch.zeros(2**24, M, dtype=torch.int64)  # pages untouched stay unallocated
    for tid in ids.tolist():
        table[tid] = torch.tensor(trigram_slots(bytes((tid & 255, (tid >> 8) & 255, tid >> 16))))
    check_trigram_table(table, tok, WORDS, "t")
    assert any(chr(tid & 255).isupper() for tid in ids.tolist())  # the sharing is probed
    table[int(ids[3]), 0] += 1
    with pytest.raises(ValueError, match="differs from the md5 hash"):
        check_trigram_table(table, tok, WORDS, "t")
    with pytest.raises(ValueError, match=r"shape \(16777216, 3\)"):
        check_trigram_table(torch.zeros(5, M, dtype=torch.int64), tok, WORDS, "t")


def test_a_stored_table_unlike_the_hash_is_refused(tmp_path):
    wrong = torch.zeros(1, M, dtype=torch.int64).expand(2**24, M)  # a tiny file
    root = write_released(tmp_path / "t", tok_state=tokenizer_state(table=wrong))
    with pytest.raises(ValueError, match="tokenizer.pt: trigram_to_vocab differs"):
        TFreeLM.from_pretrained(root)


# -- bad input ------------------------------------------------------------------------------


def test_other_architectures_are_refused(tmp_path, released):
    hat = tmp_path / "hat"
    hat.mkdir()
    (hat / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a released T-FREE checkpoint"):
        TFreeLM.from_pretrained(hat)
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        TFreeLM.from_pretrained(tmp_path / "nothing")
    classic = write_released(tmp_path / "classic", tok=tokenizer_config(
        do_classic_tokenization=True))
    with pytest.raises(ValueError, match="do_classic_tokenization=True is not supported"):
        TFreeLM.from_pretrained(classic)


def test_missing_and_broken_files_are_named(released):
    weights = released / "transformer" / "transformer.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="transformer.pt: not a readable torch.save file"):
        TFreeLM.from_pretrained(released)
    weights.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="transformer.pt: not a readable torch.save file"):
        TFreeLM.from_pretrained(released)
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="transformer.pt: (empty or truncated|not a readable)"):
        TFreeLM.from_pretrained(released)
    weights.unlink()
    with pytest.raises(ValueError, match="transformer.pt: not found"):
        TFreeLM.from_pretrained(released)
    (released / "tokenizer" / "tokenizer_config.yaml").write_text("lowercase: false\n")
    with pytest.raises(ValueError, match="tokenizer_config.yaml: not JSON"):
        TFreeLM.from_pretrained(released)


def test_pickled_objects_are_refused(tmp_path):
    state = tokenizer_state()
    state["cache_dir"] = Path("/tmp")  # any non-tensor class: a weights-only load refuses it
    root = write_released(tmp_path / "p", tok_state=state)
    with pytest.raises(ValueError, match="weights-only load refuses"):
        TFreeLM.from_pretrained(root)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    state = released_state()
    del state["transformer.layers.1.mlp.swiglu.weight"]
    with pytest.raises(ValueError, match="missing tensor.*layers.1.mlp.swiglu.weight"):
        TFreeLM.from_pretrained(write_released(tmp_path / "a", state=state))
    state = released_state()
    state["transformer.layers.0.attention.query.bias"] = torch.zeros(HIDDEN)
    with pytest.raises(ValueError, match="unexpected tensor.*attention.query.bias"):
        TFreeLM.from_pretrained(write_released(tmp_path / "b", state=state))
    state = released_state()
    state["transformer.layers.0.mlp.dense_in.weight"] = torch.zeros(44, HIDDEN)
    with pytest.raises(ValueError, match=r"dense_in.weight' has shape \(44, 16\).*\(43, 16\)"):
        TFreeLM.from_pretrained(write_released(tmp_path / "c", state=state))
    tok = tokenizer_state()
    del tok["word_counts"]
    with pytest.raises(ValueError, match="missing entr.*word_counts"):
        TFreeLM.from_pretrained(write_released(tmp_path / "d", tok_state=tok))


def test_dtype_requests_and_stored_dtypes(tmp_path, released):
    for bad in ("float16", torch.int64, "fp32"):
        with pytest.raises(ValueError, match="dtype must be None"):
            TFreeLM.from_pretrained(released, dtype=bad)
    with pytest.raises(ValueError, match="dtype torch.float16; only bfloat16 and float32"):
        TFreeLM.from_pretrained(write_released(tmp_path / "h",
                                               state=released_state(torch.float16)))
    mixed = released_state()
    mixed["lm_head.weight"] = mixed["lm_head.weight"].bfloat16()
    with pytest.raises(ValueError, match="mixed dtypes"):
        TFreeLM.from_pretrained(write_released(tmp_path / "m", state=mixed))
    assert TFreeLM.from_pretrained(write_released(tmp_path / "m2", state=mixed),
                                   dtype="bfloat16").embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("arch, tok, match", [
    ({"bias_terms": True}, {}, "bias_terms=True is not supported"),
    ({"norm": "layer"}, {}, "norm='layer' is not supported"),
    ({"mlp_type": "simple_gelu"}, {}, "mlp_type='simple_gelu' is not supported"),
    ({"embedding_normalization": True}, {}, "embedding_normalization=True"),
    ({"embedding_aggregation": "max"}, {}, "embedding_aggregation='max'"),
    ({"precision": "float16"}, {}, "precision='float16' is not supported"),
    ({"num_attention_heads": 3}, {}, "even integer head size"),
    ({"flash_window": 3}, {}, "unknown field.*flash_window"),
    ({}, {"initialize": "orthogonal"}, "initialize='orthogonal' is not supported"),
    ({}, {"vocab_size": VOCAB + 1}, "vocab_size=62 is not supported"),
    ({}, {"sequence_length": 8}, "sequence_length=8 is not supported"),
    ({}, {"vocab_population_partial_lowercase": 5}, "k_lower must be in"),
])
def test_unsupported_config_fields_are_named(tmp_path, arch, tok, match):
    root = write_released(tmp_path / "u", arch=architecture(**arch), tok=tokenizer_config(**tok))
    with pytest.raises(ValueError, match=match):
        TFreeLM.from_pretrained(root)


def test_save_refusals(tmp_path, released):
    cfg = TFreeLMConfig(vocab_size=VOCAB, m=M, d_model=HIDDEN, n_layers=1, n_heads=HEADS,
                        max_seq_len=SEQ)
    model = TFreeLM(cfg)
    with pytest.raises(ValueError, match="needs the model's TrigramTokenizer"):
        model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="hash_mode='reference'"):
        model.save_pretrained(tmp_path / "b", tokenizer=TrigramTokenizer(VOCAB, M, K_LOWER))
    gqa = TFreeLM(TFreeLMConfig(vocab_size=VOCAB, m=M, d_model=HIDDEN, n_layers=1, n_heads=4,
                                n_kv_heads=2, max_seq_len=SEQ))
    with pytest.raises(ValueError, match="no grouped-query heads"):
        gqa.save_pretrained(tmp_path / "c",
                            tokenizer=TrigramTokenizer(VOCAB, M, K_LOWER, hash_mode="reference"))
    loaded = TFreeLM.from_pretrained(released)
    with pytest.raises(ValueError, match="save it to another directory"):
        loaded.save_pretrained(released)
    with pytest.raises(ValueError, match="all bfloat16 or all float32"):
        loaded.half().save_pretrained(tmp_path / "d")
