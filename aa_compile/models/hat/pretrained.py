"""Aleph Alpha's released HAT checkpoints (Hugging Face layout) read into and written from
`HATModel`.

The layout is that of the public remote code (``HATForCausalLM`` + ``HATArchitectureConfig``):

    DIR/config.json                    model_type "hierarchical_autoregressive_transformer",
                                       encoder_config / backbone_config / decoder_config (Llama
                                       fields, the connectors' cross_attention_config),
                                       special_token_dict, max_word_size, sliding_window, ...
    DIR/model.safetensors              every tensor, or
    DIR/model.safetensors.index.json   {"metadata": {...}, "weight_map": {name: shard file}}
    DIR/model-0000i-of-0000n.safetensors

`hf_key_map` names every released tensor and the parameter of ours it becomes. The mapping is
strict: a missing or unexpected tensor, a shape that the config does not imply, or a config
field our reference cannot represent is a ValueError that names it. Tensors of the released
model that provably have no effect (the decoder's cross-attention query side: each byte attends
to exactly one key, so the softmax is 1) are checked, kept on the model as ``hf_source.inert``
and written back, so that load -> save is bit-exact.

Loading builds the model on the meta device and assigns the tensors that `safe_open` maps from
the files (no copy when the stored dtype is the one asked for), so an 8B checkpoint does not need
twice its size in memory. Files are read with safetensors only (never pickle).

The released forward has two features our default model leaves out, and the loader turns them
on: RoPE in the word pooling (``HATConfig.pool_rope``) and the backbone's Llama-3 RoPE scaling
(``HATConfig.backbone_rope_scaling``). A model of ours without pooling RoPE is saved with the
top-level mark ``"aa_compile_pool_rope": false`` (`POOL_ROPE_MARK`), so that it loads back as
it was; the released files have no mark. Differences that no loader setting bridges would be
listed in `RELEASED_DIFFERENCES` and warned as a `HATCheckpointWarning` on load (none now).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

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
from aa_compile.models.transformer import TransformerConfig

from .config import BYTE_VOCAB, HATConfig
from .rope import Llama3RopeScaling
from .splitter import HATByteSplitter

MODEL_TYPE = "hierarchical_autoregressive_transformer"
#: dtypes a checkpoint may hold and a load may ask for
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: top-level constants the public config writes (and our save writes for a fresh model)
DEFAULT_MAX_POSITIONS = 262144
TRANSFORMERS_VERSION = "4.46.3"
AUTO_MAP = {"AutoConfig": "config.HATArchitectureConfig",
            "AutoModelForCausalLM": "model.HATForCausalLM"}
ARCHITECTURES = ["HATDecoderForCausalLM"]

#: forward differences of the released code that no weight mapping or config setting bridges
#: (warned on every load; the pooling RoPE was one until ``HATConfig.pool_rope``)
RELEASED_DIFFERENCES: tuple[str, ...] = ()
#: top-level config.json key our save writes for a model without pooling RoPE (the released
#: connector always rotates; the public config class keeps unknown top-level keys)
POOL_ROPE_MARK = "aa_compile_pool_rope"


class HATCheckpointWarning(UserWarning):
    """A released checkpoint loaded, but our forward differs from the released one."""


@dataclasses.dataclass
class HFSource:
    """Where a model loaded by `load_hat_pretrained` came from: the directory, the released
    config as read, the tensors kept only for a bit-exact save, and the known differences."""

    path: Path
    config: dict[str, Any]
    inert: dict[str, Tensor]
    differences: tuple[str, ...] = RELEASED_DIFFERENCES


# -- config ---------------------------------------------------------------------------------


def _default_rope(raw: Mapping[str, Any]) -> bool:
    return raw.get("rope_scaling") in (None, {"rope_type": "default"}, {"type": "default"})


def _backbone_rope_scaling(raw: Mapping[str, Any], where: Path | str
                           ) -> Llama3RopeScaling | None:
    """The backbone's ``rope_scaling``: None (or type default), or a ``llama3`` scaling."""
    if _default_rope(raw):
        return None
    try:
        return Llama3RopeScaling.from_hf(raw["rope_scaling"])
    except (TypeError, ValueError) as exc:
        raise fail(where, f"backbone_config.rope_scaling={raw['rope_scaling']!r} is not "
                          f"supported: {exc}") from exc


