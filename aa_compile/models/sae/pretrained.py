"""Released SCAR checkpoints (``AIML-TUDA/SCAR``, Hugging Face layout) read into and written
from `SparseAutoencoder`.

The released model is the public remote code's ``LLama3_SAE``: a whole Llama-3-8B
(``model.*``, ``lm_head.weight``) plus one autoencoder under ``SAE.`` and the SAE fields in
``config.json`` (model_type ``llama3_SAE``: ``n_inputs``, ``n_latents``, ``activation``,
``activation_k``, ``hook_block_num``, ``site``, ``base_model_name``). `load_scar` reads only
the ``SAE.*`` tensors (the base model stays on disk: load it with transformers and attach the
SAE at `ScarCheckpoint.site`) and maps them strictly:

    SAE.pre_bias        -> pre_bias          SAE.encoder.weight -> encoder.weight
    SAE.latent_bias     -> latent_bias       SAE.decoder.weight -> decoder.weight
    SAE.threshold       -> log_threshold     (jumprelu: the released code uses exp(threshold))

The released code always normalises the input per token (``normalize=True`` is hard-coded
whatever ``config.json`` says), so the SAE is built with ``normalize=True``. `save_scar` writes
the same layout with the ``SAE.*`` tensors only. Differences that no mapping bridges are listed
in docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from aa_compile.models.hf_files import (
    CONFIG_FILE,
    INDEX_FILE,
    WEIGHTS_FILE,
    checked_dtype,
    fail,
    parse_dtype,
    read_json,
    read_tensors,
)

from .model import SAEConfig, SparseAutoencoder

MODEL_TYPE = "llama3_SAE"
PREFIX = "SAE."
#: dtypes a SCAR checkpoint may hold (the released one is float16) and a load may ask for
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: released activation name -> ours (``topk-tanh`` and ``identity`` have no counterpart here)
ACTIVATIONS = {"topk": "topk", "topk-sigmoid": "topk-sigmoid", "jumprelu": "jumprelu",
               "relu": "relu"}
#: released site name -> our site kind (`aa_compile.sae.sites`)
SITES = {"mlp": "mlp", "block": "block"}


@dataclasses.dataclass
class ScarCheckpoint:
    """A loaded released SAE: the autoencoder, the site it reads (``"mlp.25"``: layer 25's
    feed-forward output), the base model it was trained on and the config as read."""

    sae: SparseAutoencoder
    site: str
    base_model: str
    config: dict[str, Any]


def _mapping(cfg: SAEConfig) -> dict[str, str]:
    names = {f"{PREFIX}pre_bias": "pre_bias", f"{PREFIX}encoder.weight": "encoder.weight",
             f"{PREFIX}latent_bias": "latent_bias", f"{PREFIX}decoder.weight": "decoder.weight"}
    if cfg.activation == "jumprelu":
        names[f"{PREFIX}threshold"] = "log_threshold"
    return names


def scar_config_from_hf(raw: Mapping[str, Any], where: Path | str = CONFIG_FILE,
                        n_concepts: int = 1) -> tuple[SAEConfig, str]:
    """`SAEConfig` and our site name of a released ``config.json`` (as a dict)."""
    if not isinstance(raw, Mapping):
        raise fail(where, "the config must be a JSON object")
    if raw.get("model_type") != MODEL_TYPE:
        raise fail(where, f"model_type={raw.get('model_type')!r} is not a SCAR checkpoint "
                          f"(expected {MODEL_TYPE!r})")
    missing = [k for k in ("n_inputs", "n_latents", "activation", "hook_block_num")
               if k not in raw]
    if missing:
        raise fail(where, f"lacks {', '.join(missing)}")
    activation = raw["activation"]
    if activation not in ACTIVATIONS:
        raise fail(where, f"activation={activation!r} is not supported (supported: "
                          f"{', '.join(ACTIVATIONS)})")
    site_kind = raw.get("site", "mlp")
    if site_kind not in SITES:
        raise fail(where, f"site={site_kind!r} is not supported (supported: {', '.join(SITES)})")
    block = raw["hook_block_num"]
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise fail(where, f"hook_block_num must be an int >= 0, got {block!r}")
    hidden = raw.get("hidden_size")
    if hidden is not None and hidden != raw["n_inputs"]:
        raise fail(where, f"n_inputs={raw['n_inputs']!r} must equal hidden_size={hidden!r} "
                          "(the SAE reads a hidden-size activation)")
    try:
        cfg = SAEConfig(n_inputs=raw["n_inputs"], n_latents=raw["n_latents"],
                        k=raw.get("activation_k", 64), activation=ACTIVATIONS[activation],
                        n_concepts=n_concepts, normalize=True)
    except (TypeError, ValueError) as exc:
        raise fail(where, str(exc)) from exc
    return cfg, f"{SITES[site_kind]}.{block}"


def load_scar(path: Path | str, dtype: torch.dtype | str | None = None,
              n_concepts: int = 1) -> ScarCheckpoint:
    """The autoencoder of a released SCAR checkpoint directory (see the module docstring).
    ``dtype`` None keeps the stored dtype (it must be uniform across the SAE tensors);
    ``n_concepts`` conditioned latents come first (SCAR: latent 0)."""
    root = Path(path)
    target = parse_dtype(dtype, DTYPES)
    if not root.is_dir():
        raise fail(root, "is not a checkpoint directory")
    raw = read_json(root / CONFIG_FILE)
    cfg, site = scar_config_from_hf(raw, root / CONFIG_FILE, n_concepts)
    tensors = read_tensors(root, select=lambda name: name.startswith(PREFIX))
    mapping = _mapping(cfg)
    target = checked_dtype(root, tensors, mapping, DTYPES, target,
                           model=f"a {cfg.activation} SAE")
    with torch.device("meta"):
        sae = SparseAutoencoder(cfg)
    own = sae.state_dict()
    state: dict[str, Tensor] = {}
    for theirs, mine in mapping.items():
        if tensors[theirs].shape != own[mine].shape:
            raise fail(root, f"tensor {theirs!r} has shape {tuple(tensors[theirs].shape)}, the "
                             f"config implies {tuple(own[mine].shape)}")
        state[mine] = tensors[theirs].to(target)
    sae.load_state_dict(state, strict=True, assign=True)
    return ScarCheckpoint(sae, site, str(raw.get("base_model_name", "")), dict(raw))


def save_scar(sae: SparseAutoencoder, path: Path | str, site: str, base_model: str = "",
              config: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``sae`` in the released layout (``SAE.*`` tensors only; the base model is not
    written). ``config``: a released config.json dict to keep (its SAE fields are replaced),
    e.g. `ScarCheckpoint.config`; by default a minimal one. Returns the files written."""
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"save_scar expects a SparseAutoencoder, got {type(sae).__name__}")
    cfg = sae.config
    if not cfg.normalize:
        raise ValueError("the released SCAR code always normalises its input: an SAE with "
                         "normalize=False would run differently there")
    kind, _, block = site.partition(".") if isinstance(site, str) else ("", "", "")
    if kind not in SITES.values() or not block.isdigit():
        raise ValueError(f"site must be 'mlp.<layer>' or 'block.<layer>', got {site!r}")
    released_activation = {v: k for k, v in ACTIVATIONS.items()}[cfg.activation]
    raw = dict(config) if config is not None else {
        "architectures": ["LLama3_SAE"], "model_type": MODEL_TYPE, "tied": False,
        "normalize": True}
    raw.update({"base_model_name": base_model or raw.get("base_model_name", ""),
                "n_inputs": cfg.n_inputs, "n_latents": cfg.n_latents,
                "activation": released_activation, "activation_k": cfg.k,
                "hook_block_num": int(block), "site": kind})
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / INDEX_FILE).unlink(missing_ok=True)
    (root / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    own = sae.state_dict()
    tensors = {theirs: own[mine].detach().cpu().contiguous()
               for theirs, mine in _mapping(cfg).items()}
    save_file(tensors, str(root / WEIGHTS_FILE), metadata={"format": "pt"})
    return [root / CONFIG_FILE, root / WEIGHTS_FILE]
