"""``explain``: AtMan explanations (arXiv 2301.08110) for any causal model that calls SDPA.

For each explained item (a token, a word or a span of the prompt) the attention to its key
positions is suppressed in every layer (or the chosen ``layers``) by the ``factor``, and the
change of the teacher-forced cross-entropy of each target token is measured:

    score[t, item] = CE_t(unperturbed) - CE_t(item suppressed)        (original sign)

How the work is organised (see ``docs/atman.md``):
1. One unperturbed forward over ``prompt + target[:-1]`` (S positions) gives the baseline
   cross-entropies and, kept by :class:`~aa_compile.atman.rewrite.AtmanAttentionMode`, every
   layer's keys/values.
2. A perturbation whose earliest suppressed position is ``p`` leaves every position ``< p``
   unchanged in every layer (causal attention; the suppression and the multiplicative mode's
   row minimum only involve keys a query can see). Perturbations are sorted by ``p`` and packed
   into batches; a batch runs only positions ``min p .. S-1``, its attention reading the
   recorded keys/values of the positions before as one prefix shared by all its rows.
3. Only the target rows need logits: the head (and, on the reference transformer, the last
   layer's queries and MLP) runs on those rows only.
4. A batch grows to about ``batch_tokens`` positions (few rows when the passes are long, so
   little is recomputed before the rows' own first positions) within ``max_memory`` (an
   estimate of activation bytes) and ``max_batch_size`` rows.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import aa_compile.ops  # noqa: F401  (defines aa::atman_attention)
from aa_compile.distributed.work import (
    check_close,
    check_group,
    check_same,
    is_writer,
    owned,
    sum_over_ranks,
)
from aa_compile.progress import progress as progress_bar

from .explanation import Explanation
from .rewrite import AtmanAttentionMode

MODES = ("log_additive", "multiplicative")
DEFAULT_BUDGET = 1 << 30
DEFAULT_MAX_BATCH = 32
#: positions per batched forward a batch stops growing at (CPU; elsewhere x16): a few thousand
#: rows keep the GEMMs efficient, and smaller batches recompute fewer positions before their
#: rows' own first suppressed positions
DEFAULT_BATCH_TOKENS = 2048


def _model_kind(model) -> str:
    from aa_compile.models.transformer import Transformer

    if isinstance(model, Transformer):
        return "reference"
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "generic"
    return "hf" if "position_ids" in params else "generic"


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def _input_embedding(model):
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    if isinstance(getattr(model, "embed", None), torch.nn.Module):
        return model.embed
    raise ValueError(
        "conceptual_threshold needs the model's input embedding: give the model "
        "get_input_embeddings() (HF) or an `embed` module"
    )


def _vocab_size(model) -> int | None:
    """Rows of the model's input embedding (HF ``get_input_embeddings()``, the reference
    transformer's ``embed``); None where the model has none to find."""
    try:
        emb = _input_embedding(model)
    except (ValueError, NotImplementedError, AttributeError):
        return None
    n = getattr(emb, "num_embeddings", None)
    if isinstance(n, int):
        return n
    w = getattr(emb, "weight", None)
    return w.shape[0] if isinstance(w, Tensor) and w.dim() == 2 else None


def _check_ids(ids: Tensor, name: str, vocab: int) -> None:
    """A clear error up front instead of an IndexError inside the embedding or the loss."""
    bad = torch.nonzero((ids < 0) | (ids >= vocab)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}] = {int(ids[i])} is not a token id of the model: ids must lie in "
            f"[0, {vocab}) (the size of its input embedding)"
        )


def _layer_list(layers) -> list[int] | None:
    if layers is None:
        return None
    try:
        out = [operator.index(i) for i in layers]
    except TypeError:
        raise TypeError(f"layers must be a sequence of int indices, got {layers!r}") from None
    if not out:
        raise ValueError("layers is empty: nothing would be suppressed; pass None for all")
    return out