def _stack_config(raw: Mapping[str, Any], name: str, where: Path | str,
                  byte_vocab: bool) -> TransformerConfig:
    """One of the three Llama stacks; every field our blocks cannot reproduce is an error
    (the backbone's ``rope_scaling`` is read by `_backbone_rope_scaling`)."""
    if not isinstance(raw, Mapping):
        raise fail(where, f"{name} must be an object, got {type(raw).__name__}")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "intermediate_size", "rope_theta")
    missing = [k for k in required if k not in raw]
    if missing:
        raise fail(where, f"{name} lacks {', '.join(missing)}")
    unsupported = {
        "rope_scaling": (name == "backbone_config" or _default_rope(raw),
                         "RoPE scaling is implemented for the backbone only"),
        "mlp_bias": (not raw.get("mlp_bias", False), "the SwiGLU has no biases"),
        "attention_bias": (not raw.get("attention_bias", False),
                           "the attention projections have no biases"),
        "hidden_act": (raw.get("hidden_act", "silu") == "silu", "the MLP is SwiGLU (silu)"),
        "is_neox_style": (raw.get("is_neox_style", True) is True,
                          "RoPE rotates halves (neox style), not interleaved pairs"),
        "key_query_norm": (not raw.get("key_query_norm", False),
                           "the self-attention has no query/key norm"),
    }
    for field, (ok, why) in unsupported.items():
        if not ok:
            raise fail(where, f"{name}.{field}={raw.get(field)!r} is not supported: {why}")
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
        raise fail(where, f"{name}.head_dim={head_dim} must be hidden_size / "
                           "num_attention_heads (the reference blocks derive it)")
    vocab = raw.get("vocab_size", 0)
    if byte_vocab and vocab != BYTE_VOCAB:
        raise fail(where, f"{name}.vocab_size must be {BYTE_VOCAB} (bytes), got {vocab!r}")
    try:
        return TransformerConfig(
            vocab_size=BYTE_VOCAB if byte_vocab else 1, d_model=raw["hidden_size"],
            n_layers=raw["num_hidden_layers"], n_heads=raw["num_attention_heads"],
            # None = as many as query heads (how our configs spell it)
            n_kv_heads=(None if raw["num_key_value_heads"] == raw["num_attention_heads"]
                        else raw["num_key_value_heads"]),
            d_ff=raw["intermediate_size"],
            max_seq_len=raw.get("max_position_embeddings", DEFAULT_MAX_POSITIONS),
            rope_theta=float(raw["rope_theta"]), norm_eps=float(raw["rms_norm_eps"]))
    except (TypeError, ValueError) as exc:
        raise fail(where, f"{name}: {exc}") from exc


def _cross(raw: Mapping[str, Any], name: str, where: Path | str) -> Mapping[str, Any]:
    cross = raw.get("cross_attention_config")
    fields = ("hidden_size", "hidden_size_q", "hidden_size_kv", "num_attention_heads",
              "attention_num_kv_heads")
    if not isinstance(cross, Mapping) or any(k not in cross for k in fields):
        raise fail(where, f"{name}.cross_attention_config must hold {', '.join(fields)}")
    return cross


def _require(where: Path | str, checks: list[tuple[str, Any, Any]], why: str) -> None:
    for field, got, want in checks:
        if got != want:
            raise fail(where, f"{field}={got!r} is not supported (must be {want!r}: {why})")


