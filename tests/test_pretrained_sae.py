"""Released SCAR checkpoints (``LLama3_SAE`` Hugging Face layout) <-> `SparseAutoencoder`.

The fixture writes a tiny checkpoint by hand in the public layout (a Llama base under
``model.*`` / ``lm_head``, the autoencoder under ``SAE.``, float16, config.json fields of
``LLama3_SAE_Config``). The forward is checked against a float64 restatement of the public
``Autoencoder`` written here from the ``SAE.*`` tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aa_compile.models.hat.pretrained import MODEL_TYPE as HAT_MODEL_TYPE
from aa_compile.models.sae import SAEConfig, SparseAutoencoder
from aa_compile.models.sae.pretrained import load_scar, save_scar

N_IN, N_LAT, K, BLOCK = 16, 48, 6, 3


def released_config(activation: str = "topk") -> dict:
    return {"_name_or_path": "AIML-TUDA/SCAR", "activation": activation, "activation_k": K,
            "architectures": ["LLama3_SAE"], "base_model_name": "meta-llama/Meta-Llama-3-8B",
            "hidden_act": "silu", "hidden_size": N_IN, "hook_block_num": BLOCK,
            "intermediate_size": 32, "model_type": "llama3_SAE", "n_inputs": N_IN,
            "n_latents": N_LAT, "normalize": False, "num_attention_heads": 2,
            "num_hidden_layers": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
            "site": "mlp", "tied": False, "torch_dtype": "float16", "vocab_size": 10}


def released_tensors(activation: str = "topk") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    t = {"model.embed_tokens.weight": torch.randn(10, N_IN, generator=gen),
         "model.norm.weight": torch.ones(N_IN),
         "lm_head.weight": torch.randn(10, N_IN, generator=gen),
         "SAE.pre_bias": 0.1 * torch.randn(N_IN, generator=gen),
         "SAE.encoder.weight": torch.randn(N_LAT, N_IN, generator=gen) / 4,
         "SAE.latent_bias": 0.1 * torch.randn(N_LAT, generator=gen),
         "SAE.decoder.weight": torch.randn(N_IN, N_LAT, generator=gen) / 7}
    if activation == "jumprelu":
        t["SAE.threshold"] = torch.full((N_LAT,), -1.0) + 0.1 * torch.randn(N_LAT, generator=gen)
    return {k: v.half() for k, v in t.items()}


def write_released(root: Path, activation: str = "topk", tensors: dict | None = None,
                   config: dict | None = None) -> dict[str, torch.Tensor]:
    tensors = released_tensors(activation) if tensors is None else tensors
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config or released_config(activation)))
    return tensors


def public_sae(t: dict[str, torch.Tensor], x: torch.Tensor, activation: str):
    """pre-activations, latents, reconstruction of the public Autoencoder (float64)."""
    t = {k: v.double() for k, v in t.items()}
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5)
    pre = (xn - t["SAE.pre_bias"]) @ t["SAE.encoder.weight"].T + t["SAE.latent_bias"]
    if activation == "topk":
        top = pre.topk(K, dim=-1)
        lat = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:  # jumprelu: relu, then keep what exceeds exp(threshold)
        r = pre.relu()
        lat = r * (r > t["SAE.threshold"].exp())
    recons = (lat @ t["SAE.decoder.weight"].T + t["SAE.pre_bias"]) * std + mu
    return pre, lat, recons


def test_maps_the_sae_tensors_and_config(tmp_path):
    tensors = write_released(tmp_path / "scar")
    ck = load_scar(tmp_path / "scar")
    assert ck.site == f"mlp.{BLOCK}" and ck.base_model == "meta-llama/Meta-Llama-3-8B"
    cfg = ck.sae.config
    assert (cfg.n_inputs, cfg.n_latents, cfg.k, cfg.activation, cfg.normalize,
            cfg.n_concepts) == (N_IN, N_LAT, K, "topk", True, 1)
    assert ck.sae.encoder.weight.dtype == torch.float16
    assert torch.equal(ck.sae.encoder.weight, tensors["SAE.encoder.weight"])
    assert torch.equal(ck.sae.decoder.weight, tensors["SAE.decoder.weight"])
    assert torch.equal(ck.sae.pre_bias, tensors["SAE.pre_bias"])
    assert torch.equal(ck.sae.latent_bias, tensors["SAE.latent_bias"])
    assert load_scar(tmp_path / "scar", dtype="float32").sae.pre_bias.dtype == torch.float32


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_forward_matches_the_public_autoencoder(tmp_path, activation):
    tensors = write_released(tmp_path / "scar", activation)
    sae = load_scar(tmp_path / "scar", dtype=torch.float32).sae
    if activation == "jumprelu":
        assert torch.equal(sae.log_threshold, tensors["SAE.threshold"].float())
    x = 3 * torch.randn(5, N_IN, generator=torch.Generator().manual_seed(2)) + 0.5
    pre, lat, recons = public_sae(tensors, x.double(), activation)
    with torch.no_grad():
        out = sae(x)
    torch.testing.assert_close(out.pre_acts.double(), pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.latents.double(), lat, rtol=1e-5, atol=1e-5)
    assert (lat > 0).sum() > 0
    # the reconstruction differs by the de-normalisation eps (ours: std + 1e-5; theirs: std)
    torch.testing.assert_close(out.recons.double(), recons, rtol=1e-4, atol=1e-4)


def test_reads_only_the_sae_shards(tmp_path):
    """The base model's shard is never opened: here it is not even a safetensors file."""
    root = tmp_path / "sharded"
    root.mkdir()
    tensors = released_tensors()
    sae_part = {k: v for k, v in tensors.items() if k.startswith("SAE.")}
    save_file(sae_part, str(root / "model-00002-of-00002.safetensors"))
    (root / "model-00001-of-00002.safetensors").write_bytes(b"not a tensor file")
    weight_map = {k: ("model-00002-of-00002.safetensors" if k.startswith("SAE.")
                      else "model-00001-of-00002.safetensors") for k in tensors}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(released_config()))
    assert torch.equal(load_scar(root).sae.decoder.weight, tensors["SAE.decoder.weight"])
    (root / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard\\(s\\) that do not exist: model-00001"):
        load_scar(root)


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_load_save_is_bit_exact(tmp_path, activation):
    tensors = write_released(tmp_path / "scar", activation)
    ck = load_scar(tmp_path / "scar")
    save_scar(ck.sae, tmp_path / "again", ck.site, config=ck.config)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(again) == sorted(k for k in tensors if k.startswith("SAE."))
    for name, value in again.items():
        assert value.dtype == tensors[name].dtype
        assert torch.equal(value.view(torch.uint8), tensors[name].view(torch.uint8)), name
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == released_config(
        activation)


def test_fresh_sae_round_trip(tmp_path):
    sae = SparseAutoencoder(SAEConfig(N_IN, N_LAT, k=K, n_concepts=1))
    save_scar(sae, tmp_path / "s", "block.7", base_model="tiny")
    ck = load_scar(tmp_path / "s")
    assert ck.site == "block.7" and ck.base_model == "tiny" and ck.sae.config == sae.config
    for (k, a), (_, b) in zip(sae.state_dict().items(), ck.sae.state_dict().items()):
        assert torch.equal(a, b), k


def test_other_architectures_are_refused(tmp_path):
    write_released(tmp_path / "x", config={"model_type": "llama", "hidden_size": N_IN})
    with pytest.raises(ValueError, match="model_type='llama' is not a SCAR checkpoint"):
        load_scar(tmp_path / "x")
    write_released(tmp_path / "h", config={"model_type": HAT_MODEL_TYPE})
    with pytest.raises(ValueError, match="not a SCAR checkpoint"):
        load_scar(tmp_path / "h")


def test_missing_unexpected_and_misshapen_sae_tensors(tmp_path):
    tensors = released_tensors()
    write_released(tmp_path / "a", tensors={k: v for k, v in tensors.items()
                                            if k != "SAE.latent_bias"})
    with pytest.raises(ValueError, match="missing tensor\\(s\\): SAE.latent_bias"):
        load_scar(tmp_path / "a")
    write_released(tmp_path / "b", tensors={**tensors, "SAE.threshold": torch.zeros(N_LAT)})
    with pytest.raises(ValueError, match="unexpected tensor\\(s\\).*SAE.threshold"):
        load_scar(tmp_path / "b")
    write_released(tmp_path / "c", tensors={**tensors,
                                            "SAE.decoder.weight": torch.zeros(N_LAT, N_IN).half()})
    with pytest.raises(ValueError, match="'SAE.decoder.weight' has shape \\(48, 16\\)"):
        load_scar(tmp_path / "c")


def test_broken_files_and_dtypes(tmp_path):
    write_released(tmp_path / "s")
    path = tmp_path / "s" / "model.safetensors"
    data = path.read_bytes()
    for bad in (torch.int8, "float64", 16):
        with pytest.raises(ValueError, match="dtype must be"):
            load_scar(tmp_path / "s", dtype=bad)
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_scar(tmp_path / "s")
    tensors = released_tensors()
    write_released(tmp_path / "m", tensors={**tensors, "SAE.pre_bias": torch.zeros(N_IN)})
    with pytest.raises(ValueError, match="mixed dtypes"):
        load_scar(tmp_path / "m")
    write_released(tmp_path / "d", tensors={k: v.double() for k, v in tensors.items()})
    with pytest.raises(ValueError, match="torch.float64"):
        load_scar(tmp_path / "d")


@pytest.mark.parametrize("edit, match", [
    ({"activation": "topk-tanh"}, "activation='topk-tanh' is not supported"),
    ({"site": "attention"}, "site='attention' is not supported"),
    ({"hidden_size": 32}, "n_inputs=16 must equal hidden_size=32"),
    ({"activation_k": 100}, "k=100 exceeds n_latents=48"),
    ({"hook_block_num": -1}, "hook_block_num must be an int >= 0"),
])
def test_unsupported_config_fields(tmp_path, edit, match):
    write_released(tmp_path / "s", config={**released_config(), **edit})
    with pytest.raises(ValueError, match=match):
        load_scar(tmp_path / "s")


def test_save_arguments(tmp_path):
    sae = SparseAutoencoder(SAEConfig(N_IN, N_LAT, k=K))
    for site in ("mlp", "attn.3", "block.x", 3):
        with pytest.raises(ValueError, match="site must be"):
            save_scar(sae, tmp_path / "s", site)
    with pytest.raises(ValueError, match="always normalises"):
        save_scar(SparseAutoencoder(SAEConfig(N_IN, N_LAT, k=K, normalize=False)),
                  tmp_path / "s", "mlp.1")
    with pytest.raises(TypeError, match="expects a SparseAutoencoder"):
        save_scar(torch.nn.Linear(2, 2), tmp_path / "s", "mlp.1")
