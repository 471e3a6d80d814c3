"""Released T-FREE checkpoints (the public ``trigrams`` repository's layout) read into and
written from `TFreeLM`.

The layout is what the public trainer saves and its ``InferencePipe`` reads (the released
``Aleph-Alpha/tfree-research-vocab-32k-fineweb-steps-370k`` is such a folder)::

    DIR/transformer/transformer.pt            torch.save of the model's state dict
    DIR/transformer/transformer_config.yaml   its architecture config (written as JSON)
    DIR/tokenizer/tokenizer.pt                torch.save of a dict: the trigram -> slot table
                                              "trigram_to_vocab" [2**24, m] and the decoding
                                              dictionary ("words", "word_counts", ...)
    DIR/tokenizer/tokenizer_config.yaml       the tokenizer config (written as JSON)
    DIR/context/config.yml                    the training config (optional: loss settings)

`released_key_map` names every released tensor and the parameter of ours it becomes. Loading
is strict: a missing or unexpected tensor, a shape the config does not imply, or a config field
our model cannot represent is a ValueError naming it. The ``.pt`` files are read with
``torch.load(weights_only=True, mmap=True)`` (no code runs, nothing is copied); the model is
built on the meta device and the tensors are assigned.

The released attention rotates interleaved pairs ``(2i, 2i+1)`` (complex RoPE); ours rotates
halves ``(i, i + d/2)``. The two agree once the query and key rows of every head are permuted
(`rope_row_order`), which the loader does (a copy of those two matrices) and the writer undoes,
so load -> save is bit-exact. Slots are computed by the ``reference`` hash mode (the public md5
rule); the stored ``trigram_to_vocab`` table is checked against it on a probe set of trigrams
(`check_trigram_table`) and kept for the round trip.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aa_compile.models.hf_files import checked_dtype, fail, listed_names, parse_dtype

from . import hashing
from ..transformer import rope_tables
from .config import TFreeLMConfig
from .modules import TFreeDictionary
from .tokenizer import TrigramTokenizer

TRANSFORMER_DIR = "transformer"
TOKENIZER_DIR = "tokenizer"
WEIGHTS_FILE = "transformer.pt"
ARCHITECTURE_FILE = "transformer_config.yaml"
TOKENIZER_FILE = "tokenizer.pt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.yaml"
TRAINING_CONFIG_FILE = "context/config.yml"

#: dtypes a checkpoint may hold and a load may ask for
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: the released 7B's loss settings (configs/7b_fineweb.yaml), used when the folder has no
#: training config
RELEASED_POS_WEIGHT, RELEASED_LOSS_SCALE = 300.0, 100.0
#: the public TransformerArchitectureConfig's defaults for fields a config file may omit
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "use_flash": True, "embedding_normalization": False, "embedding_aggregation": "mean",
    "norm": "rms", "mlp_type": "simple_gelu", "init": "xavier", "bias_terms": True,
    "rotary_embedding_base": 10000, "sequence_length": 2048, "mlp_factor": 4.0,
    "precision": "float32", "layernorm_epsilon": 1e-5, "init_std_global_gain": 1.0}
#: the public TrigramTokenizerConfig's defaults (vocab_size and vocab_population are required)
TOKENIZER_DEFAULTS: dict[str, Any] = {
    "lowercase": False, "sequence_length": 4096, "vocab_population_partial_lowercase": 0,
    "do_classic_tokenization": False, "prefix_path_tokenizer_file": "", "seed": 42,
    "initialize": "hash", "entire_words": False, "end_of_text": "<|endoftext|>",
    "word_edge_weight": 1, "cache_dir": None}
#: the entries of tokenizer.pt (the public TrigramTokenizer.save)
TOKENIZER_KEYS = ("trigram_to_vocab", "words_to_weights_word_indices",
                  "words_to_weights_token_indices", "words_to_weights_word_indices_edges",
                  "words_to_weights_token_indices_edges", "word_trigram_counts", "word_counts",
                  "words", "word_counter_full")
#: text whose trigrams `check_trigram_table` compares (mixed case: the lowercase sharing)
PROBE_TEXT = "The Quick brown FOX, über 42 Äpfel; \"tHe\" END."
#: dictionary words whose trigrams are compared too
PROBE_WORDS = 64

_LAYER = {"input_layernorm.weight": "attn_norm.weight",
          "attention.query.weight": "attn.q_proj.weight",
          "attention.key.weight": "attn.k_proj.weight",
          "attention.value.weight": "attn.v_proj.weight",
          "attention.dense.weight": "attn.o_proj.weight",
          "post_attention_layernorm.weight": "mlp_norm.weight",
          "mlp.dense_in.weight": "mlp.gate_proj.weight",
          "mlp.swiglu.weight": "mlp.up_proj.weight",
          "mlp.dense_out.weight": "mlp.down_proj.weight"}
_ROTATED = ("attention.query.weight", "attention.key.weight")


@dataclasses.dataclass
class TFreeSource:
    """What a model loaded by `load_tfree_pretrained` came from: the directory, the two config
    files as read, ``tokenizer.pt`` as read (its table memory-mapped) and the training config
    (None where the folder has none)."""

    path: Path
    architecture: dict[str, Any]
    tokenizer_config: dict[str, Any]
    tokenizer_state: dict[str, Any]
    training: dict[str, Any] | None = None

    @property
    def words(self) -> list[str]:
        """The decoding dictionary saved with the checkpoint, most frequent first (may be
        empty: then only the prompt's words can be generated)."""
        return list(self.tokenizer_state.get("words") or [])


# -- files ----------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file of the public code: ``BaseConfig.save`` writes JSON (into ``.yaml`` /
    ``.yml`` names), so JSON is what is read."""
    if not path.is_file():
        raise fail(path, "not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(path, f"not JSON ({exc}); the public code writes its configs as JSON "
                         "(BaseConfig.save): convert a hand-written YAML file to JSON") from exc
    if not isinstance(data, dict):
        raise fail(path, f"must hold a JSON object, got {type(data).__name__}")
    return data


def read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped where the file allows it; every
    failure is a ValueError naming the file (torch's own message advises
    ``weights_only=False``, which would run code from the file)."""
    if not path.is_file():
        raise fail(path, "not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # the legacy (non-zip) format cannot be mapped
                if "mmap" not in str(exc):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise fail(path, "not a readable torch.save file; it may be truncated or of "
                             "another format") from None
        raise fail(path, f"it holds {found.group(1)}, which a weights-only load refuses "
                         "(only tensors and plain containers are read)") from None
    except EOFError:
        raise fail(path, "empty or truncated") from None
    except (RuntimeError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise fail(path, f"not a readable torch.save file; it may be truncated or of another "
                         f"format ({detail})") from None


# -- config ---------------------------------------------------------------------------------


def _require(where: Path, checks: list[tuple[str, Any, Any, str]]) -> None:
    for field, got, want, why in checks:
        if got != want:
            raise fail(where, f"{field}={got!r} is not supported (must be {want!r}: {why})")


def _positive_int(where: Path, raw: Mapping[str, Any], field: str) -> int:
    value = raw.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(where, f"{field} must be a positive int, got {value!r}")
    return value


def mlp_width(hidden: int, mlp_factor: float) -> int:
    """The released MLP width: ``int(hidden * mlp_factor)`` (10928 for the 7B's 4096 x
    2.66796875)."""
    return int(hidden * mlp_factor)


def tfree_config_from_released(architecture: Mapping[str, Any],
                               tokenizer_config: Mapping[str, Any],
                               training: Mapping[str, Any] | None = None,
                               where: Path | str = "config"
                               ) -> tuple[TFreeLMConfig, TrigramTokenizer]:
    """The `TFreeLMConfig` and the ``reference``-mode `TrigramTokenizer` of a released
    checkpoint's configs; every field our model cannot reproduce is an error naming it."""
    where = Path(where)
    arch_where = where / TRANSFORMER_DIR / ARCHITECTURE_FILE
    tok_where = where / TOKENIZER_DIR / TOKENIZER_CONFIG_FILE
    unknown = sorted(set(architecture) - set(ARCHITECTURE_DEFAULTS)
                     - {"vocab_size", "hidden_size", "num_layers", "num_attention_heads"})
    if unknown:
        raise fail(arch_where, f"unknown field(s) {listed_names(unknown)} (not of the public "
                               "TransformerArchitectureConfig)")
    arch = {**ARCHITECTURE_DEFAULTS, **architecture}
    vocab = _positive_int(arch_where, arch, "vocab_size")
    hidden = _positive_int(arch_where, arch, "hidden_size")
    layers = _positive_int(arch_where, arch, "num_layers")
    heads = _positive_int(arch_where, arch, "num_attention_heads")
    seq = _positive_int(arch_where, arch, "sequence_length")
    _require(arch_where, [
        ("norm", arch["norm"], "rms", "the blocks use RMSNorm"),
        ("mlp_type", arch["mlp_type"], "swiglu", "the MLP is SwiGLU"),
        ("bias_terms", arch["bias_terms"], False, "the linear layers have no biases"),
        ("embedding_normalization", arch["embedding_normalization"], False,
         "the word embedding is the plain sum over its trigrams"),
    ])
    if arch["embedding_aggregation"] not in ("sum", "mean"):
        raise fail(arch_where, f"embedding_aggregation={arch['embedding_aggregation']!r} is "
                               "not supported (must be 'sum' or 'mean')")
    if arch["precision"] not in DTYPES:
        raise fail(arch_where, f"precision={arch['precision']!r} is not supported (must be "
                               f"{' or '.join(map(repr, DTYPES))})")
    factor = arch["mlp_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise fail(arch_where, f"mlp_factor must be a positive number, got {factor!r}")
    if hidden % heads or (hidden // heads) % 2:
        raise fail(arch_where, f"hidden_size={hidden} / num_attention_heads={heads} must be "
                               "an even integer head size (RoPE)")

    unknown = sorted(set(tokenizer_config) - set(TOKENIZER_DEFAULTS)
                     - {"vocab_size", "vocab_population"})
    if unknown:
        raise fail(tok_where, f"unknown field(s) {listed_names(unknown)} (not of the public "
                              "TrigramTokenizerConfig)")
    tok = {**TOKENIZER_DEFAULTS, **tokenizer_config}
    m = _positive_int(tok_where, tok, "vocab_population")
    _require(tok_where, [
        ("do_classic_tokenization", tok["do_classic_tokenization"], False,
         "this is a classic-tokenizer baseline, not T-FREE"),
        ("initialize", tok["initialize"], "hash", "slots are the md5 hash of the reference "
         "mode; the orthogonal table has no rule to recompute"),
        ("vocab_size", tok.get("vocab_size"), vocab, "the tokenizer's vocab_size must equal "
         "the transformer's"),
        ("sequence_length", tok["sequence_length"], seq, "it must equal the transformer's "
         "sequence_length (the public InferencePipe asserts it)"),
        ("end_of_text", tok["end_of_text"], "<|endoftext|>", "the stop word of generation"),
    ])
    try:
        tokenizer = TrigramTokenizer(vocab_size=vocab, m=m,
                                     k_lower=tok["vocab_population_partial_lowercase"],
                                     hash_mode="reference", entire_words=tok["entire_words"],
                                     lowercase=tok["lowercase"])
    except (TypeError, ValueError) as exc:
        raise fail(tok_where, str(exc)) from exc

    pos_weight, loss_scale = RELEASED_POS_WEIGHT, RELEASED_LOSS_SCALE
    if training is not None:
        section = training.get("training", {})
        if not isinstance(section, Mapping):
            raise fail(where / TRAINING_CONFIG_FILE, "'training' must be an object")
        pos_weight = float(section.get("loss_pos_weight", 100.0))  # the public defaults
        loss_scale = float(section.get("loss_scale", 1000.0))
    try:
        cfg = TFreeLMConfig(vocab_size=vocab, m=m, d_model=hidden, n_layers=layers,
                            n_heads=heads, n_kv_heads=None, max_seq_len=seq,
                            aggregation=arch["embedding_aggregation"], pos_weight=pos_weight,
                            loss_scale=loss_scale, d_ff=mlp_width(hidden, factor),
                            norm_eps=float(arch["layernorm_epsilon"]),
                            rope_theta=float(arch["rotary_embedding_base"]))
        cfg.transformer()
    except (TypeError, ValueError) as exc:
        raise fail(arch_where, str(exc)) from exc
    return cfg, tokenizer


def released_configs(cfg: TFreeLMConfig, tokenizer: TrigramTokenizer, dtype: torch.dtype
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(transformer_config, tokenizer_config)`` dicts of the public layout for a model of
    ours (the inverse of `tfree_config_from_released`). Only a ``reference``-mode tokenizer
    has a released form, and the MLP width must be ``int(d_model * mlp_factor)`` for a
    factor that the JSON float reproduces."""
    if tokenizer.hash_mode != "reference":
        raise ValueError(f"only a hash_mode='reference' tokenizer has the released layout "
                         f"(the public md5 rule), got {tokenizer.hash_mode!r}")
    if cfg.n_kv_heads not in (None, cfg.n_heads):
        raise ValueError(f"the released attention has no grouped-query heads (n_kv_heads="
                         f"{cfg.n_kv_heads}, n_heads={cfg.n_heads})")
    tcfg = cfg.transformer()
    factor = tcfg.ffn_dim / cfg.d_model
    if mlp_width(cfg.d_model, factor) != tcfg.ffn_dim:
        raise ValueError(f"the MLP width {tcfg.ffn_dim} is not int(d_model * mlp_factor) for "
                         f"any float factor (d_model={cfg.d_model})")
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    architecture = {
        "use_flash": True, "embedding_normalization": False,
        "embedding_aggregation": cfg.aggregation, "norm": "rms", "mlp_type": "swiglu",
        "init": "pythia", "bias_terms": False, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "rotary_embedding_base": (int(cfg.rope_theta) if float(cfg.rope_theta).is_integer()
                                  else cfg.rope_theta),
        "sequence_length": cfg.max_seq_len, "mlp_factor": factor, "precision": dtype_name,
        "layernorm_epsilon": cfg.norm_eps, "init_std_global_gain": 1.0}
    tokenizer_config = {
        "lowercase": tokenizer.lowercase, "vocab_size": tokenizer.vocab_size,
        "sequence_length": cfg.max_seq_len, "vocab_population": tokenizer.m,
        "vocab_population_partial_lowercase": tokenizer.k_lower,
        "do_classic_tokenization": False, "prefix_path_tokenizer_file": "", "seed": 42,
        "initialize": "hash", "entire_words": tokenizer.entire_words,
        "end_of_text": "<|endoftext|>", "word_edge_weight": 1, "cache_dir": None}
    return architecture, tokenizer_config


# -- tensor names ---------------------------------------------------------------------------


def released_key_map(cfg: TFreeLMConfig) -> dict[str, str]:
    """Released tensor name -> our parameter name, in the released state dict's order."""
    names = {"transformer.embeddings.embedding.weight": "embed.weight"}
    for i in range(cfg.n_layers):
        for theirs, ours in _LAYER.items():
            names[f"transformer.layers.{i}.{theirs}"] = f"layers.{i}.{ours}"
    names["transformer.norm.weight"] = "norm.weight"
    names["lm_head.weight"] = "head.proj.weight"
    return names


def rope_row_order(n_heads: int, head_dim: int) -> Tensor:
    """Row ``j`` of our query/key projection is row ``order[j]`` of the released one: within
    each head our rows ``0..d/2-1`` are the released even rows (the real parts of the
    interleaved pairs) and ``d/2..d-1`` the odd ones (the imaginary parts)."""
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(n_heads)[:, None] * head_dim + within[None]).reshape(-1)


# -- the trigram table ----------------------------------------------------------------------


def probe_trigram_ids(words: list[str]) -> np.ndarray:
    """The distinct trigram ids of `PROBE_TEXT` and of the first `PROBE_WORDS` dictionary
    words (those not hashed whole)."""
    probe = [w for w in [*PROBE_TEXT.split(), *words[:PROBE_WORDS]] if "<|" not in w]
    ids = sorted({i for w in probe for i in hashing.trigram_ids(w)})
    return np.array(ids, dtype=np.int64)


def check_trigram_table(table: Any, tokenizer: TrigramTokenizer, words: list[str],
                        where: Path | str) -> None:
    """A released ``trigram_to_vocab`` must be None (the public code then computes it from the
    hash) or an int64 ``[2**24, m]`` table equal to the ``reference`` hash (with the
    lowercase sharing) on the probe trigrams (`probe_trigram_ids`); else a ValueError."""
    if table is None:
        return
    shape = (hashing.TRIGRAM_COUNT, tokenizer.m)
    if not isinstance(table, Tensor) or table.dtype != torch.int64 or tuple(table.shape) != shape:
        got = (f"{tuple(table.shape)} {table.dtype}" if isinstance(table, Tensor)
               else type(table).__name__)
        raise fail(where, f"trigram_to_vocab must be an int64 tensor of shape {shape}, got {got}")
    ids = probe_trigram_ids(words)
    stored = table[torch.from_numpy(ids)].numpy()
    expected = tokenizer.trigram_slots(ids)
    bad = np.flatnonzero((stored != expected).any(axis=1))
    if bad.size:
        first = int(ids[bad[0]])
        raise fail(where, f"trigram_to_vocab differs from the md5 hash of the public code at "
                          f"{bad.size} of {ids.size} probe trigrams (first {hashing.id_to_trigram(first)!r}:"
                          f" stored {stored[bad[0]].tolist()}, hash {expected[bad[0]].tolist()});"
                          " the slots cannot be recomputed")


# -- reading --------------------------------------------------------------------------------


def read_tokenizer_state(path: Path) -> dict[str, Any]:
    """``tokenizer.pt``: a dict of exactly the public `TOKENIZER_KEYS`."""
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise fail(path, f"must hold a dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if k != "words_to_weights"}  # public legacy key
    missing = [k for k in TOKENIZER_KEYS if k not in state]
    unexpected = sorted(str(k) for k in state if k not in TOKENIZER_KEYS)
    if missing or unexpected:
        raise fail(path, ("missing entr(ies): " + ", ".join(missing) + " " if missing else "")
                   + ("unexpected entr(ies): " + listed_names(unexpected) if unexpected else "")
                   + " (not the public TrigramTokenizer.save layout)")
    words = state["words"]
    if words is not None and (not isinstance(words, list)
                              or not all(isinstance(w, str) for w in words)):
        raise fail(path, "'words' must be a list of str")
    return state


def load_tfree_pretrained(model_class: Callable[[TFreeLMConfig], nn.Module], path: Path | str,
                          dtype: torch.dtype | str | None = None,
                          device: torch.device | str = "cpu") -> nn.Module:
    """``model_class(cfg)`` holding the released checkpoint in ``path`` (see the module
    docstring), with ``.tokenizer`` (``reference`` mode) and ``.released`` (`TFreeSource`:
    the dictionary words and what the round trip needs). ``dtype`` None keeps the stored dtype
    (it must be uniform); bfloat16/float32 convert."""
    root = Path(path)
    target = parse_dtype(dtype, DTYPES)
    if not root.is_dir():
        raise fail(root, "is not a checkpoint directory")
    if not (root / TRANSFORMER_DIR).is_dir():
        raise fail(root, f"has no {TRANSFORMER_DIR}/ folder: not a released T-FREE checkpoint "
                         f"(expected {TRANSFORMER_DIR}/{WEIGHTS_FILE} and {TOKENIZER_DIR}/"
                         f"{TOKENIZER_FILE})")
    architecture = read_config_file(root / TRANSFORMER_DIR / ARCHITECTURE_FILE)
    tokenizer_config = read_config_file(root / TOKENIZER_DIR / TOKENIZER_CONFIG_FILE)
    training = (read_config_file(root / TRAINING_CONFIG_FILE)
                if (root / TRAINING_CONFIG_FILE).is_file() else None)
    cfg, tokenizer = tfree_config_from_released(architecture, tokenizer_config, training, root)
    tok_state = read_tokenizer_state(root / TOKENIZER_DIR / TOKENIZER_FILE)
    check_trigram_table(tok_state["trigram_to_vocab"], tokenizer, tok_state["words"] or [],
                        root / TOKENIZER_DIR / TOKENIZER_FILE)

    weights_path = root / TRANSFORMER_DIR / WEIGHTS_FILE
    tensors = read_torch_file(weights_path)
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise fail(weights_path, "must hold a state dict (names -> tensors)")
    mapping = released_key_map(cfg)
    target = checked_dtype(weights_path, tensors, mapping, DTYPES, target,
                           model="a T-FREE model of this config")
    with torch.device("meta"):
        model = model_class(cfg)
    own = dict(model.state_dict())
    order = rope_row_order(cfg.n_heads, cfg.d_model // cfg.n_heads)
    state: dict[str, Tensor] = {}
    for theirs, ours in mapping.items():
        got, want = tensors[theirs], tuple(own[ours].shape)
        if tuple(got.shape) != want:
            raise fail(weights_path, f"tensor {theirs!r} has shape {tuple(got.shape)}, the "
                                     f"config implies {want}")
        if theirs.endswith(_ROTATED):
            got = got.index_select(0, order)
        state[ours] = got.to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    tcfg = cfg.transformer()  # the RoPE tables are not in the state dict: build them for real
    cos, sin = rope_tables(tcfg.head_dim, tcfg.max_seq_len, tcfg.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.tokenizer = tokenizer
    model.released = TFreeSource(root, dict(architecture), dict(tokenizer_config), tok_state,
                                 training)
    return model


# -- writing --------------------------------------------------------------------------------


def released_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The released state dict of ``model`` (CPU, contiguous), in the released order."""
    cfg: TFreeLMConfig = model.config
    own = model.state_dict()
    inverse = torch.argsort(rope_row_order(cfg.n_heads, cfg.d_model // cfg.n_heads))
    out: dict[str, Tensor] = {}
    for theirs, ours in released_key_map(cfg).items():
        t = own[ours].detach()
        if theirs.endswith(_ROTATED):
            t = t.index_select(0, inverse.to(t.device))
        out[theirs] = t.cpu().contiguous()
    return out


def save_tfree_pretrained(model: nn.Module, path: Path | str,
                          tokenizer: TrigramTokenizer | None = None,
                          words: list[str] | None = None) -> list[Path]:
    """Write ``model`` in the released layout; returns the files written. A model loaded by
    `load_tfree_pretrained` writes its configs and ``tokenizer.pt`` as read (load -> save is
    bit-exact); another model needs its ``reference``-mode ``tokenizer`` and writes
    ``trigram_to_vocab`` as None (the public code then computes the table from the hash) and
    ``words`` (default none) as the decoding dictionary."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, TFreeLMConfig):
        raise TypeError(f"save_tfree_pretrained expects a TFreeLM, got {type(model).__name__}")
    if cfg.n_kv_heads not in (None, cfg.n_heads):
        raise ValueError(f"the released attention has no grouped-query heads (n_kv_heads="
                         f"{cfg.n_kv_heads}, n_heads={cfg.n_heads})")
    tensors = released_tensors(model)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES.values():
        raise ValueError(f"the model holds {sorted(map(str, dtypes))} tensors; the released "
                         "layout is all bfloat16 or all float32 (convert with model.to(dtype))")
    dtype = dtypes.pop()
    source: TFreeSource | None = getattr(model, "released", None)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if not isinstance(tokenizer, TrigramTokenizer):
        raise ValueError("save_tfree_pretrained needs the model's TrigramTokenizer "
                         "(tokenizer=...; hash_mode='reference')")
    cfg.check_tokenizer(tokenizer)
    architecture, tokenizer_config = released_configs(cfg, tokenizer, dtype)
    if source is not None:
        as_read = tfree_config_from_released(source.architecture, source.tokenizer_config,
                                             source.training, source.path)
        if as_read[0] == cfg and repr(as_read[1]) == repr(tokenizer):
            # the files as read; only the precision follows a dtype conversion
            architecture = {**source.architecture, "precision": architecture["precision"]}
            tokenizer_config = source.tokenizer_config
        else:
            source = None
    if source is not None and words is None:
        tok_state = source.tokenizer_state
    else:
        tok_state = dictionary_state(tokenizer, list(words or []))
        if source is not None:
            tok_state["trigram_to_vocab"] = source.tokenizer_state["trigram_to_vocab"]
    root = Path(path)
    if source is not None and root.resolve() == source.path.resolve():
        raise ValueError(f"{root}: the model was loaded from this directory and its tensors are "
                         "mapped from its files; save it to another directory")
    (root / TRANSFORMER_DIR).mkdir(parents=True, exist_ok=True)
    (root / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    files = [root / TRANSFORMER_DIR / WEIGHTS_FILE, root / TRANSFORMER_DIR / ARCHITECTURE_FILE,
             root / TOKENIZER_DIR / TOKENIZER_FILE, root / TOKENIZER_DIR / TOKENIZER_CONFIG_FILE]
    torch.save(tensors, files[0])
    files[1].write_text(json.dumps(architecture, indent=4), encoding="utf-8")
    torch.save(tok_state, files[2])
    files[3].write_text(json.dumps(tokenizer_config, indent=4), encoding="utf-8")
    if source is not None and source.training is not None:
        (root / TRAINING_CONFIG_FILE).parent.mkdir(parents=True, exist_ok=True)
        (root / TRAINING_CONFIG_FILE).write_text(json.dumps(source.training, indent=4),
                                                 encoding="utf-8")
        files.append(root / TRAINING_CONFIG_FILE)
    return files


def dictionary_state(tokenizer: TrigramTokenizer, words: list[str]) -> dict[str, Any]:
    """A ``tokenizer.pt`` dict for ``words`` in the public layout: no table (None: the public
    code computes it from the hash) and the dictionary as the public
    ``get_sparse_word_list_from_words`` stores it (per word its inner slots and its edge
    slots as (word index, slot) pairs, and its number of trigrams), with counts of 0."""
    # an edge weight other than 1 marks the edge entries in slot_weights
    dictionary = TFreeDictionary(tokenizer, words, edge_weight=2.0)
    if len(dictionary) != len(words):
        raise ValueError("the dictionary words must be distinct")
    inner_edge = dictionary.slot_weights != 1.0
    return {"trigram_to_vocab": None,
            "words_to_weights_word_indices": dictionary.word_ids[~inner_edge].clone(),
            "words_to_weights_token_indices": dictionary.slots[~inner_edge].clone(),
            "words_to_weights_word_indices_edges": dictionary.word_ids[inner_edge].clone(),
            "words_to_weights_token_indices_edges": dictionary.slots[inner_edge].clone(),
            "word_trigram_counts": dictionary.n_trigrams.clone(),
            "word_counts": torch.zeros(len(words), dtype=torch.int64),
            "words": list(words), "word_counter_full": dict.fromkeys(words, 0)}


def is_released_tfree(path: Path | str) -> bool:
    """Whether ``path`` looks like a released T-FREE folder (its two config files exist)."""
    root = Path(path)
    return ((root / TRANSFORMER_DIR / ARCHITECTURE_FILE).is_file()
            and (root / TOKENIZER_DIR / TOKENIZER_CONFIG_FILE).is_file())


__all__ = [
    "ARCHITECTURE_FILE", "DTYPES", "TOKENIZER_CONFIG_FILE", "TOKENIZER_FILE", "TOKENIZER_KEYS",
    "TRAINING_CONFIG_FILE", "TFreeSource", "WEIGHTS_FILE", "check_trigram_table",
    "dictionary_state",
    "is_released_tfree", "load_tfree_pretrained", "mlp_width", "probe_trigram_ids",
    "read_config_file", "read_tokenizer_state", "read_torch_file", "released_configs",
    "released_key_map", "released_tensors", "rope_row_order", "save_tfree_pretrained",
    "tfree_config_from_released",
]