def hat_config_from_hf(raw: Mapping[str, Any], where: Path | str = CONFIG_FILE
                       ) -> tuple[HATConfig, dict[str, int]]:
    """`HATConfig` and the special-token map of a released ``config.json`` (as a dict)."""
    if not isinstance(raw, Mapping):
        raise fail(where, "the config must be a JSON object")
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        hint = (" (an aa-compile model directory: use aa_compile.models.checkpoint.load_model)"
                if raw.get("format") == "aa-compile-model" else "")
        raise fail(where, f"model_type={model_type!r} is not a HAT checkpoint (expected "
                           f"{MODEL_TYPE!r}){hint}")
    for key in ("encoder_config", "backbone_config", "decoder_config"):
        if not isinstance(raw.get(key), Mapping):
            raise fail(where, f"{key} is missing")
    enc_raw, bb_raw, dec_raw = raw["encoder_config"], raw["backbone_config"], raw["decoder_config"]
    encoder = _stack_config(enc_raw, "encoder_config", where, byte_vocab=True)
    backbone = _stack_config(bb_raw, "backbone_config", where, byte_vocab=False)
    decoder = _stack_config(dec_raw, "decoder_config", where, byte_vocab=True)
    if bb_raw.get("sliding_window") is not None:
        raise fail(where, f"backbone_config.sliding_window={bb_raw['sliding_window']!r} is not "
                           "supported (the backbone attends to every earlier word)")
    windows = {"sliding_window": raw.get("sliding_window", enc_raw.get("sliding_window")),
               "encoder_config.sliding_window": enc_raw.get("sliding_window"),
               "decoder_config.sliding_window": dec_raw.get("sliding_window")}
    if None in windows.values() or len(set(windows.values())) != 1:
        raise fail(where, f"the sliding windows must be set and equal (one window for the "
                           f"encoder and the decoder), got {windows}")
    pool = _cross(enc_raw, "encoder_config", where)
    _require(where, [("encoder_config.cross_attention_config.hidden_size", pool["hidden_size"],
                      backbone.d_model),
                     ("encoder_config.cross_attention_config.attention_num_kv_heads",
                      pool["attention_num_kv_heads"], pool["num_attention_heads"])],
             "WordPooling projects to the backbone width with one key head per query head")
    qk_norm = bool(pool.get("key_query_norm", False))
    if qk_norm and not pool.get("key_query_norm_per_head", False):
        raise fail(where, "encoder_config.cross_attention_config.key_query_norm without "
                           "key_query_norm_per_head is not supported (WordPooling normalizes "
                           "each head)")
    pool_rope = raw.get(POOL_ROPE_MARK, True)
    if not isinstance(pool_rope, bool):
        raise fail(where, f"{POOL_ROPE_MARK} must be true or false, got {pool_rope!r}")
    if qk_norm and encoder.norm_eps != backbone.norm_eps:
        raise fail(where, f"encoder_config.rms_norm_eps={encoder.norm_eps} must equal "
                           f"backbone_config.rms_norm_eps={backbone.norm_eps} (WordPooling's "
                           "query/key norms use the backbone's eps)")
    guide = _cross(dec_raw, "decoder_config", where)
    _require(where, [("decoder_config.cross_attention_config.hidden_size", guide["hidden_size"],
                      decoder.d_model),
                     ("decoder_config.cross_attention_config.hidden_size_q",
                      guide["hidden_size_q"], decoder.d_model),
                     ("decoder_config.cross_attention_config.hidden_size_kv",
                      guide["hidden_size_kv"], backbone.d_model),
                     ("decoder_config.cross_attention_config.num_attention_heads",
                      guide["num_attention_heads"], decoder.n_heads),
                     ("decoder_config.cross_attention_config.attention_num_kv_heads",
                      guide["attention_num_kv_heads"], decoder.kv_heads)],
             "the guide vector uses the decoder's width and heads")
    specials = raw.get("special_token_dict") or {"<|eot_id|>": raw.get("eos_token_id", 192)}
    try:
        cfg = HATConfig(encoder=encoder, backbone=backbone, decoder=decoder,
                        sliding_window=windows["sliding_window"],
                        pool_heads=pool["num_attention_heads"], pool_qk_norm=qk_norm,
                        guide_every_layer=bool(dec_raw.get("cross_attn_every_layer", False)),
                        max_word_bytes=raw.get("max_word_size", 100),
                        eos_byte=raw.get("eos_token_id", 192), pool_rope=pool_rope,
                        backbone_rope_scaling=_backbone_rope_scaling(bb_raw, where))
    except (TypeError, ValueError) as exc:
        raise fail(where, str(exc)) from exc
    if pool_rope and cfg.d_backbone // cfg.pool_heads != encoder.head_dim:
        raise fail(where, f"the pooling head size ({cfg.d_backbone // cfg.pool_heads} = "
                          "encoder_config.cross_attention_config.hidden_size / "
                          f"num_attention_heads) must equal the encoder's ({encoder.head_dim}):"
                          " the released connector takes its RoPE size from the encoder config")
    return cfg, dict(specials)


