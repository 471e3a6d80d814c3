"""Activation store: activations of a model at one site, streamed to safetensors shards on disk.

`collect_activations` runs the model over batches of token ids (with per-token concept labels),
grabs the site's output with a forward hook (collection is eager work, done once), and writes
shards of ``shard_tokens`` rows: ``activations [n, d]``, ``labels [n, C]`` and ``token_ids [n]``.
`ActivationStore` reads them back: all at once or in shuffled mini-batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from aa_compile.progress import progress

from .sites import parse_site, site_module

META_FILE = "store.json"


def site_output(output: object) -> Tensor:
    """The hidden state in a module output (HF decoder layers may return a tuple)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"site output is a {type(output).__name__}, not a tensor or a tuple of them")


def check_finite(x: Tensor, what: str) -> None:
    """Raise on NaN or infinite entries (an SAE trained on them learns nothing useful)."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what}: {bad} NaN/inf entries")


class ActivationStore:
    """Shards written by `collect_activations` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"no activation store at {self.root} (missing {META_FILE})")
        self.meta = json.loads(meta_path.read_text())
        self.shards = [self.root / name for name in self.meta["shards"]]

    @property
    def site(self) -> str:
        return self.meta["site"]

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def concepts(self) -> list[str]:
        return list(self.meta["concepts"])

    def __len__(self) -> int:
        return int(self.meta["tokens"])

    def load(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(activations, labels, token_ids)`` of every shard, concatenated."""
        parts = [load_file(str(p)) for p in self.shards]
        if not parts:
            return (torch.empty(0, self.width), torch.empty(0, len(self.concepts)),
                    torch.empty(0, dtype=torch.long))
        return tuple(torch.cat([p[key] for p in parts]) for key in  # type: ignore[return-value]
                     ("activations", "labels", "token_ids"))

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(activations, labels)`` mini-batches over the store, shuffled within shards."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen) if shuffle else \
            torch.arange(len(self.shards))
        for s in order.tolist():
            shard = load_file(str(self.shards[s]))
            acts, labels = shard["activations"], shard["labels"]
            idx = torch.randperm(len(acts), generator=gen) if shuffle else torch.arange(len(acts))
            for i in range(0, len(idx), batch_size):
                j = idx[i:i + batch_size]
                yield acts[j].float(), labels[j]


def collect_activations(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], site: str,
                        out_dir: str | Path, *, concepts: Iterable[str] = (),
                        shard_tokens: int = 65536, dtype: torch.dtype = torch.float32,
                        total: int | None = None, show_progress: bool = True) -> ActivationStore:
    """Run ``model`` over ``(token_ids [B, S], labels [B, S, C])`` batches and store the site's
    activations token by token. Works for the reference transformer and HF causal LMs."""
    parse_site(model, site)
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be > 0, got {shard_tokens}")
    concepts = list(concepts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grabbed: list[Tensor] = []
    handle = site_module(model, site).register_forward_hook(
        lambda _m, _i, o: grabbed.append(site_output(o).detach()))
    buffers: dict[str, list[Tensor]] = {"activations": [], "labels": [], "token_ids": []}
    shards: list[str] = []
    tokens = 0
    width: int | None = None

    def flush() -> None:
        if not buffers["activations"]:
            return
        name = f"shard_{len(shards):05d}.safetensors"
        save_file({k: torch.cat(v).contiguous() for k, v in buffers.items()}, str(out / name))
        shards.append(name)
        for v in buffers.values():
            v.clear()

    pending = 0
    try:
        with torch.no_grad():
            for ids, labels in progress(batches, total=total, desc=f"activations @ {site}",
                                        unit="batch", disable=not show_progress):
                if labels.shape[:2] != ids.shape or labels.dim() != 3 or \
                        labels.shape[2] != len(concepts):
                    raise ValueError(f"labels must be [batch, seq, concepts={len(concepts)}] "
                                     f"matching token ids {tuple(ids.shape)}, got "
                                     f"{tuple(labels.shape)}")
                grabbed.clear()
                model(ids)
                acts = grabbed[-1]
                check_finite(acts, f"activations at {site}")
                width = acts.shape[-1]
                buffers["activations"].append(acts.reshape(-1, width).to(dtype))
                buffers["labels"].append(labels.reshape(-1, len(concepts)).float())
                buffers["token_ids"].append(ids.reshape(-1).long())
                tokens += ids.numel()
                pending += ids.numel()
                if pending >= shard_tokens:
                    flush()
                    pending = 0
        flush()
    finally:
        handle.remove()
    if width is None:
        raise ValueError("collect_activations got no batches")
    (out / META_FILE).write_text(json.dumps({
        "site": site, "width": width, "concepts": concepts, "tokens": tokens, "shards": shards,
    }, indent=1))
    return ActivationStore(out)
