"""The reference transformer: config checks, KV cache, generate, and compiled == eager."""

import pytest
import torch
import torch.nn.functional as F

import aa_compile
from aa_compile.models import Transformer, TransformerConfig

TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**{**TINY, **overrides}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"d_model": 50}, "must be divisible by n_heads"),
        ({"n_kv_heads": 3}, "must be a multiple of n_kv_heads"),
        ({"n_layers": 0}, "n_layers must be a positive int"),
        ({"d_model": 36, "n_heads": 12}, "head_dim=3 must be even"),
        ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ],
)
def test_config_rejects_bad_shapes(overrides, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**TINY, **overrides})


def test_transformer_rejects_bad_inputs():
    m = tiny()
    with pytest.raises(TypeError, match="TransformerConfig"):
        Transformer({"d_model": 8})
    with pytest.raises(TypeError, match="int64"):
        m(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_len=40"):
        m(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(torch.zeros(1, 3, dtype=torch.long), -1)


def test_default_ffn_dim_follows_llama_rule():
    assert TransformerConfig(d_model=4096, n_heads=32).ffn_dim == 11008


def test_is_causal():
    m = tiny().eval()
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(m(ids)[:, :8], m(changed)[:, :8])


def test_kv_cache_matches_full_forward():
    m = tiny().eval()
    ids = torch.randint(0, 97, (3, 14))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(3, 14)
        parts = [m(ids[:, :5], cache), m(ids[:, 5:6], cache), m(ids[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 14


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_generate_with_and_without_cache_agree(kv_heads):
    m = tiny(n_kv_heads=kv_heads).eval()
    ids = torch.randint(0, 97, (2, 6))
    out = m.generate(ids, 10)
    assert out.shape == (2, 16) and torch.equal(out[:, :6], ids)
    assert torch.equal(out, m.generate(ids, 10, use_cache=False))


def test_tied_embeddings_share_storage():
    m = tiny(tie_embeddings=True)
    assert m.lm_head.weight is m.embed.weight


@pytest.mark.slow
def test_aa_inductor_matches_eager_forward_and_backward():
    """The acceptance check: backend="aa" (inductor) == eager within float32 tolerance."""
    m = tiny()
    ids = torch.randint(0, 97, (2, 16))
    rep = aa_compile.report(m, ids)
    assert rep.rewrites["rms_norm"] == 2 * TINY["n_layers"] + 1

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    torch._dynamo.reset()
    logits_c, grads_c = loss_and_grads(torch.compile(m, backend="aa"))
    logits_e, grads_e = loss_and_grads(m)
    torch.testing.assert_close(logits_c, logits_e, atol=1e-5, rtol=1e-4)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)


def test_aa_generate_with_kv_cache_matches_eager():
    m = tiny().eval()
    ids = torch.randint(0, 97, (1, 5))
    want = m.generate(ids, 6)
    m.forward = torch.compile(m.forward, backend="aa", options={"inner_compiler": "eager"})
    assert torch.equal(m.generate(ids, 6), want)
