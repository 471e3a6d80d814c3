"""Saved models: one directory per model, safetensors weights and a JSON config (no pickle).

    DIR/config.json        {"format": "aa-compile-model", "version": 1, "kind": ...,
                            "config": {...}, "tokenizer": {...}, "training": {...}}
    DIR/model.safetensors  the state dict (each tied tensor stored once)
    DIR/dictionary.json    T-FREE only, when given: the word list `TFreeLM.generate` picks from

Every training CLI writes this with `save_model`; `load_model` rebuilds the model from the
config of its ``kind`` and loads the weights strictly. Each failure is a ValueError that names
the file and the reason. The kinds (and T-FREE's tokenizer) are registered by
`aa_compile.models` (`register_kind`, `register_tokenizer`), so this module imports no model:
the training CLIs inside the model packages import it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "aa-compile-model"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WORDS_FILE = "dictionary.json"


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """A model class this format holds, with its config dataclass."""

    name: str
    model_class: type[nn.Module]
    config_class: type


#: kind name -> `ModelKind`; `aa_compile.models` registers the reference models
KINDS: dict[str, ModelKind] = {}
#: tokenizer type name -> tokenizer class (rebuilt from its constructor's arguments)
TOKENIZERS: dict[str, type] = {}


def register_kind(name: str, model_class: type[nn.Module], config_class: type) -> None:
    """Let `save_model` / `load_model` hold ``model_class(config_class(...))`` as ``name``."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"{config_class.__name__} must be a dataclass")
    KINDS[name] = ModelKind(name, model_class, config_class)


def register_tokenizer(name: str, tokenizer_class: type) -> None:
    """Let `save_model` record a ``tokenizer_class`` as its constructor's arguments (each
    stored under the same attribute name) and `load_tokenizer` rebuild it."""
    TOKENIZERS[name] = tokenizer_class


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: the tokenizer of the byte-level models. Also callable
    and with ``convert_ids_to_tokens`` like a Hugging Face tokenizer, so that APIs written for
    those (AtMan's labels) take it too."""

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """The text of byte ids (invalid UTF-8 becomes U+FFFD)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """One string per byte id (a byte of a multi-byte character alone is U+FFFD)."""
        return [self.decode([i]) for i in ids]

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def model_kind(model: nn.Module) -> str:
    """The saved-model ``kind`` of ``model`` (ValueError for a model this format cannot hold)."""
    for kind in KINDS.values():
        if type(model) is kind.model_class:
            return kind.name
    raise ValueError(f"cannot save a {type(model).__name__}: save_model holds "
                     f"{', '.join(k.model_class.__name__ for k in KINDS.values())}")


def config_from_dict(kind: str, fields: dict) -> Any:
    """The config dataclass of ``kind`` from its JSON fields."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    return dataclass_from_dict(KINDS[kind].config_class, fields)


def dataclass_from_dict(cls: type, fields: dict) -> Any:
    """``cls(**fields)``, where a field whose default is itself a dataclass (HAT's encoder,
    backbone and decoder stacks) is rebuilt from its JSON object first."""
    if not isinstance(fields, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object, got {type(fields).__name__}")
    fields = dict(fields)
    for f in dataclasses.fields(cls):
        if f.name in fields and isinstance(fields[f.name], dict):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            if dataclasses.is_dataclass(default):
                fields[f.name] = dataclass_from_dict(type(default), fields[f.name])
    return cls(**fields)


def build_model(kind: str, fields: dict) -> nn.Module:
    """A freshly initialised model of ``kind`` with the config ``fields``."""
    return KINDS[kind].model_class(config_from_dict(kind, fields))


def tokenizer_to_dict(tokenizer: Any) -> dict | None:
    """The JSON description of a tokenizer: ``None``, ``"bytes"`` / `ByteTokenizer`, a
    registered one (`register_tokenizer`: T-FREE's `TrigramTokenizer`), or a Hugging Face
    tokenizer (object or local name/path)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, ByteTokenizer) or (isinstance(tokenizer, str)
                                                and tokenizer == "bytes"):
        return {"type": "bytes"}
    for name, cls in TOKENIZERS.items():
        if type(tokenizer) is cls:
            params = inspect.signature(cls).parameters
            return {"type": name, **{p: getattr(tokenizer, p) for p in params}}
    if isinstance(tokenizer, str):
        return {"type": "huggingface", "name": tokenizer}
    name = getattr(tokenizer, "name_or_path", None)
    if isinstance(name, str) and name:
        return {"type": "huggingface", "name": name}
    raise TypeError(f"cannot describe a {type(tokenizer).__name__} tokenizer; pass 'bytes', a "
                    "TrigramTokenizer, or a Hugging Face tokenizer (or its name/path)")


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: first key}`` for the state-dict entries that share storage with an earlier one
    (tied weights, e.g. ``lm_head.weight`` tied to ``embed.weight``)."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for key, t in state.items():
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 t.stride(), t.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


def save_model(model: nn.Module, directory: str | Path, *, tokenizer: Any = None,
               words: list[str] | None = None, training: dict | None = None,
               extra: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` (created; existing files of the format replaced).

    ``tokenizer``: see `tokenizer_to_dict` (default: ``"bytes"`` for the byte-level kinds).
    ``words``: T-FREE's generation dictionary. ``training``: informative JSON (CLI arguments,
    final loss). ``extra``: further top-level keys (the DTM plan of an applied model).
    """
    kind = model_kind(model)
    if words is not None and kind != "tfree":
        raise ValueError(f"words (a generation dictionary) only apply to T-FREE, not {kind}")
    if tokenizer is None and kind != "tfree":
        tokenizer = "bytes"
    described = tokenizer_to_dict(tokenizer)
    check = getattr(model.config, "check_tokenizer", None)
    if check is not None and type(tokenizer) in TOKENIZERS.values():
        check(tokenizer)  # T-FREE: the tokenizer's vocab_size and m must be the model's
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    aliases = tied_aliases(state)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k not in aliases}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    if words is not None:
        (directory / WORDS_FILE).write_text(json.dumps(list(words)))
        described = {**(described or {}), "words_file": WORDS_FILE}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": kind,
                            "config": dataclasses.asdict(model.config)}
    if described is not None:
        meta["tokenizer"] = described
    if aliases:
        meta["tied"] = aliases
    if training is not None:
        meta["training"] = training
    meta.update(extra or {})
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return directory