def _stack_to_hf(stack: TransformerConfig, vocab: int, window: int | None) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": stack.d_model,
            "num_hidden_layers": stack.n_layers, "num_attention_heads": stack.n_heads,
            "num_key_value_heads": stack.kv_heads, "rms_norm_eps": stack.norm_eps,
            "intermediate_size": stack.ffn_dim, "max_position_embeddings": stack.max_seq_len,
            "rope_scaling": None, "rope_theta": stack.rope_theta, "mlp_bias": False,
            "use_cache": True, "sliding_window": window,
            "transformers_version": TRANSFORMERS_VERSION, "key_query_norm": False,
            "key_query_norm_per_head": False, "is_neox_style": True}


def hf_config_from_hat(cfg: HATConfig, special_tokens: Mapping[str, int]) -> dict[str, Any]:
    """A released-style ``config.json`` dict for ``cfg`` (the inverse of `hat_config_from_hf`
    on every field that config has; ``word_window_size``, which the released forward does not
    read, is written as 1; a model without pooling RoPE gets `POOL_ROPE_MARK`). A model with
    pooling RoPE whose pooling head size differs from the encoder's cannot be written: the
    released connector takes its RoPE size from the encoder."""
    if cfg.pool_rope and cfg.d_backbone // cfg.pool_heads != cfg.encoder.head_dim:
        raise ValueError(f"a HAT with pool_rope and a pooling head size "
                         f"({cfg.d_backbone // cfg.pool_heads}) unlike the encoder's "
                         f"({cfg.encoder.head_dim}) has no released layout: the released "
                         "connector takes its RoPE size from the encoder config")
    encoder = _stack_to_hf(cfg.encoder, BYTE_VOCAB, cfg.sliding_window)
    encoder["cross_attention_config"] = {
        "hidden_size_q": cfg.d_backbone, "hidden_size_kv": cfg.d_enc,
        "hidden_size": cfg.d_backbone, "num_attention_heads": cfg.pool_heads,
        "attention_num_kv_heads": cfg.pool_heads, "word_window_size": 1,
        "key_query_norm": cfg.pool_qk_norm, "key_query_norm_per_head": cfg.pool_qk_norm}
    decoder = _stack_to_hf(cfg.decoder, BYTE_VOCAB, cfg.sliding_window)
    decoder["cross_attn_every_layer"] = cfg.guide_every_layer
    decoder["cross_attention_config"] = {
        "hidden_size_q": cfg.decoder.d_model, "hidden_size_kv": cfg.d_backbone,
        "hidden_size": cfg.decoder.d_model, "num_attention_heads": cfg.decoder.n_heads,
        "attention_num_kv_heads": cfg.decoder.kv_heads, "word_window_size": 1,
        "key_query_norm": False, "key_query_norm_per_head": False}
    backbone = _stack_to_hf(cfg.backbone, 0, None)
    if cfg.backbone_rope_scaling is not None:
        backbone["rope_scaling"] = cfg.backbone_rope_scaling.to_hf()
    return {"encoder_config": encoder,
            "backbone_config": backbone,
            "decoder_config": decoder, "model_type": MODEL_TYPE,
            "transformers_version": TRANSFORMERS_VERSION, "auto_map": dict(AUTO_MAP),
            "special_token_dict": dict(special_tokens), "max_word_size": cfg.max_word_bytes,
            "sliding_window": cfg.sliding_window,
            "max_position_embeddings": DEFAULT_MAX_POSITIONS, "torch_dtype": "bfloat16",
            "architectures": list(ARCHITECTURES),
            # the released config omits it at the default (192); its from_dict accepts it
            **({} if cfg.eos_byte == 192 else {"eos_token_id": cfg.eos_byte}),
            **({} if cfg.pool_rope else {POOL_ROPE_MARK: False})}


# -- tensor names ---------------------------------------------------------------------------

_LLAMA_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
                "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
                "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
                "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
                "mlp.down_proj": "mlp.down_proj"}


