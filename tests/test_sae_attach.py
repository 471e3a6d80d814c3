"""Steering and detection in the model (aa_compile.sae.attach): formulas, compile, KV cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aa_compile.models.sae import SAEConfig, SparseAutoencoder
from aa_compile.models.transformer import Transformer, TransformerConfig
from aa_compile.sae import attach
from aa_compile.sae.sites import site_module

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)


def _model_and_sae(seed: int = 0, n_concepts: int = 2) -> tuple[Transformer, SparseAutoencoder]:
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    model.reset_parameters(std=0.2)  # large enough weights that steering moves greedy tokens
    sae = SparseAutoencoder(SAEConfig(32, 96, k=8, activation="topk-sigmoid",
                                      n_concepts=n_concepts))
    with torch.no_grad():
        sae.pre_bias.normal_(0, 0.1)
        sae.latent_bias.normal_(0, 0.5)
        sae.latent_bias[:n_concepts] += 3.0  # concept latents in the TopK set: delta/scar act
    return model, sae


def _hooked_reference(model: nn.Module, sae: SparseAutoencoder, site: str, mode: str,
                      latent: int, alpha: float, ids: torch.Tensor) -> torch.Tensor:
    """The public code's way, restated in float64: an eager forward hook on the site."""
    sae64 = SparseAutoencoder(sae.config).double()
    sae64.load_state_dict(sae.state_dict())

    def hook(_module, _inputs, out):
        x = out.double()
        if mode == "gsae":
            d = sae64.decoder.weight[:, latent]
            return (x + alpha * x.norm(dim=-1, keepdim=True) / d.norm() * d).float()
        full = sae64(x)
        lat = full.latents.clone()
        lat[..., latent] = alpha * lat[..., latent].abs()
        steered = sae64.denormalize(sae64.decode_n(lat), full.mean, full.std)
        if mode == "scar":
            return steered.float()
        return (x + steered - full.recons).float()   # delta

    handle = site_module(model, site).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids)
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["gsae", "scar", "delta"])
@pytest.mark.parametrize("site", ["block.0", "mlp.1"])
def test_steering_equals_the_hooked_float64_reference(mode, site):
    model, sae = _model_and_sae()
    ids = torch.randint(0, 64, (2, 9))
    expected = _hooked_reference(model, sae, site, mode, 1, 4.0, ids)
    steered = attach(model, sae, site=site, mode=mode, concept=1, alpha=4.0)
    with torch.no_grad():
        out = steered(ids)
    torch.testing.assert_close(out.logits, expected, atol=2e-4, rtol=2e-4)


def test_neutral_settings_leave_or_reconstruct_the_model():
    model, sae = _model_and_sae()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        plain = model(ids)
        for mode in ("gsae", "delta"):  # α = 0 adds nothing; α·|h| = h at α = 1 for delta
            steered = attach(model, sae, site="block.0", mode=mode, alpha=0.0 if mode == "gsae"
                             else 1.0)
            torch.testing.assert_close(steered(ids).logits, plain)
            steered.detach_sae()
        steered = attach(model, sae, site="block.0", mode="scar", alpha=1.0)
        expected = _hooked_reference(steered.detach_sae(), sae, "block.0", "scar", 0, 1.0, ids)
        steered = attach(model, sae, site="block.0", mode="scar", alpha=1.0)
        torch.testing.assert_close(steered(ids).logits, expected, atol=2e-4, rtol=2e-4)
        assert not torch.allclose(steered(ids).logits, plain)  # the SAE error is dropped


def test_vector_mode_adds_the_scaled_direction():
    model, sae = _model_and_sae()
    ids = torch.randint(0, 64, (2, 9))
    v = torch.randn(32)
    grabbed = []

    def hook(_m, _i, out):
        grabbed.append(out)
        x = out.double()
        return (x + 2.5 * x.norm(dim=-1, keepdim=True) / v.double().norm() * v.double()).float()

    handle = model.layers[1].register_forward_hook(hook)
    with torch.no_grad():
        expected = model(ids)
    handle.remove()
    steered = attach(model, sae, site="block.1", mode="vector", direction=v, alpha=2.5)
    with torch.no_grad():
        torch.testing.assert_close(steered(ids).logits, expected, atol=2e-4, rtol=2e-4)


