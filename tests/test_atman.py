"""AtMan explanations vs an independent naive implementation (n + 1 full forwards, dense masks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aa_compile.atman import explain
from aa_compile.models import Transformer, TransformerConfig

V = 61


def _sharpen(model, std=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _reference():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            max_seq_len=64)
    return _sharpen(Transformer(cfg))


def _llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa", bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    return _sharpen(transformers.LlamaForCausalLM(cfg))


def _gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  attn_implementation="sdpa", bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return _sharpen(transformers.GPT2LMHeadModel(cfg))


MODELS = {"reference": _reference, "llama": _llama, "gpt2": _gpt2}


def _naive_factors(seq_embeddings, item, factor, threshold, n):
    """Dense per-key factor vector, written independently of the library."""
    fac = [1.0] * n
    for p in item:
        fac[p] = min(fac[p], factor)
    if threshold is not None:
        e = seq_embeddings.double()
        for p in item:
            for k in range(n):
                if k == p:
                    continue
                c = float(torch.dot(e[p], e[k]) / (e[p].norm() * e[k].norm()).clamp_min(1e-8))
                c = max(-1.0, min(1.0, c))
                if c >= threshold:
                    fac[k] = min(fac[k], (1 - factor) * (1 - c) + factor)
    return torch.tensor(fac, dtype=torch.float32)


def _naive_attention(fac, mode):
    def attn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        s_q, s_k = q.shape[-2], k.shape[-2]
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        s = (q @ k.transpose(-1, -2)) * scale
        causal = torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q)
        m = fac.view(1, 1, 1, -1).expand(1, 1, s_q, s_k)  # dense [S, S] factor matrix
        if mode == "log_additive":
            s = s + m.log()
        else:
            mn = s.masked_fill(~causal, float("inf")).amin(-1, keepdim=True)
            s = (s - mn) * m
        s = s.masked_fill(~causal, float("-inf"))
        return torch.softmax(s, -1) @ v
    return attn


def _naive_explain(model, prompt, target, factor, mode, threshold):
    seq = torch.cat([prompt, target[:-1]])
    P, n = prompt.numel(), seq.numel()
    emb = (model.get_input_embeddings() if hasattr(model, "get_input_embeddings")
           else model.embed)(seq[None])[0]

    def ce(fac):
        orig = F.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _naive_attention(fac, mode)
        try:
            out = model(seq[None])
        finally:
            torch.nn.functional.scaled_dot_product_attention = orig
        logits = out if isinstance(out, torch.Tensor) else out.logits
        lp = torch.log_softmax(logits[0, P - 1:].float(), -1)
        return -lp.gather(-1, target[:, None])[:, 0]

    with torch.no_grad():
        base = ce(torch.ones(n))
        cols = [base - ce(_naive_factors(emb, (i,), factor, threshold, n)) for i in range(P)]
    return torch.stack(cols, 1)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["log_additive", "multiplicative"])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_matches_naive(name, mode, threshold):
    torch.set_num_threads(1)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, V, (9,), generator=g)
    target = torch.randint(0, V, (4,), generator=g)
    factor = 0.1
    got = explain(model, prompt, target, factor=factor, mode=mode, conceptual_threshold=threshold,
                  progress=False, max_batch_size=4)
    want = _naive_explain(model, prompt, target, factor, mode, threshold)
    assert got.scores.shape == want.shape
    assert want.abs().max() > 1e-2  # the perturbations do something
    tol = 1e-4 * float(want.abs().max())
    torch.testing.assert_close(got.scores, want, rtol=1e-4, atol=tol)
    if threshold is None and name != "gpt2":
        assert got.stats["positions_computed"] < got.stats["positions_naive"]


@pytest.mark.parametrize("name", ["reference", "llama"])
@pytest.mark.parametrize("mode, threshold", [("log_additive", None), ("multiplicative", 0.3)])
def test_batching_does_not_change_the_explanation(name, mode, threshold):
    """One row per forward, small and large batches, batches cut by positions, no prefix
    sharing: the same scores (the shared prefix / own keys split moves with the batches)."""
    torch.set_num_threads(1)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, V, (11,), generator=g)
    target = torch.randint(0, V, (3,), generator=g)
    kw = {"mode": mode, "conceptual_threshold": threshold, "include_target": True,
          "progress": False}
    runs = [explain(model, prompt, target, max_batch_size=b, **kw) for b in (1, 3, 32)]
    runs.append(explain(model, prompt, target, batch_tokens=20, **kw))
    runs.append(explain(model, prompt, target, prefix_sharing=False, max_batch_size=5, **kw))
    assert len({r.stats["batches"] for r in runs}) >= 4
    want = runs[0].scores
    assert want.abs().max() > 1e-2
    for r in runs[1:]:
        torch.testing.assert_close(r.scores, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # a target token cannot depend on an item after its own input position: exactly 0
    # (without co-suppression, which may reach back to earlier positions)
    for r in runs if threshold is None else []:
        for t in range(2):
            assert float(r.scores[t, 11 + t:].abs().max()) == 0.0


def test_chunked_attention_matches_naive(monkeypatch):
    """The CPU kernel's query-chunked causal path (long passes) inside a whole explanation."""
    from aa_compile.kernels.atman_attention import cpu

    monkeypatch.setattr(cpu, "QUERY_CHUNK", 2)
    torch.set_num_threads(1)
    model = _reference()
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, V, (10,), generator=g)
    target = torch.randint(0, V, (3,), generator=g)
    for mode in ("log_additive", "multiplicative"):
        got = explain(model, prompt, target, mode=mode, progress=False, max_batch_size=3)
        want = _naive_explain(model, prompt, target, 0.1, mode, None)
        torch.testing.assert_close(got.scores, want, rtol=1e-4,
                                   atol=1e-4 * float(want.abs().max()))