def _resolve_layers(layers: list[int], n_calls: int) -> set[int]:
    """Negative indices count from the end (Python-style); the range is only known after the
    first forward (the number of attention calls it makes)."""
    bad = [i for i in layers if not -n_calls <= i < n_calls]
    if bad:
        raise ValueError(
            f"layers={layers}: {bad[0]} is out of range; the model makes {n_calls} attention "
            f"calls per forward, so layer indices must lie in 0..{n_calls - 1} (or "
            f"-{n_calls}..-1 from the end)"
        )
    return {i % n_calls for i in layers}


def _as_ids(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, Sequence) and not isinstance(x, str):
        t = torch.tensor(list(x), dtype=torch.int64)
    else:
        raise TypeError(f"{name} must be a tensor or a list of token ids, got {type(x).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must hold integer token ids, got {t.dtype}")
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ValueError(
                f"{name} has batch {t.shape[0]}: explain one unpadded sequence at a time "
                "(padding is not supported)"
            )
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be [seq] or [1, seq], got shape {tuple(t.shape)}")
    return t.long()


def _items(granularity, prompt_len: int, tokens: list[str] | None) -> list[tuple[int, ...]]:
    if granularity == "token":
        return [(i,) for i in range(prompt_len)]
    if granularity == "word":
        if tokens is None:
            raise ValueError("granularity='word' needs a tokenizer (to see where words start)")
        items: list[list[int]] = []
        for i in range(prompt_len):
            tok = tokens[i]
            if not items or tok[:1] in ("Ġ", "▁", " ", "\n", "Ċ"):
                items.append([i])
            else:
                items[-1].append(i)
        return [tuple(w) for w in items]
    if isinstance(granularity, Sequence) and not isinstance(granularity, str):
        items = []
        for span in granularity:
            if (not isinstance(span, Sequence) or len(span) != 2
                    or not 0 <= span[0] < span[1] <= prompt_len):
                raise ValueError(
                    f"granularity spans must be (start, end) pairs with 0 <= start < end <= "
                    f"{prompt_len} (the prompt length), got {span!r}"
                )
            items.append(tuple(range(span[0], span[1])))
        if not items:
            raise ValueError("granularity: the list of spans is empty")
        return items
    raise ValueError(f"granularity must be 'token', 'word' or a list of (start, end) spans, "
                     f"got {granularity!r}")


def perturbation_specs(items, n_positions: int, factor: float,
                       conceptual_threshold: float | None,
                       embeddings: Tensor | None) -> list[dict[int, float]]:
    """Per item: ``{position: multiplier}``. With conceptual suppression, each position ``k``
    whose input embedding has cosine ``c >= threshold`` with a suppressed token gets
    ``(1 - factor)(1 - c) + factor`` (= ``1 - f_paper · c``); the strongest (smallest) wins."""
    cos = None
    if conceptual_threshold is not None:
        e = F.normalize(embeddings.double(), dim=-1, eps=1e-8)
        cos = (e @ e.T).clamp(-1.0, 1.0)
    specs = []
    for item in items:
        spec = {p: factor for p in item}
        if cos is not None:
            for p in item:
                c = cos[p]
                for kk in torch.nonzero(c >= conceptual_threshold).flatten().tolist():
                    if kk == p:
                        continue
                    m = (1.0 - factor) * (1.0 - float(c[kk])) + factor
                    spec[kk] = min(spec.get(kk, 1.0), m)
        specs.append(spec)
    return specs


def _logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in the model output of type {type(out).__name__}")


def _target_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits [B, T, V]``, ``targets [T]`` -> cross-entropy ``[B, T]`` in float32."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -lp.gather(-1, targets.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(-1)


