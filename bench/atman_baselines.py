"""Baselines of the AtMan workload (``bench/test_atman.py``), written independently of
``aa_compile.atman``: the original's dense-mask scheme and gradient×input.

Both take the reference :class:`~aa_compile.models.Transformer` or a Hugging Face causal LM
built with ``attn_implementation="sdpa"`` (e.g. ``LlamaForCausalLM``). Like the naive
implementation in ``tests/test_atman.py``, the dense-mask scheme swaps
``torch.nn.functional.scaled_dot_product_attention`` for the duration of the call: both
models look that function up at call time (HF's ``sdpa_attention_forward`` included), so every
layer's attention gets the dense mask whatever mask (or ``is_causal``) the model itself built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _is_hf(model) -> bool:
    return hasattr(model, "get_input_embeddings") and hasattr(model, "config") and hasattr(
        model.config, "model_type")


def model_logits(model, ids: Tensor, keep: int = 0) -> Tensor:
    """Logits ``[B, S, V]`` of ``ids [B, S]``; ``keep > 0``: those of the last ``keep``
    positions only (both models then skip the head on the other rows). HF models run without a
    KV cache (nothing is generated)."""
    if _is_hf(model):
        extra = {"logits_to_keep": keep} if keep else {}
        return model(input_ids=ids, use_cache=False, **extra).logits
    return model(ids, logits_to_keep=keep)


def input_embedding(model) -> torch.nn.Module:
    return model.get_input_embeddings() if _is_hf(model) else model.embed


def dense_explain(model, prompt: Tensor, target: Tensor, batch: int,
                  factor: float = 0.1) -> Tensor:
    """The original's scheme (log_additive): full sequences, one dense ``[S, S]`` additive mask
    per perturbation (``[batch, 1, S, S]`` per forward), the full-vocabulary head on every
    position. ``batch=1`` is the naive loop (n + 1 forwards). Returns ``[T, P]`` scores
    ``CE(unperturbed) - CE(token suppressed)``."""
    seq = torch.cat([prompt, target[:-1]])
    P, S = prompt.numel(), seq.numel()
    causal = torch.ones(S, S, dtype=torch.bool, device=seq.device).tril()
    neg = torch.zeros(S, S, device=seq.device).masked_fill_(~causal, float("-inf"))
    configs = [None] + list(range(P))
    state = {}
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        # the model's own mask / is_causal is replaced by the perturbation's dense mask
        return orig(q, k, v, attn_mask=state["mask"].to(q.dtype), scale=scale,
                    enable_gqa=enable_gqa)

    log_f = math.log(factor)
    ces = []
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        with torch.no_grad():
            for lo in range(0, len(configs), batch):
                chunk = configs[lo:lo + batch]
                mask = neg.expand(len(chunk), 1, S, S).clone()
                for r, c in enumerate(chunk):
                    if c is not None:
                        mask[r, 0, :, c] += log_f
                state["mask"] = mask
                logits = model_logits(model, seq[None].expand(len(chunk), -1))[:, P - 1:]
                lp = torch.log_softmax(logits.float(), -1)
                ces.append(-lp.gather(-1, target.view(1, -1, 1).expand(len(chunk), -1, 1))[..., 0])
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    ce = torch.cat(ces)
    return (ce[0][None] - ce[1:]).T  # [T, P]


def grad_x_input(model, prompt: Tensor, target: Tensor) -> Tensor:
    """Gradient×input, for contrast: one forward over ``prompt + target[:-1]`` (the head on the
    target rows only) and one backward of the *summed* teacher-forced cross-entropy of the
    target tokens w.r.t. the input embeddings; ``score[i] = Σ_h grad[i, h] · emb[i, h]`` for
    each prompt position (``[P]``: one explanation of the whole target, not one per target
    token, which would take T backwards). The parameters are frozen during the call, so the
    forward keeps only what the input gradient needs and no weight gradient is computed (the
    cheapest gradient×input there is)."""
    seq = torch.cat([prompt, target[:-1]])
    P, T = prompt.numel(), target.numel()
    saved = {}

    def hook(module, args, out):
        out = out.detach().requires_grad_()
        saved["emb"] = out
        return out

    params = [p for p in model.parameters() if p.requires_grad]
    handle = input_embedding(model).register_forward_hook(hook)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            logits = model_logits(model, seq[None], keep=T)[0]
            ce = F.cross_entropy(logits.float(), target, reduction="sum")
            (grad,) = torch.autograd.grad(ce, saved["emb"])
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(True)
    emb = saved.pop("emb")
    return (grad[0, :P] * emb[0, :P].detach()).sum(-1)