def test_transformer_logits_to_keep_skips_only_unneeded_work():
    """``Transformer(..., logits_to_keep=n)`` (the last layer runs only the last n queries)
    equals the full forward's last n rows, with and without a KV cache."""
    model = _reference()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        for n in (1, 4, 12, 20):
            torch.testing.assert_close(model(ids, logits_to_keep=n), full[:, -min(n, 12):])
        cache = model.new_cache(2, 12)
        model(ids[:, :7], cache)
        torch.testing.assert_close(model(ids[:, 7:], cache, logits_to_keep=2), full[:, -2:])
        assert cache.length == 12 and bool(cache.k[-1][:, :, 11].abs().sum() > 0)


def test_word_spans_layers_and_outputs(tmp_path):
    model = _reference()
    prompt = torch.arange(3, 13)
    target = torch.tensor([5, 6, 7])
    e = explain(model, prompt, target, granularity=[(0, 3), (3, 10)], progress=False)
    assert e.scores.shape == (3, 2) and e.items[0] == (0, 1, 2)
    one = explain(model, prompt, target, layers=[1], progress=False)
    full = explain(model, prompt, target, progress=False)
    assert not torch.equal(one.scores, full.scores)
    d = full.to_dict()
    assert d["sign"].startswith("CE(unperturbed)") and len(d["scores"]) == 3
    assert "relevance" in str(full)
    path = full.plot(str(tmp_path / "x.png"))
    with open(path, "rb") as fh:
        assert fh.read(4) == b"\x89PNG"
    small = explain(model, prompt, target, progress=False, max_memory=100_000)
    # other batches split the keys differently (shared prefix / own keys): float rounding only
    torch.testing.assert_close(small.scores, full.scores, rtol=1e-4, atol=1e-5)
    assert small.stats["batches"] > full.stats["batches"]
    tgt = explain(model, prompt, target, include_target=True, progress=False)
    assert tgt.scores.shape == (3, 12) and float(tgt.scores[0, 10:].abs().max()) == 0.0


class _NoSdpa(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 8)
        self.out = torch.nn.Linear(8, V)

    def forward(self, ids):
        return self.out(self.emb(ids))


@pytest.mark.parametrize("kwargs, match", [
    ({"target": []}, "target is empty"),
    ({"target": list(range(60))}, "exceed"),
    ({"factor": 1.5}, "out of range"),
    ({"factor": 0.0}, "out of range"),
    ({"mode": "bogus"}, "mode"),
    ({"attention_mask": torch.tensor([[1] * 9 + [0]])}, "padd"),
    ({"input_ids": torch.zeros(2, 10, dtype=torch.long)}, "padding"),
    ({"max_memory": 1000}, "max_memory"),
    ({"granularity": "word"}, "tokenizer"),
    ({"granularity": [(3, 99)]}, "spans"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"batch_tokens": 0}, "batch_tokens"),
    ({"layers": []}, "layers is empty"),
    ({"target": [1, V]}, rf"target\[1\] = {V} .*\[0, {V}\)"),
    ({"target": [-1, 2]}, rf"target\[0\] = -1 .*\[0, {V}\)"),
    ({"input_ids": torch.tensor([0, 3, V + 5])}, rf"input_ids\[2\] = {V + 5} .*\[0, {V}\)"),
    ({"input_ids": [4, -2, 1]}, rf"input_ids\[1\] = -2 .*\[0, {V}\)"),
])
def test_bad_inputs(kwargs, match):
    model = _reference()
    args = {"input_ids": torch.arange(10), "target": [1, 2]}
    args.update(kwargs)
    ids, tgt = args.pop("input_ids"), args.pop("target")
    with pytest.raises((ValueError, TypeError), match=match):
        explain(model, ids, tgt, progress=False, **args)


@pytest.mark.parametrize("name", ["reference", "gpt2", "llama"])
def test_layer_indices_are_checked(name):
    """2-layer models make 2 attention calls: 99, 2 and -3 are out of range (ValueError naming
    the range); negative indices count from the end (-1 is layer 1)."""
    torch.set_num_threads(1)
    model = MODELS[name]()
    prompt, target = torch.arange(3, 10), torch.tensor([5, 6])
    for bad in ([99], [2], [-3], [0, 7]):
        with pytest.raises(ValueError, match=r"layers.*2 attention calls.*0\.\.1.*-2\.\.-1"):
            explain(model, prompt, target, layers=bad, progress=False)
    last = explain(model, prompt, target, layers=[-1], progress=False)
    one = explain(model, prompt, target, layers=[1], progress=False)
    assert float(one.scores.abs().max()) > 1e-3
    assert torch.equal(last.scores, one.scores)
    with pytest.raises(TypeError, match="layers"):
        explain(model, prompt, target, layers=[0.5], progress=False)


@pytest.mark.parametrize("name", ["reference", "gpt2", "llama"])
def test_token_ids_outside_the_vocabulary(name):
    """Checked up front against the input embedding (HF ``get_input_embeddings()``)."""
    model = MODELS[name]()
    with pytest.raises(ValueError, match=rf"target\[2\] = {V} .*\[0, {V}\)"):
        explain(model, torch.arange(5), [1, 2, V], progress=False)
    with pytest.raises(ValueError, match=rf"input_ids\[0\] = {V + 1} .*\[0, {V}\)"):
        explain(model, [V + 1, 2, 3], [1, 2], progress=False)


def test_no_sdpa_model():
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        explain(_NoSdpa(), torch.arange(5), [1, 2], progress=False)


def test_eager_hf_model_is_named():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                  attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        explain(transformers.GPT2LMHeadModel(cfg), torch.arange(5), [1, 2], progress=False)
