"""MAD layer menu and backbones: attention against a float64 restatement (rotary, causal,
sliding window), gated linear attention's parallel form against its recurrence, causality of
every layer stack, the auto-encoder's bottleneck, the adapters, and bad inputs."""

import math

import pytest
import torch

from aa_compile.mad.settings import Setting
from aa_compile.mad.zoo import MODELS, model_spec
from aa_compile.models.mad import (
    LAYERS,
    AutoEncoder,
    GatedLinearAttention,
    LanguageModel,
    RotaryAttention,
    make_layer,
    swiglu_hidden,
)


def attention_reference(layer: RotaryAttention, x: torch.Tensor) -> torch.Tensor:
    """Float64 loops: rotate (q, k) pairs (i, i + r/2) by t·base^(-2i/r) with complex numbers,
    softmax over the visible keys, output projection."""
    w, b = layer.qkv.weight.double(), layer.qkv.bias.double()
    bsz, s, d = x.shape
    h, dh = layer.num_heads, layer.head_dim
    r = 2 * layer.cos.shape[1]
    qkv = (x.double() @ w.T + b).view(bsz, s, 3, h, dh)
    out = torch.zeros(bsz, s, h, dh, dtype=torch.float64)
    freqs = torch.tensor([10000.0 ** (-2 * i / r) for i in range(r // 2)], dtype=torch.float64)

    def rotate(v, t):
        z = torch.complex(v[:r // 2], v[r // 2:r]) * torch.exp(1j * t * freqs)
        return torch.cat([z.real, z.imag, v[r:]])

    for bi in range(bsz):
        for hi in range(h):
            for i in range(s):
                q = rotate(qkv[bi, i, 0, hi], i)
                visible = [j for j in range(i + 1) if layer.window is None or i - j < layer.window]
                scores = torch.stack([q @ rotate(qkv[bi, j, 1, hi], j) for j in visible])
                p = torch.softmax(scores / math.sqrt(dh), 0)
                out[bi, i, hi] = sum(p[n] * qkv[bi, j, 2, hi] for n, j in enumerate(visible))
    return out.reshape(bsz, s, d) @ layer.out.weight.double().T + layer.out.bias.double()


@pytest.mark.parametrize("heads, rotary_dim, window", [(2, None, None), (4, 2, 3), (1, 8, 2)])
def test_attention_matches_float64_reference(heads, rotary_dim, window):
    torch.manual_seed(0)
    layer = RotaryAttention(8, num_heads=heads, rotary_dim=rotary_dim, window=window,
                            max_length=16)
    torch.nn.init.normal_(layer.qkv.bias)
    x = torch.randn(2, 7, 8)
    got = layer(x).double()
    torch.testing.assert_close(got, attention_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_sliding_window_ignores_tokens_outside_it():
    torch.manual_seed(0)
    layer = RotaryAttention(16, num_heads=2, window=4, max_length=32)
    x = torch.randn(1, 12, 16)
    y = x.clone()
    y[0, 2] += 5.0  # position 2 is outside the window of positions >= 6
    a, b = layer(x), layer(y)
    torch.testing.assert_close(a[0, 6:], b[0, 6:])
    assert not torch.allclose(a[0, 2:6], b[0, 2:6])


def test_gated_linear_attention_parallel_equals_recurrence():
    torch.manual_seed(0)
    layer = GatedLinearAttention(16, num_heads=4).double()
    torch.nn.init.normal_(layer.decay.bias, std=3.0)  # strong and weak decays
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.recurrent(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_stack_is_causal(name):
    torch.manual_seed(0)
    model = LanguageModel(12, layers=[name, "swiglu"], dim=32, max_length=40)
    x = torch.randint(0, 12, (2, 37))
    y = x.clone()
    y[:, 30:] = (y[:, 30:] + 1) % 12
    a, b = model(x), model(y)
    assert a.shape == (2, 37, 12)
    torch.testing.assert_close(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_autoencoder_decodes_every_position_from_the_last_one():
    torch.manual_seed(0)
    model = AutoEncoder(10, dim=32, max_length=16)
    x = torch.randint(0, 10, (3, 16))
    out = model(x)
    assert out.shape == (3, 16, 10)
    # the code is the last position's vector: same code, same decoding
    code = model.encode(x)
    torch.testing.assert_close(model.decode(code, 16), out)
    assert code.shape == (3, 32)


def test_swiglu_width_is_mad_default():
    assert swiglu_hidden(128) == 352  # round16(2 * 4 * 128 / 3)
    assert make_layer("swiglu", 128, 8).gate.out_features == 352


def test_embeddings_are_small_normal_and_biases_zero():
    torch.manual_seed(0)
    model = LanguageModel(256, dim=128, max_length=8)
    assert abs(model.embed.weight.std().item() - 0.02) < 0.002
    assert all((m.bias == 0).all() for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m.bias is not None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_zoo_builds_logits_for_a_setting(name):
    spec = model_spec(name)
    for task in ("in-context-recall", "compression"):
        s = Setting(task, vocab_size=16, seq_len=16, num_train_examples=1)
        if not spec.supports(task):
            with pytest.raises(ValueError, match="no encoder-decoder form"):
                spec.model_for(s, 32)
            continue
        model = spec.model_for(s, 32)
        assert model(torch.randint(0, 16, (2, 16))).shape == (2, 16, 16)


def test_bad_model_inputs():
    with pytest.raises(ValueError, match="unknown MAD layer"):
        make_layer("mamba", 16, 8)
    with pytest.raises(ValueError, match="divisible"):
        RotaryAttention(10, num_heads=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryAttention(16, num_heads=2, rotary_dim=3)
    with pytest.raises(ValueError, match="window"):
        RotaryAttention(16, num_heads=2, window=0)
    with pytest.raises(ValueError, match="layers must be"):
        LanguageModel(16, layers=[])
    with pytest.raises(ValueError, match="vocab_size"):
        AutoEncoder(0)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        LanguageModel(16, dim=16, max_length=8)(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_length"):
        RotaryAttention(16, num_heads=2, max_length=4)(torch.zeros(1, 5, 16))
    with pytest.raises(ValueError, match="unknown MAD model"):
        model_spec("mamba")


def test_four_head_attention_of_the_recall_recipe():
    layer = make_layer("mh4-attention", 64, 8)
    assert (layer.num_heads, layer.head_dim) == (4, 16)
    assert make_layer("mh-attention", 64, 8).num_heads == 16  # mad-lab's default, width 4
    blocks = model_spec("attention4-swiglu").model_for(
        Setting("in-context-recall", vocab_size=16, seq_len=16, num_train_examples=1), 64).blocks
    assert [type(b.layer).__name__ for b in blocks] == ["RotaryAttention", "SwiGLU"] * 2
    assert blocks[0].layer.num_heads == 4