def hf_key_map(cfg: HATConfig) -> dict[str, str]:
    """Released tensor name -> our parameter name, for every tensor that has an effect."""
    names = {"encoder.embedding_layer.weight": "encoder.embed.weight",
             "decoder_connector.first_word_embedding": "first_word",
             "layer_norm.weight": "decoder.norm.weight",
             "lm_head.weight": "decoder.lm_head.weight",
             "encoder_connector.latent_query": "pooling.latent_query"}
    for hf_stack, ours, n in (("encoder.layers", "encoder.layers", cfg.encoder.n_layers),
                              ("backbone.layers", "backbone", cfg.backbone.n_layers),
                              ("decoder.decoder_layers.{i}.llama_layer", "decoder.layers",
                               cfg.decoder.n_layers)):
        for i in range(n):
            prefix = hf_stack.format(i=i) if "{i}" in hf_stack else f"{hf_stack}.{i}"
            for theirs, mine in _LLAMA_LAYER.items():
                names[f"{prefix}.{theirs}.weight"] = f"{ours}.{i}.{mine}.weight"
    pool = "encoder_connector.cross_attention_encoder_connector"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        names[f"{pool}.{proj}.weight"] = f"pooling.{proj}.weight"
    if cfg.pool_qk_norm:
        names[f"{pool}.norm_query.weight"] = "pooling.q_norm.weight"
        names[f"{pool}.norm_key.weight"] = "pooling.k_norm.weight"
    for i in range(cfg.decoder.n_layers if cfg.guide_every_layer else 1):
        block = f"decoder.decoder_layers.{i}"
        names[f"{block}.kv_norm.weight"] = f"decoder.guides.{i}.kv_norm.weight"
        names[f"{block}.cross_attention.v_proj.weight"] = f"decoder.guides.{i}.v_proj.weight"
        names[f"{block}.cross_attention.o_proj.weight"] = f"decoder.guides.{i}.o_proj.weight"
    return names


