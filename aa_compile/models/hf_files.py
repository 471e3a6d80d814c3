"""Reading a Hugging Face checkpoint directory with safetensors only (never pickle).

    DIR/config.json
    DIR/model.safetensors                 every tensor, or
    DIR/model.safetensors.index.json      {"metadata": {...}, "weight_map": {name: shard file}}
    DIR/model-0000i-of-0000n.safetensors

`read_tensors` memory-maps the files (safetensors ``safe_open``: no copy on CPU) and can read
only some names, so the parts of a checkpoint a loader needs come without the rest. Every
failure is a ValueError naming the file: a missing config or shard, a file that is not
safetensors or is truncated, a shard whose tensors disagree with the index. The released-format
loaders (`aa_compile.models.hat.pretrained`, `aa_compile.models.sae.pretrained`) build on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def fail(path: Path | str, message: str) -> ValueError:
    """The error every loader raises: ``"<path>: <message>"``."""
    return ValueError(f"{path}: {message}")


def parse_dtype(dtype: torch.dtype | str | None, allowed: dict[str, torch.dtype]
                ) -> torch.dtype | None:
    """None, or one of ``allowed`` given as a torch dtype or its name."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in allowed:
        return allowed[dtype]
    if isinstance(dtype, torch.dtype) and dtype in allowed.values():
        return dtype
    names = " or ".join(f"torch.{name}" for name in allowed)
    raise ValueError(f"dtype must be None (as stored), {names} (or their names), got {dtype!r}")


def read_json(path: Path) -> Any:
    """A JSON file, or a clear error when it is absent or not JSON."""
    if not path.is_file():
        raise fail(path, "not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(path, f"not valid JSON ({exc})") from exc


def weight_files(root: Path) -> dict[Path, set[str] | None]:
    """Each weight file with the names the index puts in it (None: the single file)."""
    index, single = root / INDEX_FILE, root / WEIGHTS_FILE
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise fail(index, "has no weight_map")
        files: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file:
                raise fail(index, f"weight_map[{name!r}]={file!r} is not a file name in the "
                                  "checkpoint directory")
            files.setdefault(root / file, set()).add(name)
        missing = sorted(p.name for p in files if not p.is_file())
        if missing:
            raise fail(index, f"lists shard(s) that do not exist: {', '.join(missing)}")
        return dict(files)
    if single.is_file():
        return {single: None}
    raise fail(root, f"holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")


def read_tensors(root: Path | str, select: Callable[[str], bool] | None = None
                 ) -> dict[str, Tensor]:
    """The tensors of a checkpoint directory (those whose name ``select`` accepts), on the CPU,
    memory-mapped. Shards that the index shows to hold no selected name are not opened."""
    root = Path(root)
    tensors: dict[str, Tensor] = {}
    for file, listed in weight_files(root).items():
        if listed is not None and select is not None and not any(map(select, listed)):
            continue
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                names = set(handle.keys())
                for name in sorted(names):
                    if select is not None and not select(name):
                        continue
                    if name in tensors:
                        raise fail(file, f"tensor {name!r} is stored twice")
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise fail(file, f"not a readable safetensors file ({exc}); it may be truncated "
                             "or of another format") from exc
        if listed is not None and names != listed:
            extra, absent = sorted(names - listed), sorted(listed - names)
            raise fail(file, f"does not match {INDEX_FILE}: "
                             + (f"not in the index: {extra[:5]} " if extra else "")
                             + (f"missing from the file: {absent[:5]}" if absent else ""))
    return tensors


def listed_names(names: list[str]) -> str:
    """At most eight names, then how many there are in all (for error messages)."""
    return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


def checked_dtype(root: Path, tensors: Mapping[str, Tensor], expected: Iterable[str],
                  allowed: Mapping[str, torch.dtype], target: torch.dtype | None, *,
                  model: str) -> torch.dtype:
    """The dtype to load ``tensors`` in, after checking they are exactly the ``expected`` names
    (missing and unexpected ones named; ``model`` says what they should form) of ``allowed``
    dtypes: ``target`` if given, else the one dtype they are stored in."""
    expected = set(expected)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise fail(root, f"missing tensor(s): {listed_names(missing)}")
    if unexpected:
        raise fail(root, f"unexpected tensor(s) (not in {model}): {listed_names(unexpected)}")
    stored = {t.dtype for t in tensors.values()}
    bad = sorted(str(d) for d in stored if d not in allowed.values())
    if bad:
        names = [str(d).removeprefix("torch.") for d in allowed.values()]
        names = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise fail(root, f"holds tensors of dtype {', '.join(bad)}; only {names} are supported")
    if target is not None:
        return target
    if len(stored) != 1:
        raise fail(root, f"holds mixed dtypes {sorted(map(str, stored))}: pass dtype=")
    return stored.pop()
