"""Released HAT checkpoints (Hugging Face layout) <-> `HATModel`.

The fixture writes a tiny checkpoint by hand in the layout of the public remote code
(``HATForCausalLM``: tensor names, ``[1, 1, d]`` latent query and first word, every decoder
layer's query/kv norms, the decoder cross-attention's query side, ``config.json`` fields of
``HATArchitectureConfig.to_dict``), without using the module under test. The forward is checked
against an independent float64 restatement of the public forward, written here from the same
names, RoPE in the word pooling included (q at the word's position, k at the bytes' positions,
with the encoder's theta and head size: the released connector builds its rotary embedding from
the encoder config), and the backbone's Llama-3 RoPE scaling restated by hand.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from aa_compile.models.hat import ByteBatch, HATConfig, HATModel
from aa_compile.models.hat.pretrained import (
    POOL_ROPE_MARK,
    HATCheckpointWarning,
    hat_config_from_hf,
    hf_key_map,
)
from aa_compile.models.hat.rope import Llama3RopeScaling

D_ENC, D_BB, HEADS, KV, WINDOW = 32, 48, 4, 2, 8
#: pooling heads: 48 / 6 = 8 = the encoder's head size (32 / 4), which the released connector's
#: RoPE requires (its rotary embedding is built from the encoder config)
POOL_HEADS = 6
#: a Llama-3 scaling that matters at the test's few word positions (theta 500000, head size 12:
#: wavelengths 6.3, 56, 502, ... against the bands 16 and 64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
ENC_LAYERS, BB_LAYERS, DEC_LAYERS, FF_ENC, FF_BB = 1, 2, 2, 64, 96
TEXT = "Hi, you there! Grüße."


def _stack(hidden: int, layers: int, ff: int, theta: float, window: int | None,
           vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "rms_norm_eps": 1e-5,
            "intermediate_size": ff, "max_position_embeddings": 262144, "rope_scaling": None,
            "rope_theta": theta, "mlp_bias": False, "use_cache": True,
            "sliding_window": window, "transformers_version": "4.46.3",
            "key_query_norm": False, "key_query_norm_per_head": False, "is_neox_style": True}


def released_config(every_layer: bool = False) -> dict:
    """config.json as the public HATArchitectureConfig.to_dict writes it."""
    encoder = _stack(D_ENC, ENC_LAYERS, FF_ENC, 10000.0, WINDOW, 256)
    encoder["cross_attention_config"] = {
        "hidden_size_q": D_BB, "hidden_size_kv": D_ENC, "hidden_size": D_BB,
        "num_attention_heads": POOL_HEADS, "attention_num_kv_heads": POOL_HEADS,
        "word_window_size": 1,
        "key_query_norm": True, "key_query_norm_per_head": True}
    decoder = _stack(D_ENC, DEC_LAYERS, FF_ENC, 10000.0, WINDOW, 256)
    decoder["cross_attn_every_layer"] = every_layer
    decoder["cross_attention_config"] = {
        "hidden_size_q": D_ENC, "hidden_size_kv": D_BB, "hidden_size": D_ENC,
        "num_attention_heads": HEADS, "attention_num_kv_heads": KV, "word_window_size": 1,
        "key_query_norm": True, "key_query_norm_per_head": True}
    return {"encoder_config": encoder,
            "backbone_config": _stack(D_BB, BB_LAYERS, FF_BB, 500000.0, None, 0),
            "decoder_config": decoder,
            "model_type": "hierarchical_autoregressive_transformer",
            "transformers_version": "4.46.3",
            "auto_map": {"AutoConfig": "config.HATArchitectureConfig",
                         "AutoModelForCausalLM": "model.HATForCausalLM"},
            "special_token_dict": {"<|eot_id|>": 192}, "max_word_size": 16,
            "sliding_window": WINDOW, "max_position_embeddings": 262144,
            "torch_dtype": "bfloat16", "architectures": ["HATDecoderForCausalLM"]}


def _llama(prefix: str, d: int, ff: int) -> dict[str, tuple[int, ...]]:
    hd = d // HEADS
    return {f"{prefix}.input_layernorm.weight": (d,),
            f"{prefix}.post_attention_layernorm.weight": (d,),
            f"{prefix}.self_attn.q_proj.weight": (HEADS * hd, d),
            f"{prefix}.self_attn.k_proj.weight": (KV * hd, d),
            f"{prefix}.self_attn.v_proj.weight": (KV * hd, d),
            f"{prefix}.self_attn.o_proj.weight": (d, HEADS * hd),
            f"{prefix}.mlp.gate_proj.weight": (ff, d),
            f"{prefix}.mlp.up_proj.weight": (ff, d),
            f"{prefix}.mlp.down_proj.weight": (d, ff)}


def released_shapes(every_layer: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the public HATForCausalLM for `released_config`."""
    shapes = {"encoder.embedding_layer.weight": (256, D_ENC),
              "encoder_connector.latent_query": (1, 1, D_BB),
              "decoder_connector.first_word_embedding": (1, 1, D_BB),
              "layer_norm.weight": (D_ENC,), "lm_head.weight": (256, D_ENC)}
    for i in range(ENC_LAYERS):
        shapes |= _llama(f"encoder.layers.{i}", D_ENC, FF_ENC)
    for i in range(BB_LAYERS):
        shapes |= _llama(f"backbone.layers.{i}", D_BB, FF_BB)
    pool = "encoder_connector.cross_attention_encoder_connector"
    shapes |= {f"{pool}.q_proj.weight": (D_BB, D_BB), f"{pool}.k_proj.weight": (D_BB, D_ENC),
               f"{pool}.v_proj.weight": (D_BB, D_ENC), f"{pool}.o_proj.weight": (D_BB, D_BB),
               f"{pool}.norm_query.weight": (D_BB // POOL_HEADS,),
               f"{pool}.norm_key.weight": (D_BB // POOL_HEADS,)}
    hd = D_ENC // HEADS
    for i in range(DEC_LAYERS):
        block = f"decoder.decoder_layers.{i}"
        shapes |= _llama(f"{block}.llama_layer", D_ENC, FF_ENC)
        shapes |= {f"{block}.query_norm.weight": (D_ENC,), f"{block}.kv_norm.weight": (D_BB,)}
        if every_layer or i == 0:
            cross = f"{block}.cross_attention"
            shapes |= {f"{cross}.q_proj.weight": (D_ENC, D_ENC),
                       f"{cross}.k_proj.weight": (KV * hd, D_BB),
                       f"{cross}.v_proj.weight": (KV * hd, D_BB),
                       f"{cross}.o_proj.weight": (D_ENC, D_ENC),
                       f"{cross}.norm_query.weight": (hd,), f"{cross}.norm_key.weight": (hd,)}
    return shapes


def write_released(root: Path, dtype: torch.dtype = torch.bfloat16, every_layer: bool = False,
                   config: dict | None = None) -> dict[str, torch.Tensor]:
    """A tiny checkpoint in the released layout; norms near 1, projections small."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in sorted(released_shapes(every_layer).items()):
        if "norm" in name:
            value = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        tensors[name] = value.to(dtype)
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config or released_config(every_layer)))
    return tensors


@pytest.fixture
def released(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    return tmp_path / "released", write_released(tmp_path / "released")


# -- the public forward, restated in float64 --------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> list[float]:
    """Llama-3 scaled inverse frequencies, one by one in Python floats: wavelengths shorter
    than original / high_freq_factor keep their frequency, longer than original /
    low_freq_factor get it divided by factor, and in between the two are mixed linearly in
    ``original / wavelength``."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        freq = theta ** (-i / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            out.append(freq)
        elif wavelength > original / low:
            out.append(freq / factor)
        else:
            mix = (original / wavelength - low) / (high - low)
            out.append((1 - mix) * freq / factor + mix * freq)
    return out


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float,
          scaling: dict | None = None) -> torch.Tensor:
    """HF rotate_half RoPE; ``x [..., n, hd]`` at positions ``pos [n]``."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    if scaling is not None:
        inv = torch.tensor(llama3_inv_freq(hd, theta, scaling), dtype=torch.float64)
    ang = pos.double()[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attend(q, k, v, allowed):
    """q [H, n, hd], k/v [KV, m, hd] (GQA: head h reads kv head h // (H / KV))."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def _llama_layer(t, prefix, x, pos, theta, allowed, scaling=None):
    h = _rms(x, t[f"{prefix}.input_layernorm.weight"])
    hd = x.shape[-1] // HEADS
    q = (h @ t[f"{prefix}.self_attn.q_proj.weight"].T).view(-1, HEADS, hd).transpose(0, 1)
    k = (h @ t[f"{prefix}.self_attn.k_proj.weight"].T).view(-1, KV, hd).transpose(0, 1)
    v = (h @ t[f"{prefix}.self_attn.v_proj.weight"].T).view(-1, KV, hd).transpose(0, 1)
    out = _attend(_rope(q, pos, theta, scaling), _rope(k, pos, theta, scaling), v, allowed)
    x = x + out.transpose(0, 1).reshape(len(x), -1) @ t[f"{prefix}.self_attn.o_proj.weight"].T
    h = _rms(x, t[f"{prefix}.post_attention_layernorm.weight"])
    gate, up = h @ t[f"{prefix}.mlp.gate_proj.weight"].T, h @ t[f"{prefix}.mlp.up_proj.weight"].T
    mlp = F.silu(gate) * up
    return x + mlp @ t[f"{prefix}.mlp.down_proj.weight"].T


def public_forward(tensors: dict[str, torch.Tensor], data: list[int], word_lens: list[int],
                   pool_rope: bool = True, backbone_scaling: dict | None = None) -> torch.Tensor:
    """Logits [T, 256] of one document as HATForCausalLM computes them (float64);
    ``pool_rope=False`` leaves out the connector's RoPE (what a file marked
    ``aa_compile_pool_rope: false`` holds)."""
    t = {k: v.double() for k, v in tensors.items()}
    n, n_words = len(data), len(word_lens)
    bpos, wpos = torch.arange(n), torch.arange(n_words)
    word_of = torch.repeat_interleave(torch.arange(n_words), torch.tensor(word_lens))
    dist = bpos[:, None] - bpos[None, :]
    window = (dist >= 0) & (dist < WINDOW)
    x = t["encoder.embedding_layer.weight"][torch.tensor(data)]
    for i in range(ENC_LAYERS):
        x = _llama_layer(t, f"encoder.layers.{i}", x, bpos, 10000.0, window)
    h = x
    # encoder connector: one latent query per word over that word's bytes
    pool, hd = "encoder_connector.cross_attention_encoder_connector", D_BB // POOL_HEADS
    q = (t["encoder_connector.latent_query"].view(1, D_BB) @ t[f"{pool}.q_proj.weight"].T)
    q = _rms(q.view(1, POOL_HEADS, hd), t[f"{pool}.norm_query.weight"]).expand(n_words, -1, -1)
    k = _rms((h @ t[f"{pool}.k_proj.weight"].T).view(n, POOL_HEADS, hd),
             t[f"{pool}.norm_key.weight"])
    v = (h @ t[f"{pool}.v_proj.weight"].T).view(n, POOL_HEADS, hd)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if pool_rope:  # the encoder's rotary embedding (theta, head size) on both sides
        assert hd == D_ENC // HEADS
        q, k = _rope(q, wpos, 10000.0), _rope(k, bpos, 10000.0)
    words = _attend(q, k, v, word_of[None, :] == wpos[:, None])
    words = words.transpose(0, 1).reshape(n_words, D_BB) @ t[f"{pool}.o_proj.weight"].T
    for i in range(BB_LAYERS):
        words = _llama_layer(t, f"backbone.layers.{i}", words, wpos, 500000.0,
                             wpos[:, None] >= wpos[None, :], backbone_scaling)
    pred = torch.cat([t["decoder_connector.first_word_embedding"].view(1, D_BB), words[:-1]])
    hd = D_ENC // HEADS
    for i in range(DEC_LAYERS):
        block = f"decoder.decoder_layers.{i}"
        if f"{block}.cross_attention.v_proj.weight" in t:
            c = f"{block}.cross_attention"
            qx = _rms(x, t[f"{block}.query_norm.weight"]) @ t[f"{c}.q_proj.weight"].T
            kv_in = _rms(pred, t[f"{block}.kv_norm.weight"])
            cq = _rms(qx.view(n, HEADS, hd), t[f"{c}.norm_query.weight"]).transpose(0, 1)
            ck = _rms((kv_in @ t[f"{c}.k_proj.weight"].T).view(n_words, KV, hd),
                      t[f"{c}.norm_key.weight"]).transpose(0, 1)
            cv = (kv_in @ t[f"{c}.v_proj.weight"].T).view(n_words, KV, hd).transpose(0, 1)
            out = _attend(_rope(cq, bpos, 10000.0), _rope(ck, wpos, 10000.0), cv,
                          word_of[:, None] == wpos[None, :])
            x = x + out.transpose(0, 1).reshape(n, D_ENC) @ t[f"{c}.o_proj.weight"].T
        x = _llama_layer(t, f"{block}.llama_layer", x, bpos, 10000.0, window)
    return _rms(x, t["layer_norm.weight"]) @ t["lm_head.weight"].T


def _logits(model: HATModel, text: str) -> tuple[torch.Tensor, list[int], list[int]]:
    words = model.splitter.words(text)
    with torch.no_grad():
        logits = model(ByteBatch.from_words([words]))
    return logits, [b for w in words for b in w], [len(w) for w in words]


# -- loading ----------------------------------------------------------------------------------


def test_every_released_tensor_lands_in_the_named_parameter(released):
    root, tensors = released
    model = HATModel.from_pretrained(root)
    pairs = {  # written by hand from the two module trees
        "encoder.embedding_layer.weight": model.encoder.embed.weight,
        "encoder.layers.0.input_layernorm.weight": model.encoder.layers[0].attn_norm.weight,
        "encoder.layers.0.mlp.down_proj.weight": model.encoder.layers[0].mlp.down_proj.weight,
        "backbone.layers.1.self_attn.k_proj.weight": model.backbone[1].attn.k_proj.weight,
        "backbone.layers.0.post_attention_layernorm.weight": model.backbone[0].mlp_norm.weight,
        "encoder_connector.cross_attention_encoder_connector.norm_key.weight":
            model.pooling.k_norm.weight,
        "decoder.decoder_layers.1.llama_layer.self_attn.o_proj.weight":
            model.decoder.layers[1].attn.o_proj.weight,
        "decoder.decoder_layers.0.kv_norm.weight": model.decoder.guides[0].kv_norm.weight,
        "decoder.decoder_layers.0.cross_attention.v_proj.weight":
            model.decoder.guides[0].v_proj.weight,
        "layer_norm.weight": model.decoder.norm.weight,
        "lm_head.weight": model.decoder.lm_head.weight,
    }
    for name, param in pairs.items():
        assert param.dtype == torch.bfloat16 and torch.equal(param, tensors[name]), name
    assert torch.equal(model.pooling.latent_query, tensors["encoder_connector.latent_query"][0, 0])
    assert torch.equal(model.first_word,
                       tensors["decoder_connector.first_word_embedding"][0, 0])
    # every parameter is filled from the file: element counts add up to the mapped tensors
    mapped = sum(tensors[k].numel() for k in hf_key_map(model.config))
    assert mapped == sum(p.numel() for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_config_fields_are_read(released):
    root, _ = released
    cfg, specials = hat_config_from_hf(json.loads((root / "config.json").read_text()))
    assert (cfg.d_enc, cfg.d_backbone, cfg.encoder.n_layers, cfg.backbone.n_layers,
            cfg.decoder.n_layers) == (D_ENC, D_BB, ENC_LAYERS, BB_LAYERS, DEC_LAYERS)
    assert (cfg.sliding_window, cfg.pool_heads, cfg.pool_qk_norm, cfg.guide_every_layer,
            cfg.max_word_bytes, cfg.eos_byte) == (WINDOW, POOL_HEADS, True, False, 16, 192)
    assert cfg.pool_rope is True and cfg.backbone_rope_scaling is None
    assert (cfg.backbone.rope_theta, cfg.backbone.kv_heads, cfg.backbone.ffn_dim,
            cfg.encoder.norm_eps) == (500000.0, KV, FF_BB, 1e-5)
    assert specials == {"<|eot_id|>": 192}


@pytest.mark.parametrize("every_layer", [False, True])
def test_forward_matches_the_public_forward(tmp_path, every_layer, recwarn):
    """The loaded model computes the released forward, pooling RoPE included, and the load
    warns nothing."""
    tensors = write_released(tmp_path / "ckpt", torch.float32, every_layer)
    model = HATModel.from_pretrained(tmp_path / "ckpt")
    assert model.config.guide_every_layer is every_layer and model.config.pool_rope
    assert not [w for w in recwarn if issubclass(w.category, HATCheckpointWarning)]
    logits, data, lens = _logits(model, TEXT)
    assert len(data) > WINDOW and len(lens) > 3  # the window and the word shift both matter
    expected = public_forward(tensors, data, lens)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    # the pooling RoPE is not a rounding detail: without it the logits are far off
    assert (public_forward(tensors, data, lens, pool_rope=False) - expected).abs().max() > 1e-2


def test_forward_matches_with_llama3_backbone_rope_scaling(tmp_path):
    """``rope_scaling`` of type llama3 on the backbone is read and applied as restated by hand
    (`llama3_inv_freq`), and it changes the logits at these few word positions."""
    config = released_config()
    config["backbone_config"]["rope_scaling"] = dict(LLAMA3)
    tensors = write_released(tmp_path / "ckpt", torch.float32, config=config)
    model = HATModel.from_pretrained(tmp_path / "ckpt")
    assert model.config.backbone_rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    logits, data, lens = _logits(model, TEXT)
    expected = public_forward(tensors, data, lens, backbone_scaling=LLAMA3)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    assert (public_forward(tensors, data, lens) - expected).abs().max() > 1e-3
    with torch.no_grad():  # generation reads the same scaling (cached == uncached)
        assert model.generate_bytes("Hi you", max_bytes=6) == \
            model.generate_bytes("Hi you", max_bytes=6, use_cache=False)


def test_a_file_marked_without_pooling_rope_runs_without_it(tmp_path):
    """What our save writes for a model without pooling RoPE: the mark turns it off."""
    config = released_config()
    config[POOL_ROPE_MARK] = False
    tensors = write_released(tmp_path / "ckpt", torch.float32, config=config)
    model = HATModel.from_pretrained(tmp_path / "ckpt")
    assert model.config.pool_rope is False
    logits, data, lens = _logits(model, TEXT)
    torch.testing.assert_close(logits.double(), public_forward(tensors, data, lens, False),
                               rtol=1e-4, atol=1e-4)


def test_dtypes_as_stored_or_converted(released, tmp_path):
    root, tensors = released
    assert HATModel.from_pretrained(root).first_word.dtype == torch.bfloat16
    fp32 = HATModel.from_pretrained(root, dtype="float32")
    assert fp32.decoder.lm_head.weight.dtype == torch.float32
    assert torch.equal(fp32.decoder.lm_head.weight, tensors["lm_head.weight"].float())
    write_released(tmp_path / "f32", torch.float32)
    assert HATModel.from_pretrained(tmp_path / "f32", dtype=torch.bfloat16) \
        .encoder.embed.weight.dtype == torch.bfloat16


def test_builds_on_meta_and_never_unpickles(released, monkeypatch):
    root, _ = released
    devices = []
    original = HATModel.reset_parameters

    def record(self, std=0.02):
        devices.append(self.first_word.device.type)
        original(self, std)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(HATModel, "reset_parameters", record)
    monkeypatch.setattr(torch, "load", no_pickle)
    model = HATModel.from_pretrained(root)
    assert devices == ["meta"]
    assert model.first_word.device.type == "cpu"


def test_generates_with_the_loaded_model(released):
    root, _ = released
    model = HATModel.from_pretrained(root, dtype="float32")
    cached = model.generate_bytes("Hello there", max_bytes=6)
    assert cached == model.generate_bytes("Hello there", max_bytes=6, use_cache=False)
    assert isinstance(model.generate("Hello there", max_bytes=6), str)


# -- saving -----------------------------------------------------------------------------------


def _assert_same_files(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(ta[name].view(torch.uint8), tb[name].view(torch.uint8)), name
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert config_a == config_b


def test_load_save_is_bit_exact(released, tmp_path):
    root, _ = released
    HATModel.from_pretrained(root).save_pretrained(tmp_path / "again")
    _assert_same_files(root, tmp_path / "again")


def test_sharded_round_trip(released, tmp_path):
    root, _ = released
    files = HATModel.from_pretrained(root).save_pretrained(tmp_path / "sharded",
                                                           max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert {f.name for f in files} >= set(shards)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    HATModel.from_pretrained(tmp_path / "sharded").save_pretrained(tmp_path / "single")
    _assert_same_files(root, tmp_path / "single")


@pytest.mark.parametrize("every_layer, overrides", [
    (False, {}), (True, {}),
    # the released features: pooling RoPE (pooling head size 96 / 6 = 16, the encoder's) and
    # the backbone's Llama-3 RoPE scaling
    (False, {"pool_rope": True, "pool_heads": 6,
             "backbone_rope_scaling": Llama3RopeScaling(8.0, 1.0, 4.0, 64)}),
])
def test_fresh_model_round_trip(tmp_path, every_layer, overrides):
    model = HATModel(HATConfig.tiny(guide_every_layer=every_layer, **overrides))
    model.save_pretrained(tmp_path / "m")
    names = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert names == set(released_shapes_for(model.config))
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (POOL_ROPE_MARK in raw) is (not model.config.pool_rope)
    assert raw["backbone_config"]["rope_scaling"] == (LLAMA3 if overrides else None)
    again = HATModel.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    batch = ByteBatch.from_words([model.splitter.words(TEXT)])
    with torch.no_grad():
        assert torch.equal(model(batch), again(batch))


def released_shapes_for(cfg: HATConfig) -> set[str]:
    """Tensor names of the public model for a tiny config of ours (no decoder qk norm)."""
    names = {"encoder.embedding_layer.weight", "encoder_connector.latent_query",
             "decoder_connector.first_word_embedding", "layer_norm.weight", "lm_head.weight"}
    pool = "encoder_connector.cross_attention_encoder_connector"
    names |= {f"{pool}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                              "norm_query", "norm_key")}
    layer = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
             "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    for prefix, n in (("encoder.layers", cfg.encoder.n_layers),
                      ("backbone.layers", cfg.backbone.n_layers)):
        names |= {f"{prefix}.{i}.{p}.weight" for i in range(n) for p in layer}
    for i in range(cfg.decoder.n_layers):
        block = f"decoder.decoder_layers.{i}"
        names |= {f"{block}.llama_layer.{p}.weight" for p in layer}
        names |= {f"{block}.query_norm.weight", f"{block}.kv_norm.weight"}
        if cfg.guide_every_layer or i == 0:
            names |= {f"{block}.cross_attention.{p}.weight"
                      for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return names


# -- bad input --------------------------------------------------------------------------------


def test_other_architecture_is_refused(tmp_path, released):
    root, _ = released
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type='llama' is not a HAT checkpoint"):
        HATModel.from_pretrained(root)
    (root / "config.json").write_text(json.dumps({"format": "aa-compile-model", "kind": "hat"}))
    with pytest.raises(ValueError, match="load_model"):
        HATModel.from_pretrained(root)


def test_missing_shard(released, tmp_path):
    root, _ = released
    HATModel.from_pretrained(root).save_pretrained(tmp_path / "s", max_shard_bytes=20_000)
    sorted((tmp_path / "s").glob("model-00002-of-*.safetensors"))[0].unlink()
    with pytest.raises(ValueError, match="shard\\(s\\) that do not exist: model-00002-of"):
        HATModel.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_weight_file(released, damage):
    root, _ = released
    path = root / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PK\x03\x04" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        HATModel.from_pretrained(root)


def test_missing_unexpected_and_misshapen_tensors_are_named(released):
    root, tensors = released
    path = root / "model.safetensors"
    gone = dict(tensors)
    del gone["backbone.layers.1.mlp.up_proj.weight"]
    save_file(gone, str(path))
    with pytest.raises(ValueError, match="missing tensor\\(s\\): backbone.layers.1.mlp.up_proj"):
        HATModel.from_pretrained(root)
    save_file({**tensors, "backbone.norm.weight": torch.ones(D_BB)}, str(path))
    with pytest.raises(ValueError, match="unexpected tensor\\(s\\).*backbone.norm.weight"):
        HATModel.from_pretrained(root)
    save_file({**tensors, "lm_head.weight": torch.zeros(255, D_ENC, dtype=torch.bfloat16)},
              str(path))
    with pytest.raises(ValueError, match="'lm_head.weight' has shape \\(255, 32\\)"):
        HATModel.from_pretrained(root)


def test_dtype_requests_and_stored_dtypes(released):
    root, tensors = released
    for bad in (torch.float16, "int8", torch.int8, 32):
        with pytest.raises(ValueError, match="dtype must be"):
            HATModel.from_pretrained(root, dtype=bad)
    save_file({k: v.half() for k, v in tensors.items()}, str(root / "model.safetensors"))
    with pytest.raises(ValueError, match="torch.float16.*only bfloat16 and float32"):
        HATModel.from_pretrained(root)
    mixed = {k: (v.float() if k == "lm_head.weight" else v) for k, v in tensors.items()}
    save_file(mixed, str(root / "model.safetensors"))
    with pytest.raises(ValueError, match="mixed dtypes"):
        HATModel.from_pretrained(root)
    assert HATModel.from_pretrained(root, dtype="float32").first_word.dtype == torch.float32


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["backbone_config"].update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "backbone_config.rope_scaling.*lacks low_freq_factor, high_freq_factor, original_max"),
    (lambda c: c["backbone_config"].update(rope_scaling={**LLAMA3, "rope_type": "yarn"}),
     "backbone_config.rope_scaling.*type 'yarn' is not supported"),
    (lambda c: c["backbone_config"].update(rope_scaling={**LLAMA3, "high_freq_factor": 1.0}),
     "high_freq_factor=1.0 must be larger than low_freq_factor"),
    (lambda c: c["encoder_config"].update(rope_scaling=dict(LLAMA3)),
     "encoder_config.rope_scaling=.*backbone only"),
    (lambda c: c["encoder_config"]["cross_attention_config"].update(num_attention_heads=4,
                                                                   attention_num_kv_heads=4),
     "pooling head size \\(12 = .*must equal the encoder's \\(8\\)"),
    (lambda c: c.update({POOL_ROPE_MARK: "no"}), "aa_compile_pool_rope must be true or false"),
    (lambda c: c["encoder_config"]["cross_attention_config"].update(attention_num_kv_heads=2),
     "attention_num_kv_heads=2 is not supported"),
    (lambda c: c["decoder_config"].update(sliding_window=16), "sliding windows must be"),
    (lambda c: c["encoder_config"].update(vocab_size=300), "vocab_size must be 256"),
    (lambda c: c["decoder_config"].update(mlp_bias=True), "mlp_bias=True is not supported"),
    (lambda c: c.pop("decoder_config"), "decoder_config is missing"),
])
def test_unsupported_config_fields_are_named(released, edit, match):
    root, _ = released
    cfg = released_config()
    edit(cfg)
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        HATModel.from_pretrained(root)


def test_bad_paths_and_save_arguments(tmp_path, released):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        HATModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(released_config()))
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        HATModel.from_pretrained(tmp_path / "empty")
    model = HATModel.from_pretrained(released[0])
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="max_shard_bytes"):
            model.save_pretrained(tmp_path / "x", max_shard_bytes=bad)


def test_save_refuses_pool_rope_without_the_encoder_head_size(tmp_path):
    model = HATModel(HATConfig.tiny(pool_rope=True))  # pooling head size 24, encoder's 16
    with pytest.raises(ValueError, match="pooling head size \\(24\\) unlike the encoder's"):
        model.save_pretrained(tmp_path / "m")


def test_cli_generate_reads_a_released_folder(released, capsys):
    """``aa-compile generate --checkpoint`` takes the released layout as it is and prints
    what the loaded model generates."""
    from aa_compile import cli

    root, _ = released
    expected = HATModel.from_pretrained(root).generate("ab", max_bytes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HATCheckpointWarning)
        rc = cli.main(["generate", "--checkpoint", str(root), "--prompt", "ab",
                       "--max-new-tokens", "4", "--threads", "1"])
    assert rc == 0
    assert expected in capsys.readouterr().out
