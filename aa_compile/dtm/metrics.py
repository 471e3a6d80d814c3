"""Divergent Token Metrics (arXiv 2311.01544): FDT and SDT of a compressed model vs its base.

Definitions (ours; the paper's code is not public; see ``docs/dtm.md``):

- The **base** model greedily generates ``N`` tokens ``y_0..y_{N-1}`` after each prompt ``p``
  (batched, KV cache).
- The **compressed** model is run once, teacher-forced, on ``p ∘ y_{<N-1}``; its argmax
  prediction at the position of ``y_i`` is ``ŷ_i``.
- ``FDT(p) = min{i : ŷ_i ≠ y_i}`` (0-based: the number of tokens reproduced before the first
  divergence), ``N`` when there is none. Before the first divergence teacher forcing equals free
  greedy decoding, so this is the free-running first divergence.
- ``SDT(p) = #{i : ŷ_i ≠ y_i} / N``: the share of divergent positions under teacher forcing.
- Aggregates over prompts: mean (FDTM), median, percentiles, share with ``FDT ≥ τ``, mean SDT.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def logits_of(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


#: `summarize` statistics a planner may rank by (higher is better)
RANK_STATISTICS = ("fdt_mean", "fdt_median", "fdt_p10", "fdt_p25", "fdt_min")


def check_fraction(name: str, value, high: float = 1.0, closed: bool = True) -> None:
    """``ValueError`` unless ``value`` is a real number (not a bool) in ``(0, high]``
    (``closed``) or ``(0, high)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (0 < value <= high if closed else 0 < value < high):
        raise ValueError(f"{name} must be in (0, {high}{']' if closed else ')'}, got {value!r}")


def check_prompts(prompts: Tensor, n_tokens: int) -> None:
    if not isinstance(prompts, Tensor) or prompts.dtype not in (torch.int32, torch.int64):
        raise TypeError("prompts must be an int64 tensor of token ids [batch, prompt_len]")
    if prompts.dim() != 2 or prompts.shape[0] == 0:
        raise ValueError(f"prompts must be [batch >= 1, prompt_len], got {tuple(prompts.shape)}")
    if prompts.shape[1] < 1:
        raise ValueError("prompts must hold at least one token each (prompt_len >= 1)")
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens (N) must be a positive int, got {n_tokens!r}")


@torch.no_grad()
def generate(model: nn.Module, prompts: Tensor, n_tokens: int, batch_size: int = 64) -> Tensor:
    """Greedy continuation of ``n_tokens`` per prompt -> ``[B, P + N]`` (prompt included).

    Uses the reference transformer's KV-cache ``generate``, HF's ``past_key_values``, or (any
    other ``ids -> logits`` model) a cache-free loop.
    """
    check_prompts(prompts, n_tokens)
    outs = []
    for chunk in prompts.split(batch_size):
        if hasattr(model, "new_cache") and hasattr(model, "generate"):
            outs.append(model.generate(chunk, n_tokens))
            continue
        tokens, step, past = chunk, chunk, None
        hf = hasattr(model, "config") and hasattr(model.config, "use_cache")
        for _ in range(n_tokens):
            if hf:
                out = model(step, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits
            else:
                logits = logits_of(model, tokens)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            step = nxt if hf else tokens
        outs.append(tokens)
    return torch.cat(outs)


def predictions_from_logits(logits: Tensor, prompt_len: int) -> Tensor:
    """Argmax at the positions of the generated tokens: ``logits [B, P+N-1, V] -> [B, N]``."""
    return logits[:, prompt_len - 1:].argmax(-1)


@torch.no_grad()
def teacher_forced(model: nn.Module, tokens: Tensor, prompt_len: int,
                   batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """One pass over ``tokens[:, :-1]``: ``(predictions [B, N], nll [B])``, where ``nll`` is the
    mean cross-entropy of the reference tokens ``tokens[:, P:]`` (for perplexity baselines)."""
    preds, nlls = [], []
    for chunk in tokens.split(batch_size):
        logits = logits_of(model, chunk[:, :-1])[:, prompt_len - 1:].float()
        preds.append(logits.argmax(-1))
        nlls.append(F.cross_entropy(logits.transpose(1, 2), chunk[:, prompt_len:],
                                    reduction="none").mean(1))
    return torch.cat(preds), torch.cat(nlls)


def divergence(reference: Tensor, predictions: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence ``(FDT int64 [B], SDT float [B])`` from ``[B, N]`` tokens."""
    if reference.shape != predictions.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(predictions.shape)}")
    diff = reference != predictions
    n = diff.shape[1]
    fdt = torch.where(diff.any(1), diff.to(torch.int8).argmax(1), torch.full_like(diff[:, 0],
                      n, dtype=torch.long)).long()
    return fdt, diff.float().mean(1)


def summarize(fdt: Tensor, sdt: Tensor, n_tokens: int, tau: float | None = None) -> dict:
    """Aggregates: FDT mean (FDTM), median, p10/p25/p75/p90, min, share with FDT ≥ τ (τ
    defaults to N, i.e. "no divergence at all"), SDT mean (SDTM)."""
    f = fdt.double()
    q = torch.quantile(f, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    tau = n_tokens if tau is None else tau
    return {
        "n_tokens": n_tokens, "n_prompts": int(fdt.numel()),
        "fdt_mean": f.mean().item(), "fdt_median": q[2].item(),
        "fdt_p10": q[0].item(), "fdt_p25": q[1].item(), "fdt_p75": q[3].item(),
        "fdt_p90": q[4].item(), "fdt_min": int(fdt.min()),
        "tau": tau, "share_fdt_ge_tau": (f >= tau).double().mean().item(),
        "sdt_mean": sdt.double().mean().item(),
    }


@dataclasses.dataclass
class DTMResult:
    fdt: Tensor
    sdt: Tensor
    n_tokens: int
    nll: Tensor | None = None

    def summary(self, tau: float | None = None) -> dict:
        return summarize(self.fdt, self.sdt, self.n_tokens, tau)


@torch.no_grad()
def dtm(base: nn.Module, compressed: nn.Module, prompts: Tensor, n_tokens: int,
        reference: Tensor | None = None, batch_size: int = 64) -> DTMResult:
    """FDT/SDT of ``compressed`` against ``base`` on ``prompts`` (``[B, P]``, ``N`` tokens).

    ``reference``: the base model's ``generate`` output, to reuse across calls.
    """
    check_prompts(prompts, n_tokens)
    p = prompts.shape[1]
    if reference is None:
        reference = generate(base, prompts, n_tokens, batch_size)
    if reference.shape != (prompts.shape[0], p + n_tokens):
        raise ValueError(f"reference must be [B, P + N] = {(prompts.shape[0], p + n_tokens)}, "
                         f"got {tuple(reference.shape)}")
    preds, nll = teacher_forced(compressed, reference, p, batch_size)
    fdt, sdt = divergence(reference[:, p:], preds)
    return DTMResult(fdt, sdt, n_tokens, nll)