def test_detection_scores_are_the_concept_pre_activations():
    model, sae = _model_and_sae()
    ids = torch.randint(0, 64, (2, 9))
    grabbed = []
    handle = model.layers[0].register_forward_hook(lambda m, i, o: grabbed.append(o))
    with torch.no_grad():
        model(ids)
    handle.remove()
    for mode in ("gsae", "scar"):
        steered = attach(model, sae, site="block.0", mode=mode, alpha=2.0)
        with torch.no_grad():
            scores = steered(ids).concept_scores
        steered.detach_sae()
        assert scores.shape == (2, 9, 2)
        torch.testing.assert_close(scores, sae(grabbed[0]).pre_acts[..., :2],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["gsae", "scar", "delta"])
def test_compiled_fullgraph_equals_eager(mode):
    model, sae = _model_and_sae()
    ids = torch.randint(0, 64, (2, 9))
    steered = attach(model, sae, site="block.1", mode=mode, concept=0, alpha=-3.0)
    compiled = torch.compile(steered, backend="eager", fullgraph=True)  # no graph break
    with torch.no_grad():
        eager, got = steered(ids), compiled(ids)
        torch.testing.assert_close(got.logits, eager.logits)
        torch.testing.assert_close(got.concept_scores, eager.concept_scores)
        steered.set_alpha(5.0)   # α is a buffer: the compiled graph sees the new value
        torch.testing.assert_close(compiled(ids).logits, steered(ids).logits)


def test_aa_backend_runs_the_sae_in_the_graph():
    model, sae = _model_and_sae()
    ids = torch.randint(0, 64, (1, 7))
    steered = attach(model, sae, site="block.0", mode="delta", concept=1, alpha=3.0)
    compiled = torch.compile(steered, backend="aa", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, steered(ids).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["gsae", "scar", "delta"])
def test_generate_cached_equals_uncached_and_steering_changes_tokens(mode):
    model, sae = _model_and_sae()
    ids = torch.randint(0, 64, (2, 4))
    plain = model.generate(ids, 6)
    steered = attach(model, sae, site="block.0", mode=mode, concept=0, alpha=30.0)
    cached = steered.generate(ids, 6, use_cache=True)
    assert torch.equal(cached, steered.generate(ids, 6, use_cache=False))
    assert not torch.equal(cached, plain)
    steered.detach_sae()
    assert torch.equal(model.generate(ids, 6), plain)


def test_hf_model_block_site():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)).eval()
    _, sae = _model_and_sae()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        plain = model(ids).logits
        steered = attach(model, sae, site="block.0", mode="gsae", concept=0, alpha=0.0)
        out = steered(ids)
        torch.testing.assert_close(out.logits, plain)
        assert out.concept_scores.shape == (1, 6, 2)
        steered.set_alpha(2.0)
        assert not torch.allclose(steered(ids).logits, plain)


def test_bad_inputs():
    model, sae = _model_and_sae()
    with pytest.raises(ValueError, match="unknown site 'block.7'; valid sites: block.0, mlp.0"):
        attach(model, sae, site="block.7")
    with pytest.raises(ValueError, match="beyond the SAE's reserved latents \\(n_concepts=2\\)"):
        attach(model, sae, site="block.0", concept=2)
    with pytest.raises(ValueError, match="latent 96 out of range"):
        attach(model, sae, site="block.0", latent=96)
    with pytest.raises(ValueError, match="mode must be one of"):
        attach(model, sae, site="block.0", mode="clamp")
    with pytest.raises(TypeError, match="SparseAutoencoder"):
        attach(model, nn.Linear(2, 2), site="block.0")
    narrow = SparseAutoencoder(SAEConfig(16, 32, k=4, n_concepts=1))
    with pytest.raises(ValueError, match="width mismatch: the SAE reads 16 features, site "
                                         "'block.0' has 32"):
        attach(model, narrow, site="block.0")
    with pytest.raises(ValueError, match="needs direction="):
        attach(model, sae, site="block.0", mode="vector")
    with pytest.raises(ValueError, match="direction must be \\[32\\]"):
        attach(model, sae, site="block.0", mode="vector", direction=torch.ones(3))
    attach(model, sae, site="block.0")
    with pytest.raises(ValueError, match="already has an SAE"):
        attach(model, sae, site="block.0")
