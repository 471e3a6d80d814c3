"""The reference concept SAE (aa_compile.models.sae): forward numerics, losses, weights I/O."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aa_compile.models.sae import (
    SAEConfig,
    SparseAutoencoder,
    auxk_loss,
    concept_loss,
    normalized_mse,
    sae_loss,
    scale_positive_grad,
)


def _sae(activation: str = "topk", n_inputs: int = 12, n_latents: int = 40, k: int = 5,
         n_concepts: int = 2, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(n_inputs, n_latents, k=k, activation=activation,
                                      n_concepts=n_concepts))
    with torch.no_grad():  # non-zero biases, so each one shows up in the restatement
        sae.pre_bias.normal_(0, 0.3)
        sae.latent_bias.normal_(0, 0.3)
        sae.decoder.weight.normal_(0, 0.2)
    return sae


def _restated(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 restatement of the SCAR/G-SAE forward: (latents, reconstruction)."""
    x = x.double()
    w_enc, w_dec = sae.encoder.weight.double(), sae.decoder.weight.double()
    b_pre, b_lat = sae.pre_bias.double(), sae.latent_bias.double()
    mu = x.mean(-1, keepdim=True)
    sd = torch.sqrt(((x - mu) ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1))
    xn = (x - mu) / (sd + 1e-5)
    pre = (xn - b_pre) @ w_enc.t() + b_lat
    act = sae.config.activation
    if act == "relu":
        lat = pre.clamp_min(0)
    elif act == "jumprelu":
        lat = torch.where(pre > sae.threshold.double(), pre, torch.zeros_like(pre))
    else:
        lat = torch.zeros_like(pre)
        order = pre.argsort(-1, descending=True)[..., :sae.config.k]
        kept = pre.gather(-1, order)
        kept = kept.sigmoid() if act == "topk-sigmoid" else kept.clamp_min(0)
        lat.scatter_(-1, order, kept)
    rec = (lat @ w_dec.t() + b_pre) * (sd + 1e-5) + mu
    return lat, rec


@pytest.mark.parametrize("activation", ["topk", "topk-sigmoid", "relu", "jumprelu"])
def test_forward_equals_float64_restatement(activation):
    sae = _sae(activation)
    x = torch.randn(3, 7, 12) * 4 + 1.5
    out = sae(x)
    lat, rec = _restated(sae, x)
    torch.testing.assert_close(out.latents.double(), lat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recons.double(), rec, atol=1e-4, rtol=1e-4)
    if activation.startswith("topk"):
        assert int((out.latents != 0).sum(-1).max()) <= sae.config.k


def test_topk_sigmoid_keeps_exactly_k_values_in_unit_interval():
    out = _sae("topk-sigmoid")(torch.randn(50, 12))
    nz = out.latents[out.latents != 0]
    assert ((out.latents != 0).sum(-1) == 5).all()
    assert ((nz > 0) & (nz < 1)).all()


def test_normalize_off_reconstructs_in_input_scale():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(4, 8, k=8, activation="relu", normalize=False))
    x = torch.randn(5, 4)
    out = sae(x)
    torch.testing.assert_close(out.input_n, x)
    expected = torch.relu((x - sae.pre_bias) @ sae.encoder.weight.t() + sae.latent_bias) \
        @ sae.decoder.weight.t() + sae.pre_bias
    torch.testing.assert_close(out.recons, expected)


def test_decoder_initialised_tied_then_independent():
    sae = _sae()
    sae.reset_parameters()
    torch.testing.assert_close(sae.decoder.weight, sae.encoder.weight.t())
    assert sae.decoder.weight.data_ptr() != sae.encoder.weight.data_ptr()


def test_jumprelu_threshold_gets_the_rectangle_gradient():
    sae = SparseAutoencoder(SAEConfig(2, 3, activation="jumprelu", jumprelu_bandwidth=0.1,
                                      jumprelu_init_threshold=0.5, normalize=False))
    theta = 0.5
    pre = torch.tensor([[0.52, 0.3, 0.9]], requires_grad=True)  # only 0.52 is in the window
    sae.activate(pre).sum().backward()
    # d/dθ = -θ/ε on the window (0.52), chained through θ = exp(log θ): times θ
    expected = torch.tensor([-theta / 0.1 * theta, 0.0, 0.0])
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    torch.testing.assert_close(pre.grad, torch.tensor([[1.0, 0.0, 1.0]]))


def test_save_load_round_trip(tmp_path):
    sae = _sae("topk-sigmoid")
    path = tmp_path / "sae.safetensors"
    sae.save(path)
    back = SparseAutoencoder.load(path)
    assert back.config == sae.config
    x = torch.randn(4, 12)
    torch.testing.assert_close(back(x).recons, sae(x).recons)