def inert_shapes(cfg: HATConfig, raw: Mapping[str, Any] | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Released tensors without effect on the output, with their shapes: every decoder layer's
    ``query_norm`` (and ``kv_norm`` where the layer has no cross-attention), and the query side
    of each decoder cross-attention (q_proj, k_proj and, with key_query_norm, its norms): one
    key per byte makes the softmax 1 whatever the query and key are."""
    dec = cfg.decoder
    cross = (raw or {}).get("decoder_config", {}).get("cross_attention_config", {})
    qk_norm, per_head = cross.get("key_query_norm", False), cross.get("key_query_norm_per_head",
                                                                       False)
    kv_width = dec.kv_heads * dec.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(dec.n_layers):
        block = f"decoder.decoder_layers.{i}"
        shapes[f"{block}.query_norm.weight"] = (dec.d_model,)
        if cfg.guide_every_layer or i == 0:
            shapes[f"{block}.cross_attention.q_proj.weight"] = (dec.d_model, dec.d_model)
            shapes[f"{block}.cross_attention.k_proj.weight"] = (kv_width, cfg.d_backbone)
            if qk_norm:
                shapes[f"{block}.cross_attention.norm_query.weight"] = (
                    (dec.head_dim,) if per_head else (dec.d_model,))
                shapes[f"{block}.cross_attention.norm_key.weight"] = (
                    (dec.head_dim,) if per_head else (kv_width,))
        else:
            shapes[f"{block}.kv_norm.weight"] = (cfg.d_backbone,)
    return shapes


def _released_shape(name: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The released model stores the latent query and the first word as ``[1, 1, d]``."""
    return (1, 1, *ours) if name.endswith(("latent_query", "first_word_embedding")) else ours


# -- reading --------------------------------------------------------------------------------


def load_hat_pretrained(model_class: Callable[[HATConfig], nn.Module], path: Path | str,
                        dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu") -> nn.Module:
    """``model_class(cfg)`` holding the released checkpoint in ``path`` (see the module
    docstring). ``dtype`` None keeps the stored dtype (it must be uniform); bfloat16/float32
    convert. Warns `HATCheckpointWarning` with `RELEASED_DIFFERENCES` if there are any."""
    root = Path(path)
    target = parse_dtype(dtype, DTYPES)
    if not root.is_dir():
        raise fail(root, "is not a checkpoint directory")
    raw = read_json(root / CONFIG_FILE)
    cfg, specials = hat_config_from_hf(raw, root / CONFIG_FILE)
    tensors = read_tensors(root)
    mapping, inert = hf_key_map(cfg), inert_shapes(cfg, raw)
    target = checked_dtype(root, tensors, set(mapping) | set(inert), DTYPES, target,
                           model="a HAT model of this config")
    with torch.device("meta"):
        model = model_class(cfg)
    own = dict(model.state_dict())
    state: dict[str, Tensor] = {}
    for theirs, mine in mapping.items():
        want = _released_shape(theirs, tuple(own[mine].shape))
        got = tensors[theirs]
        if tuple(got.shape) != want:
            raise fail(root, f"tensor {theirs!r} has shape {tuple(got.shape)}, the config "
                              f"implies {want}")
        state[mine] = got.reshape(own[mine].shape).to(device=device, dtype=target)
    kept: dict[str, Tensor] = {}
    for theirs, want in inert.items():
        if tuple(tensors[theirs].shape) != want:
            raise fail(root, f"tensor {theirs!r} has shape {tuple(tensors[theirs].shape)}, "
                              f"the config implies {want}")
        kept[theirs] = tensors[theirs].to(dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    model.splitter = HATByteSplitter(cfg.max_word_bytes, specials)
    model.hf_source = HFSource(root, dict(raw), kept)
    if RELEASED_DIFFERENCES:
        warnings.warn(f"{root}: loaded; known difference from the released forward: "
                      + "; ".join(RELEASED_DIFFERENCES), HATCheckpointWarning, stacklevel=3)
    return model


# -- writing --------------------------------------------------------------------------------


def hf_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The released-layout tensors of ``model`` (CPU, contiguous): the mapped parameters, and
    the inert ones as loaded, or for a model not loaded from a checkpoint, ones for the norms
    and zeros for the projections (they have no effect)."""
    cfg: HATConfig = model.config
    own = model.state_dict()
    dtype = own["first_word"].dtype
    out = {theirs: own[mine].detach().reshape(_released_shape(theirs, tuple(own[mine].shape)))
           for theirs, mine in hf_key_map(cfg).items()}
    source: HFSource | None = getattr(model, "hf_source", None)
    raw = source.config if source is not None else None
    for name, shape in inert_shapes(cfg, raw).items():
        if source is not None and name in source.inert:
            out[name] = source.inert[name].to(dtype)
        elif name.endswith("norm.weight") or name.endswith(("norm_query.weight",
                                                             "norm_key.weight")):
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = torch.zeros(shape, dtype=dtype)
    return {k: v.cpu().contiguous() for k, v in out.items()}


def save_hat_pretrained(model: nn.Module, path: Path | str,
                        max_shard_bytes: int | None = None) -> list[Path]:
    """Write ``model`` in the released layout; returns the files written. ``max_shard_bytes``
    None writes one ``model.safetensors``, else shards of at most that many tensor bytes (a
    tensor larger than that gets a shard of its own) and ``model.safetensors.index.json``.
    A model loaded from a checkpoint writes its config.json as read (bit-exact round trip)."""
    if not isinstance(getattr(model, "config", None), HATConfig):
        raise TypeError(f"save_hat_pretrained expects a HATModel, got {type(model).__name__}")
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool)
                                        or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes < 1):
        raise ValueError(f"max_shard_bytes must be None or an int >= 1, got "
                         f"{max_shard_bytes!r}")
    tensors = hf_tensors(model)
    bad = sorted({str(t.dtype) for t in tensors.values()} - {str(d) for d in DTYPES.values()})
    if bad:
        raise ValueError(f"the model holds {', '.join(bad)} tensors; the released layout is "
                         "bfloat16 or float32 (convert with model.to(dtype))")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    source: HFSource | None = getattr(model, "hf_source", None)
    specials = model.splitter.special_tokens
    raw = (source.config if source is not None
           and hat_config_from_hf(source.config)[0] == model.config
           else hf_config_from_hat(model.config, specials))
    written = [root / CONFIG_FILE]
    written[0].write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    meta = {"format": "pt"}
    for stale in (root / WEIGHTS_FILE, root / INDEX_FILE):
        stale.unlink(missing_ok=True)
    if max_shard_bytes is None:
        save_file(tensors, str(root / WEIGHTS_FILE), metadata=meta)
        return [*written, root / WEIGHTS_FILE]
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / file), metadata=meta)
        written.append(root / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                               "weight_map": weight_map}, indent=2) + "\n",
                                   encoding="utf-8")
    return [*written, root / INDEX_FILE]