def explain(model, input_ids, target, *, factor: float = 0.1, mode: str = "log_additive",
            conceptual_threshold: float | None = None, granularity="token",
            layers: Sequence[int] | None = None, max_memory: int | None = None,
            progress: bool = True, tokenizer=None, attention_mask: Tensor | None = None,
            include_target: bool = False, prefix_sharing: bool = True,
            max_batch_size: int = DEFAULT_MAX_BATCH,
            batch_tokens: int | None = None, group=None) -> Explanation:
    """Explain ``target`` (the continuation) by the prompt ``input_ids`` with AtMan.

    Args:
        model: a causal LM whose attention calls ``F.scaled_dot_product_attention``: the
            reference :class:`~aa_compile.models.Transformer`, an HF ``transformers`` model with
            ``attn_implementation="sdpa"`` or any module (without prefix sharing).
        input_ids: the prompt, ``[P]`` or ``[1, P]``, unpadded. ``target``: token ids (or a
            string with ``tokenizer``), teacher-forced after the prompt.
        factor: the suppression multiplier ``m`` (production/code default 0.1; the paper's
            ``f = 0.9`` is ``1 - m``). ``(0, 1]`` for log_additive, ``[0, 1]`` multiplicative.
        mode: ``"log_additive"`` (scores ``+= log m``, the production API default) or
            ``"multiplicative"`` (``(s - rowmin) · m``, the research code's default).
        conceptual_threshold: κ; co-suppress positions whose input embeddings have cosine
            similarity ``>= κ`` with a suppressed token (paper: 0.7). None = off.
        granularity: ``"token"``, ``"word"`` (needs ``tokenizer``) or ``[(start, end), ...]``
            prompt spans.
        layers: indices of the attention calls (layers) to manipulate, in call order;
            negative ones count from the end (-1 = last); None = all. An index outside
            ``-n..n-1`` (n calls per forward) raises ValueError after the first forward.
        max_memory: bytes of activation memory the batched forwards may use (an estimate);
            default 1 GiB and at most ``max_batch_size`` rows per forward.
        batch_tokens: a batch stops growing once rows × positions reach this (default 2048 on
            CPU, 32768 on other devices).
        include_target: also explain each target token by the target tokens before it.
        prefix_sharing: run perturbations only from their first suppressed position on
            (exact; False recomputes full sequences as the original does).
        group: a ``torch.distributed`` process group whose ranks each run every
            ``world``-th perturbation batch and sum the scores (every rank returns the whole
            explanation, equal to one process's; every rank must pass the same model and
            arguments). None: one process.
    Returns:
        :class:`Explanation` with ``scores [T, n_items]`` = ΔCE (relevant items negative).
    """
    check_group(group)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(factor, (int, float)) or math.isnan(factor):
        raise ValueError(f"factor must be a number, got {factor!r}")
    lo_ok = factor > 0 if mode == "log_additive" else factor >= 0
    if not (lo_ok and factor <= 1):
        rng = "(0, 1]" if mode == "log_additive" else "[0, 1]"
        raise ValueError(
            f"factor={factor} is out of range: it is the attention multiplier of a suppressed "
            f"token and must lie in {rng} for mode {mode!r} (e.g. 0.1)"
        )
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    if batch_tokens is not None and (not isinstance(batch_tokens, int) or batch_tokens < 1):
        raise ValueError(f"batch_tokens must be a positive int or None, got {batch_tokens!r}")
    if conceptual_threshold is not None and not 0.0 < conceptual_threshold <= 1.0:
        raise ValueError(f"conceptual_threshold must lie in (0, 1] or be None, got "
                         f"{conceptual_threshold!r}")
    layer_list = _layer_list(layers)
    prompt = _as_ids(input_ids, "input_ids")
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise ValueError("attention_mask has zeros: padded input is not supported; pass the "
                         "unpadded sequence")
    if isinstance(target, str):
        if tokenizer is None:
            raise TypeError("target is a string: pass tokenizer=... or give token ids")
        target = tokenizer(target, add_special_tokens=False)["input_ids"]
    tgt = _as_ids(target, "target")
    if tgt.numel() == 0:
        raise ValueError("target is empty: give at least one target token to explain")
    if prompt.numel() == 0:
        raise ValueError("input_ids is empty: give a prompt to explain")
    vocab = _vocab_size(model)
    if vocab is not None:
        _check_ids(prompt, "input_ids", vocab)
        _check_ids(tgt, "target", vocab)
    P, T = prompt.numel(), tgt.numel()
    S = P + T - 1
    limit = _max_positions(model)
    if limit is not None and S > limit:
        raise ValueError(
            f"prompt ({P}) + target ({T}) - 1 = {S} positions exceed the model's maximum of "
            f"{limit}: shorten the target or the prompt"
        )
    device = next(model.parameters()).device
    seq = torch.cat([prompt, tgt[:-1]]).to(device)
    tgt = tgt.to(device)

    tokens = tokenizer.convert_ids_to_tokens(seq.tolist()) if tokenizer is not None else None
    items = _items(granularity, P, tokens)
    if include_target:
        items += [(P + u,) for u in range(T - 1)]

    def label(pos: tuple[int, ...]) -> str:
        ids = [int(seq[p]) for p in pos]
        if tokenizer is not None:
            return tokenizer.decode(ids)
        return " ".join(str(i) for i in ids)

    item_labels = [label(i) for i in items]
    target_labels = ([tokenizer.decode([int(t)]) for t in tgt] if tokenizer is not None
                     else [str(int(t)) for t in tgt])

    kind = _model_kind(model)
    if not prefix_sharing:
        kind = "generic"
    was_training = model.training
    model.eval()
    amode = AtmanAttentionMode(mode)  # layers: set by _run once the call count is known
    amode.prefix = amode.record = kind != "generic"
    try:
        with torch.no_grad():
            embeddings = None
            if conceptual_threshold is not None:
                embeddings = _input_embedding(model)(seq[None])[0].float()
            specs = perturbation_specs(items, S, float(factor), conceptual_threshold, embeddings)
            with amode:
                return _run(model, kind, amode, seq, tgt, P, T, S, items, specs, item_labels,
                            target_labels, mode, float(factor), conceptual_threshold,
                            max_memory, max_batch_size, batch_tokens, progress, layer_list,
                            group)
    finally:
        model.train(was_training)


