"""Resumable training checkpoints with ``torch.distributed.checkpoint`` (DCP), loadable on a
different world size.

    aad.save_checkpoint("runs/ckpt", model, optimizer, step, global_batch=8)  # every rank
    step = aad.load_checkpoint("runs/ckpt", model, optimizer)                # every rank

A checkpoint is a directory: DCP's files (each rank writes its own shards of an FSDP2 model,
`shard_blocks`, and of its optimizer state; replicated tensors once) and ``aa_checkpoint.json``,
the header rank 0 writes last: the step, the world size and global batch it was saved with,
the model's class and config, the optimizer's class and, for a compressed model, its FDTM plan.
Model and optimizer state go through `get_state_dict` / `set_state_dict`
(``torch.distributed.checkpoint.state_dict``), keyed by parameter names, so DCP reshards on
load: a checkpoint of two FSDP2 ranks loads into one plain model and the other way round.

An FDTM plan (``{component: compression}``) is JSON in the header; the applied model's
weights (`Int8Linear` buffers included) are DCP state like any other, so a compressed model
is rebuilt from `model_from_checkpoint`, ``dtm.apply(model, read_checkpoint(d)["dtm"]["plan"])``
and `load_checkpoint`. DCP's own ``.metadata`` file is a pickle: load trusted checkpoints only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from aa_compile.models.checkpoint import KINDS, build_model

from .work import check_group

FORMAT = "aa-compile-dcp"
VERSION = 1
HEADER_FILE = "aa_checkpoint.json"
MODEL_KEY, OPTIM_KEY = "model", "optim"


def save_checkpoint(directory: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0, *,
                    global_batch: int | None = None, plan: Mapping[str, str] | None = None,
                    extra: Mapping[str, Any] | None = None, group: Any = None) -> Path:
    """Write ``model`` (plain or sharded with FSDP2) and ``optimizer`` at training ``step`` to
    ``directory``; a collective: every rank of ``group`` calls it with its own shards.

    ``global_batch``: the rows per step over all ranks; `load_checkpoint` refuses a world size
    that does not divide it. ``plan``: the FDTM plan ``model`` was compressed with.
    ``extra``: JSON-able state of your own (the data position, say), returned by
    `read_checkpoint`. ``group``: the ranks ``model`` is sharded over (default: the default
    group when ``torch.distributed`` is initialised, else this process alone). An existing
    checkpoint in ``directory`` is replaced; a non-empty directory that holds none is refused.
    """
    model = unwrap(model)
    check_step(step)
    if global_batch is not None and (not isinstance(global_batch, int) or global_batch < 1):
        raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
    plan = check_plan(plan)
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-able: {e}") from None
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save a checkpoint to {directory}: it is a file")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / HEADER_FILE).is_file():
        raise ValueError(f"cannot save a checkpoint to {directory}: the directory is not empty "
                         f"and holds no {HEADER_FILE} (not a checkpoint); use a new directory")
    group, distributed = resolve_group(group)
    writer = not distributed or dist.get_rank(group) == 0
    if distributed:
        dist.barrier(group=group)  # every rank checked the directory before it changes
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        # the header first (it marks a complete checkpoint), then the old DCP files (shards of
        # a larger world would linger)
        (directory / HEADER_FILE).unlink(missing_ok=True)
        for old in [directory / ".metadata", *directory.glob("*.distcp")]:
            old.unlink(missing_ok=True)
    state = state_of(model, optimizer)
    with quiet_alone():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory), overwrite=True),
                 process_group=group, no_dist=not distributed)
    if writer:
        header = {"format": FORMAT, "version": VERSION, "step": step,
                  "world_size": dist.get_world_size(group) if distributed else 1,
                  "global_batch": global_batch, "model": describe(model),
                  "optimizer": type(optimizer).__name__ if optimizer is not None else None,
                  "extra": extra}
        if plan is not None:
            header["dtm"] = {"plan": plan}
        partial = directory / (HEADER_FILE + ".tmp")
        partial.write_text(json.dumps(header, indent=2) + "\n")
        os.replace(partial, directory / HEADER_FILE)
    if distributed:
        dist.barrier(group=group)  # no rank returns before the header is there
    return directory


def load_checkpoint(directory: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, group: Any = None) -> int:
    """Load the checkpoint in ``directory`` into ``model`` (and ``optimizer``), built and
    sharded the way this run wants them, whatever world size saved it; returns the step it was
    saved at. A collective like `save_checkpoint`. Checked before anything is read: the
    model's class, config, parameter names and shapes, the optimizer's class and the world
    size against the global batch (a ValueError names what differs)."""
    model = unwrap(model)
    header = read_checkpoint(directory)
    group, distributed = resolve_group(group)
    world = dist.get_world_size(group) if distributed else 1
    batch = header.get("global_batch")
    if batch is not None and batch % world:
        fits = ", ".join(str(w) for w in range(1, batch + 1) if batch % w == 0)
        raise ValueError(f"cannot resume {directory} on {world} ranks: it was trained with a "
                         f"global batch of {batch} rows, which does not divide over {world} "
                         f"ranks; resume on a world size that divides {batch} ({fits})")
    check_model(directory, header, model)
    saved_optim = header.get("optimizer")
    if optimizer is not None and saved_optim != type(optimizer).__name__:
        raise ValueError(f"cannot load {directory} into the {type(optimizer).__name__} "
                         "optimizer: the checkpoint holds " +
                         (f"{saved_optim} state" if saved_optim else
                          "no optimizer state (saved without one)"))
    state = state_of(model, optimizer)
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    check_shapes(directory, state[MODEL_KEY], metadata.state_dict_metadata)
    with quiet_alone():
        dcp.load(state, checkpoint_id=str(directory), process_group=group,
                 no_dist=not distributed)
    set_state_dict(model, [optimizer] if optimizer is not None else [],
                   model_state_dict=state[MODEL_KEY],
                   optim_state_dict=state.get(OPTIM_KEY, {}), options=STATE_OPTIONS)
    return header["step"]


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The checked header of the checkpoint in ``directory``: ``step``, ``world_size``,
    ``global_batch``, ``model`` (class, kind, config), ``optimizer``, ``extra`` and, for a
    compressed model, ``dtm`` (``{"plan": ...}``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot load checkpoint {directory}: no such directory")
    path = directory / HEADER_FILE
    if not path.is_file():
        raise ValueError(f"cannot load {directory}: no {HEADER_FILE} (not a checkpoint "
                         "save_checkpoint wrote, or its save did not finish)")
    try:
        header = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {path}: not readable JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"cannot load {path}: not an {FORMAT} header")
    if header.get("version") != VERSION:
        raise ValueError(f"cannot load {path}: version {header.get('version')!r}, this "
                         f"aa-compile reads version {VERSION}")
    return header


def model_from_checkpoint(directory: str | Path) -> nn.Module:
    """A freshly initialised, unsharded model of the class and config the checkpoint in
    ``directory`` was saved from (a registered kind, `aa_compile.models`): shard it, apply
    the FDTM plan if there is one, then `load_checkpoint` into it."""
    described = read_checkpoint(directory)["model"]
    if described.get("kind") is None:
        raise ValueError(f"cannot rebuild the model of {directory}: a {described['class']} is "
                         "not a registered kind (aa_compile.models); build it yourself")
    return build_model(described["kind"], described["config"])


STATE_OPTIONS = StateDictOptions(strict=True)


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as DCP saves and loads it (parameter names as keys;
    DTensor shards of a sharded model)."""
    if optimizer is None:
        model_state, _ = get_state_dict(model, [], options=STATE_OPTIONS)
        return {MODEL_KEY: model_state}
    model_state, optim_state = get_state_dict(model, [optimizer], options=STATE_OPTIONS)
    return {MODEL_KEY: model_state, OPTIM_KEY: optim_state}