def read_config(directory: str | Path) -> dict:
    """The checked ``config.json`` of a saved model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise ValueError(f"cannot load {directory}: it {what} (expected a saved model "
                         f"directory with {CONFIG_FILE} and {WEIGHTS_FILE})")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"cannot load {path}: no such file (not a saved model directory)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot load {path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"cannot load {path}: not an {FORMAT} config (its 'format' is "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"cannot load {path}: format version {version!r} is not supported "
                         f"(this aa-compile reads up to {VERSION})")
    if meta.get("kind") not in KINDS:
        raise ValueError(f"cannot load {path}: unknown kind {meta.get('kind')!r} (expected "
                         f"one of {sorted(KINDS)})")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"cannot load {path}: 'config' must be a JSON object")
    return meta


def model_from_config(directory: str | Path, meta: dict) -> nn.Module:
    """A fresh model of the kind and config in ``meta`` (ValueError naming the config file)."""
    try:
        return build_model(meta["kind"], meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot load {Path(directory) / CONFIG_FILE}: bad config for kind "
                         f"{meta['kind']!r}: {e}") from None


def load_state(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load ``DIR/model.safetensors`` into ``model`` strictly: every key present and no other,
    every shape equal (the names are in the error). Tied weights come from their first key."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"cannot load {path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot load {path}: not a readable safetensors file ({e})") from None
    expected = model.state_dict()
    aliases = tied_aliases(expected)
    required = [k for k in expected if k not in aliases]
    missing = [k for k in required if k not in tensors]
    unexpected = [k for k in tensors if k not in expected or k in aliases]
    if missing or unexpected:
        parts = ([f"missing keys {_names(missing)}"] if missing else []) + \
                ([f"unexpected keys {_names(unexpected)}"] if unexpected else [])
        raise ValueError(f"cannot load {path}: the weights do not fit the "
                         f"{type(model).__name__}: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}" for k in required
             if tensors[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"cannot load {path}: shapes differ from the config's (saved vs "
                         f"model): {_names(wrong)}")
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    model.load_state_dict(tensors, strict=False)
    return model


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_model(directory: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model saved in ``directory`` by `save_model`, in eval mode on ``map_location``."""
    meta = read_config(directory)
    if "dtm" in meta:
        raise ValueError(f"cannot load {Path(directory) / CONFIG_FILE} with load_model: it is "
                         "a DTM-compressed model; load it with aa_compile.dtm.load_applied")
    model = load_state(model_from_config(directory, meta), directory)
    return model.to(map_location).eval()


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved with the model: `ByteTokenizer`, a registered one (T-FREE's
    `TrigramTokenizer`), a Hugging Face tokenizer (local files only), or ``None`` when none
    was saved."""
    meta = read_config(directory)
    spec = meta.get("tokenizer")
    if spec is None:
        return None
    path = Path(directory) / CONFIG_FILE
    kind = spec.get("type") if isinstance(spec, dict) else None
    fields = {k: v for k, v in spec.items() if k not in ("type", "words_file")} \
        if isinstance(spec, dict) else {}
    try:
        if kind == "bytes":
            return ByteTokenizer()
        if kind in TOKENIZERS:
            return TOKENIZERS[kind](**fields)
        if kind == "huggingface":
            from transformers import AutoTokenizer  # optional dependency, loaded on use

            return AutoTokenizer.from_pretrained(fields["name"], local_files_only=True)
    except (TypeError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"cannot load {path}: bad tokenizer {spec!r}: {e}") from None
    raise ValueError(f"cannot load {path}: unknown tokenizer type {kind!r} (expected one of "
                     f"{['bytes', *TOKENIZERS, 'huggingface']})")


def load_words(directory: str | Path) -> list[str] | None:
    """T-FREE's saved generation dictionary (the words `TFreeLM.generate` picks from), or
    ``None`` when none was saved."""
    meta = read_config(directory)
    spec = meta.get("tokenizer")
    name = spec.get("words_file") if isinstance(spec, dict) else None
    if name is None:
        return None
    path = Path(directory) / name
    try:
        words = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot load {path}: {e}") from None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ValueError(f"cannot load {path}: expected a JSON list of words")
    return words


def save_with_config(model: nn.Module, path: str | Path, key: str) -> None:
    """``model``'s weights to ONE safetensors file, its ``config`` dataclass as JSON metadata
    under ``key`` (the single-file form of the SAE and the SAE base LM)."""
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={key: json.dumps(dataclasses.asdict(model.config))})


def load_with_config(path: str | Path, key: str, what: str, writer: str = ""
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config fields, state dict)`` of a file `save_with_config` wrote; safetensors only (no
    pickle is ever unpickled): a ValueError naming ``what`` the file should hold otherwise."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{what} weights load only from a .safetensors file, got {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if key not in meta:
        raise ValueError(f"{path} has no {key} metadata" + (f" ({writer})" if writer else ""))
    return json.loads(meta[key]), load_file(str(path))
