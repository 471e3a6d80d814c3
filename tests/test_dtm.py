"""Divergent Token Metrics: FDT/SDT on constructed cases, components, compressions, apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aa_compile import dtm
from aa_compile.dtm.components import magnitude_prune, prune_2_4
from aa_compile.models import Transformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, std=0.3, layers=2):
    torch.manual_seed(seed)
    m = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=layers, n_heads=2,
                                      d_ff=64, max_seq_len=64)).eval()
    m.reset_parameters(std)
    return m


class FlipAt(nn.Module):
    """Wraps a model; at generated position ``pos`` makes a different token the argmax."""

    def __init__(self, model, prompt_len, pos):
        super().__init__()
        self.model, self.p, self.pos = model, prompt_len, pos

    def forward(self, ids):
        logits = self.model(ids).clone()
        t = self.p - 1 + self.pos
        top = logits[:, t].argmax(-1)
        logits[torch.arange(len(top)), t, (top + 1) % logits.shape[-1]] = 1e4
        return logits


def test_identical_models_never_diverge():
    m = tiny()
    prompts = torch.randint(0, 64, (5, 4))
    r = dtm.dtm(m, m, prompts, 10)
    assert r.fdt.tolist() == [10] * 5 and r.sdt.tolist() == [0.0] * 5
    s = r.summary()
    assert s["fdt_median"] == 10 and s["share_fdt_ge_tau"] == 1.0 and s["sdt_mean"] == 0


@pytest.mark.parametrize("pos", [0, 3, 9])
def test_forced_divergence_at_position(pos):
    m = tiny()
    prompts = torch.randint(0, 64, (4, 3))
    r = dtm.dtm(m, FlipAt(m, 3, pos), prompts, 10)
    assert r.fdt.tolist() == [pos] * 4
    assert r.sdt.tolist() == pytest.approx([0.1] * 4)


def test_generate_matches_cache_free_greedy():
    m = tiny()
    prompts = torch.randint(0, 64, (3, 4))
    ref = dtm.generate(m, prompts, 6, batch_size=2)
    assert torch.equal(ref, m.generate(prompts, 6, use_cache=False))


def test_divergence_and_summary():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    pred = torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4]])
    fdt, sdt = dtm.divergence(ref, pred)
    assert fdt.tolist() == [2, 4] and sdt.tolist() == [0.5, 0.0]
    s = dtm.summarize(fdt, sdt, 4, tau=3)
    assert s["fdt_mean"] == 3 and s["share_fdt_ge_tau"] == 0.5 and s["fdt_min"] == 2


def test_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="at least one token"):
        dtm.dtm(m, m, torch.zeros(2, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="n_tokens"):
        dtm.dtm(m, m, torch.zeros(2, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="does not have"):
        dtm.apply(m, {"layers.9.attn.q_proj": "int8"})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dtm.apply(m, {"layers.0.attn.q_proj": "prune:1.0"})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dtm.parse("prune:-0.1")
    with pytest.raises(ValueError, match="unknown compression"):
        dtm.parse("int4")
    with pytest.raises(ValueError, match="no components"):
        dtm.find_components(nn.Sequential(nn.ReLU()))


def test_components_of_reference_transformer():
    comps = dtm.find_components(tiny(layers=3))
    assert len(comps) == 21
    types = {c.type for c in comps.values()}
    assert types == {f"attn.{x}_proj" for x in "qkvo"} | {f"mlp.{x}_proj" for x in
                                                            ("gate", "up", "down")}


def test_compressions():
    w = torch.randn(8, 16)
    p = magnitude_prune(w, 0.75)
    assert (p == 0).sum() == 96 and p.abs().min() == 0
    kept = p[p != 0].abs()
    assert kept.min() >= w.abs().flatten().kthvalue(96).values
    s = prune_2_4(w)
    assert ((s.reshape(8, 4, 4) != 0).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_2_4(torch.randn(3, 6))


def test_apply_int8_and_pruning_matches_simulation():
    m = tiny()
    plan = {"layers.0.attn.q_proj": "int8", "layers.1.mlp.down_proj": "2:4",
            "layers.0.mlp.up_proj": "prune:0.5"}
    out = dtm.apply(m, plan)
    assert isinstance(out.layers[0].attn.q_proj, dtm.Int8Linear)
    assert isinstance(m.layers[0].attn.q_proj, nn.Linear)  # the original is untouched
    assert (out.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    sim = dtm.apply(m, {**plan, "layers.0.attn.q_proj": "none"})
    from aa_compile.dtm.planner import set_compressed

    set_compressed(sim, "layers.0.attn.q_proj", "int8")
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(out(ids), sim(ids), rtol=1e-4, atol=1e-4)


def test_apply_compiles_with_aa_backend():
    m = dtm.apply(tiny(), {"layers.0.attn.q_proj": "int8", "layers.1.mlp.gate_proj": "int8"})
    ids = torch.randint(0, 64, (2, 6))
    compiled = torch.compile(m, backend="aa", options={"inner_compiler": "eager"})
    torch.testing.assert_close(compiled(ids), m(ids))


def test_hf_llama_and_gpt2_components():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)).eval()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    assert len(dtm.find_components(llama)) == 14
    comps = dtm.find_components(gpt2)
    assert {c.type for c in comps.values()} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                   "mlp.c_proj"}
    assert comps["transformer.h.0.attn.c_attn"].out_features == 96  # Conv1D: [in, out] stored
    prompts = torch.randint(0, 64, (2, 3))
    for model, name in ((llama, "model.layers.0.mlp.down_proj"),
                        (gpt2, "transformer.h.1.attn.c_attn")):
        ref = dtm.generate(model, prompts, 5)
        assert torch.equal(ref[:, :3], prompts) and ref.shape == (2, 8)
        assert dtm.dtm(model, model, prompts, 5, reference=ref).fdt.tolist() == [5, 5]
        small = dtm.apply(model, {name: "int8"})
        assert isinstance(small.get_submodule(name), dtm.Int8Linear)
        x = model.get_submodule(name)
        inp = torch.randn(3, dtm.find_components(model)[name].in_features)
        torch.testing.assert_close(small.get_submodule(name)(inp), x(inp), rtol=0.05, atol=0.05)
        r = dtm.dtm(model, small, prompts, 5, reference=ref)
        assert r.fdt.shape == (2,)