def test_load_refuses_anything_but_safetensors(tmp_path):
    torch.save({}, tmp_path / "sae.pt")
    with pytest.raises(ValueError, match="safetensors"):
        SparseAutoencoder.load(tmp_path / "sae.pt")


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_inputs=4, n_latents=8, k=9), "k=9 exceeds n_latents=8"),
    (dict(n_inputs=4, n_latents=8, activation="gelu"), "activation must be one of"),
    (dict(n_inputs=0, n_latents=8), "n_inputs must be a positive int"),
    (dict(n_inputs=4, n_latents=8, k=2, n_concepts=9), "n_concepts"),
])
def test_config_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**kwargs)


def test_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="width mismatch: the SAE reads 12"):
        _sae()(torch.randn(3, 13))
    with pytest.raises(TypeError, match="floating-point"):
        _sae()(torch.ones(3, 12, dtype=torch.long))


# -- losses ---------------------------------------------------------------------------------


def test_normalized_mse_hand_computed():
    x = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    r = torch.tensor([[0.0, -1.0], [2.0, 1.0]])
    # token 0: mean err 0.5 / mean x² 1 = 0.5; token 1: 0.5 / 2 = 0.25
    assert normalized_mse(r, x).item() == pytest.approx(0.375)


def test_concept_loss_is_bce_on_the_first_pre_activations():
    pre = torch.randn(6, 10, dtype=torch.float64)
    labels = torch.tensor([[1, 0], [0, 0], [1, 1], [-1, 0], [0, 1], [1, 0]], dtype=torch.float64)
    target = labels.clamp_min(0)
    p = pre[:, :2].sigmoid()
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).sum(1).mean()
    torch.testing.assert_close(concept_loss(pre, labels), expected)


def test_positive_scale_changes_only_positive_gradients():
    pre = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0]], dtype=torch.float64)
    plain = torch.autograd.grad(concept_loss(pre, labels, 1.0), pre)[0]
    scaled_value = concept_loss(pre, labels, 5.0)
    scaled = torch.autograd.grad(scaled_value, pre)[0]
    assert scaled_value.item() == pytest.approx(concept_loss(pre, labels, 1.0).item())
    factor = torch.tensor([[5.0], [1.0], [5.0], [1.0], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(scaled, plain * factor)


def test_scale_positive_grad_is_identity_in_value():
    x = torch.randn(4, 3)
    torch.testing.assert_close(scale_positive_grad(x, (x > 0).float(), 7.0), x)


def test_concept_loss_bad_labels():
    with pytest.raises(ValueError, match="concept labels must be"):
        concept_loss(torch.randn(4, 8), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="only 8 latents"):
        concept_loss(torch.randn(4, 8), torch.zeros(4, 9))


def test_auxk_hand_computed():
    sae = _sae("topk", n_inputs=12, n_latents=40, k=5)
    x = torch.randn(6, 12)
    out = sae(x)
    dead = torch.zeros(40, dtype=torch.bool)
    assert auxk_loss(sae, out, dead).item() == 0.0
    dead[[3, 7, 11]] = True
    # k_aux = 6 > 3 dead: all three dead latents, scaled by 3/6
    acts = torch.zeros_like(out.pre_acts)
    acts[:, [3, 7, 11]] = out.pre_acts[:, [3, 7, 11]].clamp_min(0)
    residual = out.input_n - out.recons_n
    expected = 0.5 * ((acts @ sae.decoder.weight.t() - residual) ** 2).mean()
    torch.testing.assert_close(auxk_loss(sae, out, dead), expected)


def test_sae_loss_terms():
    sae = _sae("topk-sigmoid")
    x = torch.randn(9, 12)
    labels = (torch.rand(9, 2) > 0.5).float()
    vanilla, out = sae_loss(sae, x)
    assert vanilla.concept.item() == 0.0
    torch.testing.assert_close(vanilla.total, normalized_mse(out.recons_n, out.input_n))
    gsae, out = sae_loss(sae, x, labels)
    expected = F.binary_cross_entropy_with_logits(out.pre_acts[:, :2], labels,
                                                  reduction="none").sum(1).mean()
    torch.testing.assert_close(gsae.concept, expected)
    torch.testing.assert_close(gsae.total, gsae.mse + gsae.concept)


def test_sae_loss_bad_inputs():
    sae = _sae(n_concepts=1)
    with pytest.raises(ValueError, match="reserves n_concepts=1"):
        sae_loss(sae, torch.randn(4, 12), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="activations \\[tokens, features\\]"):
        sae_loss(sae, torch.randn(2, 4, 12))


def test_sparsity_terms():
    relu = _sae("relu")
    x = torch.randn(5, 12)
    parts, out = sae_loss(relu, x, sparsity_coef=0.1)
    torch.testing.assert_close(parts.sparsity, 0.1 * out.latents.abs().sum(-1).mean())
    jump = _sae("jumprelu")
    parts, out = sae_loss(jump, x, sparsity_coef=0.1)
    torch.testing.assert_close(parts.sparsity,
                               0.1 * (out.pre_acts > jump.threshold).float().sum(-1).mean())