class _PrefixCache:
    """Stands in for the reference transformer's ``KVCache`` in a suffix pass: ``length`` (the
    pass's first position) shifts the model's RoPE positions, and ``update`` hands back only the
    pass's own keys/values; the attention mode puts the recorded prefix in front of them (the
    model's mask over prefix + own keys is checked to be causal)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v


def _forward(model, kind: str, ids: Tensor, start: int, keep: int) -> Tensor:
    """Logits of the last ``keep`` positions of ``ids`` (positions ``start..``); the head runs
    on those rows only where the model allows it (reference transformer, HF
    ``logits_to_keep``): for a short target most of a pass's head work is skipped."""
    b, length = ids.shape
    keep = max(1, min(keep, length))
    if kind == "reference":
        cache = _PrefixCache(start) if start else None
        return _logits(model(ids, cache, logits_to_keep=keep))
    if kind == "hf":
        pos = torch.arange(start, start + length, device=ids.device).expand(b, -1)
        extra = {"logits_to_keep": keep} if _takes(model, "logits_to_keep") else {}
        out = _logits(model(input_ids=ids, position_ids=pos, use_cache=False, **extra))
        return out[:, -keep:]
    return _logits(model(ids))[:, -keep:]


def _takes(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _run(model, kind, amode, seq, tgt, P, T, S, items, specs, item_labels, target_labels,
         mode, factor, conceptual_threshold, max_memory, max_batch_size, batch_tokens, progress,
         layers, group=None):
    device = seq.device
    amode.begin("record", 0, S)
    base_logits = _forward(model, kind, seq[None], 0, S - (P - 1))
    n_calls = amode.calls
    if n_calls == 0:
        raise ValueError(
            f"{type(model).__name__} never called torch.nn.functional.scaled_dot_product_attention"
            ": AtMan rewrites SDPA calls (for HF transformers build the model with "
            "attn_implementation='sdpa')"
        )
    if layers is not None:
        amode.layers = _resolve_layers(layers, n_calls)
    base_ce = _target_ce(base_logits, tgt)[0]  # [T]: the rows of positions P-1 .. S-1
    vocab = base_logits.shape[-1]
    del base_logits

    # memory model (bytes): the recorded keys/values (shared by every batch) plus, per row of
    # a pass over `length` positions, its activations (hidden states, q/k/v, the MLP's
    # intermediate), the attention mask of its own keys and its logits rows
    p = next(model.parameters())
    esz = p.element_size()
    cfg = getattr(model, "config", None)
    hid = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or 1024
    ffn = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
           or getattr(cfg, "n_inner", None) or 4 * hid)
    fixed = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in amode.kv)

    def row_bytes(length: int) -> int:
        act = esz * length * (16 * hid + 3 * ffn)
        return act + 4 * length * length + 8 * T * vocab

    lowest = [min(s) if s else 0 for s in specs]  # first position a perturbation changes
    starts = [p if kind != "generic" else 0 for p in lowest]
    order = sorted(range(len(specs)), key=lambda i: starts[i])
    budget = max_memory if max_memory is not None else DEFAULT_BUDGET
    worst = fixed + row_bytes(S - starts[order[0]]) if order else 0
    if max_memory is not None and worst > max_memory:
        raise ValueError(
            f"max_memory={max_memory} bytes is too small for one perturbation row: about "
            f"{worst} bytes are needed for {S} positions; raise max_memory"
        )
    batches: list[list[int]] = []
    if batch_tokens is None:
        batch_tokens = DEFAULT_BATCH_TOKENS * (1 if device.type == "cpu" else 16)
    for i in order:
        if batches:
            cur = batches[-1]
            length = S - starts[cur[0]]
            if (len(cur) < max_batch_size and len(cur) * length < batch_tokens
                    and fixed + (len(cur) + 1) * row_bytes(length) <= budget):
                cur.append(i)
                continue
        batches.append([i])

    # the batches differ when the inputs or settings do, the baseline when the models do
    check_same("explain inputs or settings", (seq, tgt, specs, batches), group)
    check_close("the models' baseline cross-entropies", base_ce, group)
    mine = set(owned(len(batches), group))
    scores = torch.zeros(T, len(items), dtype=torch.float32)
    computed = S + sum(len(b) * (S - starts[b[0]]) for b in batches)
    bar = (progress_bar(total=sum(len(batches[i]) for i in mine), desc="atman",
                        unit="perturbation") if progress and is_writer(group) else None)
    for k, batch in enumerate(batches):
        if k not in mine:
            continue
        start = starts[batch[0]]
        length = S - start
        width = max(1, max(len(specs[i]) for i in batch))
        idx = torch.full((len(batch), width), -1, dtype=torch.int64)
        fac = torch.ones(len(batch), width, dtype=torch.float32)
        for r, i in enumerate(batch):
            for c, (pos, f) in enumerate(sorted(specs[i].items())):
                idx[r, c], fac[r, c] = pos, f
        amode.begin("perturb", start, length, (idx.to(device), fac.to(device)))
        ids = seq[start:][None].expand(len(batch), -1)
        first = max(0, start - (P - 1))  # first target whose logits row was recomputed
        rows = _forward(model, kind, ids, start, S - (P - 1 + first))
        if amode.calls != n_calls:
            raise RuntimeError(f"the model made {amode.calls} attention calls in a perturbed "
                               f"pass but {n_calls} in the unperturbed one")
        ce = _target_ce(rows, tgt[first:])  # [B, T - first]
        delta = (base_ce[first:][None] - ce).float().cpu()
        for r, i in enumerate(batch):
            # targets predicted before the row's own first suppressed position are unchanged
            # (exactly 0; the batch recomputed them only because it starts earlier)
            own = max(first, lowest[i] - (P - 1))
            scores[own:, i] = delta[r, own - first:]
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    scores = sum_over_ranks(scores, group)  # each column comes from one rank, zeros elsewhere
    stats: dict[str, Any] = {
        "model_kind": kind,
        "positions": S,
        "items": len(items),
        "forwards": 1 + len(batches),
        "batches": len(batches),
        "positions_computed": computed,
        "positions_naive": (len(items) + 1) * S,
        "attention_calls_per_forward": n_calls,
    }
    stats["work_saved"] = 1.0 - computed / stats["positions_naive"]
    return Explanation(scores=scores, items=items, item_labels=item_labels,
                       target_ids=[int(t) for t in tgt], target_labels=target_labels,
                       baseline_ce=base_ce.float().cpu(), mode=mode, factor=factor,
                       conceptual_threshold=conceptual_threshold, stats=stats)