def describe(model: nn.Module) -> dict[str, Any]:
    """The model's class and, for a registered kind, its kind and config fields."""
    cls = model_class(model)
    kind = next((k.name for k in KINDS.values() if cls is k.model_class), None)
    config = getattr(model, "config", None)
    fields = None
    if kind is not None and dataclasses.is_dataclass(config):  # as JSON has it: tuples as lists
        fields = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return {"class": cls.__name__, "kind": kind if fields is not None else None,
            "config": fields}


def check_model(directory: str | Path, header: Mapping[str, Any], model: nn.Module) -> None:
    """ValueError unless ``model`` is of the saved class and config."""
    saved = header.get("model") or {}
    name = model_class(model).__name__
    if saved.get("class") != name:
        raise ValueError(f"cannot load {directory} into a {name}: it holds a "
                         f"{saved.get('class')}")
    mine = describe(model)
    if saved.get("config") is None or mine["config"] is None:
        return
    theirs, ours = saved["config"], mine["config"]
    differ = [f"{k}: checkpoint {theirs.get(k)!r} vs model {v!r}"
              for k, v in ours.items() if theirs.get(k) != v]
    if differ:
        raise ValueError(f"cannot load {directory}: the model's config differs from the "
                         f"checkpoint's ({'; '.join(differ)})")


def check_shapes(directory: str | Path, model_state: Mapping[str, Any],
                 saved: Mapping[str, Any]) -> None:
    """ValueError naming every parameter / buffer missing from the checkpoint, every one it has
    that the model lacks, and every global shape that differs."""
    prefix = MODEL_KEY + "."
    stored = {k[len(prefix):]: m.size for k, m in saved.items()
              if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    mine = {k: tuple(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(mine) - set(stored))
    unexpected = sorted(set(stored) - set(mine))
    wrong = [f"{k}: checkpoint {tuple(stored[k])} vs model {mine[k]}" for k in sorted(mine)
             if k in stored and tuple(stored[k]) != mine[k]]
    problems = ([f"missing from the checkpoint: {names(missing)}"] if missing else []) + \
               ([f"not in the model: {names(unexpected)}"] if unexpected else []) + \
               ([f"shapes differ: {names(wrong)}"] if wrong else [])
    if problems:
        raise ValueError(f"cannot load {directory}: its weights do not fit the model "
                         f"({'; '.join(problems)})")


def names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_step(step: Any) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


def check_plan(plan: Mapping[str, str] | None) -> dict[str, str] | None:
    """The FDTM plan as a plain dict of strings (TypeError otherwise)."""
    if plan is None:
        return None
    if not isinstance(plan, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in plan.items()):
        raise TypeError("plan must map component names to compression specs (strings), as "
                        "aa_compile.dtm plans do")
    return dict(plan)


def resolve_group(group: Any) -> tuple[Any, bool]:
    """``(group, distributed)``: the given group, else the default group when
    ``torch.distributed`` is initialised; ``distributed`` is False for one lone process."""
    check_group(group)
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    return group, group is not None


def model_class(model: nn.Module) -> type:
    """The class ``model`` was built as: ``fully_shard`` swaps in a subclass of its own
    (``FSDPTransformer`` for a ``Transformer``)."""
    cls = type(model)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


@contextlib.contextmanager
def quiet_alone() -> Iterator[None]:
    """DCP warns on every save and load in a process without a process group, where that is
    what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def unwrap(model: Any) -> nn.Module:
    """The module itself (a ``torch.compile`` wrapper's original module)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return getattr(model, "_orig_mod", model)
