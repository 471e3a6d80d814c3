"""The trained reference transformer of the DTM benchmarks, trained once per machine and cached.

`reference_model` returns it from the cache when a model trained with the same settings by the
same code is there, and trains it (`bench.train_reference.train`) and saves it otherwise. The
cache entry is a saved model directory (`aa_compile.models.save_model`: safetensors + a config
JSON) named after a key that hashes the training settings, the training and model source code
and the training text, so a change to any of them trains afresh instead of reusing a stale
model. The cache folder is ``$AA_COMPILE_CACHE`` (default ``~/.cache/aa-compile``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from aa_compile.data import text
from aa_compile.models import load_model, save_model
from aa_compile.models import transformer as transformer_module
from aa_compile.models.transformer import Transformer, TransformerConfig
from bench import train_reference

#: What `train_reference.train` gets: the settings the cached model was trained with.
SETTINGS = {"steps": 250, "batch": 16, "seq": 96, "lr": 3e-3, "seed": 0}


def cache_root() -> Path:
    return Path(os.environ.get("AA_COMPILE_CACHE", os.path.expanduser("~/.cache/aa-compile")))


def cache_key(config: TransformerConfig, settings: dict) -> str:
    """Hex digest of everything the trained weights depend on."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": dataclasses.asdict(config), "settings": settings},
                        sort_keys=True).encode())
    h.update(inspect.getsource(train_reference.train).encode())
    h.update(inspect.getsource(transformer_module).encode())
    h.update(text("mixed").encode("utf-8"))
    return h.hexdigest()[:16]


def cache_dir(config: TransformerConfig = train_reference.DEFAULT_CONFIG,
              settings: dict | None = None) -> Path:
    """Where the model trained with ``config`` and ``settings`` is cached."""
    return cache_root() / f"reference-{cache_key(config, settings or SETTINGS)}"


def reference_model(config: TransformerConfig = train_reference.DEFAULT_CONFIG,
                    settings: dict | None = None, progress: bool = True) -> Transformer:
    """The reference transformer trained with ``settings`` (default `SETTINGS`), in eval mode:
    loaded from the cache, or trained, saved there and returned."""
    settings = {**SETTINGS, **(settings or {})}
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}; valid: {sorted(SETTINGS)}")
    directory = cache_dir(config, settings)
    if (directory / "config.json").is_file():
        return load_model(directory)
    start = time.perf_counter()
    model, losses = train_reference.train(config, progress=progress, **settings)
    seconds = time.perf_counter() - start
    directory.parent.mkdir(parents=True, exist_ok=True)
    # written next to its final place, then renamed: a run stopped half-way leaves no entry
    partial = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        save_model(model, partial, tokenizer="bytes",
                   training={**settings, "seconds": seconds,
                             "final_loss": losses[-1] if losses else None})
        try:
            partial.rename(directory)
        except OSError:  # another run cached it first
            pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return model
