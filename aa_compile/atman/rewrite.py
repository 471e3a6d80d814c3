"""The rewrite: every ``F.scaled_dot_product_attention`` call becomes ``aa::atman_attention``.

``AtmanAttentionMode`` is a ``TorchFunctionMode``: while it is active, each call of
``torch.nn.functional.scaled_dot_product_attention`` the model makes (HF ``transformers``'
``sdpa`` attention, the reference transformer, any hand-written module) is intercepted at the
torch-function level, i.e. at exactly the call site dynamo would record as an FX node, and
replaced by ``aa::atman_attention`` fed from the compact suppression spec of the current batch.
This catches calls across graph breaks, in every module and in any Python code path, at no
compile cost; the model is not modified.

The mode also implements prefix sharing. In the *record* pass (the unperturbed forward) it
keeps each call's keys/values (call ``c`` of the forward is "layer" ``c``). In a *suffix* pass
the model runs only on positions ``start..S-1`` and passes only those positions' keys (HF
models run with ``position_ids``; the reference transformer with a stand-in cache that shifts
its RoPE positions and hands back the pass's own keys, see ``explain._PrefixCache``). The mode
hands the recorded keys/values of positions ``< start`` to ``aa::atman_attention`` as its
shared ``prefix_k``/``prefix_v`` (one ``[1, H, start, D]`` view for the whole batch, never
copied per row) and sets ``q_offset``. A call may carry the queries of the pass's last ``n``
positions only (the reference transformer's last layer under ``logits_to_keep``); they are
aligned to the end of the keys. The model's mask is not used (a causal mask is
re-derived from ``q_offset``); the mode checks that what the model asked for *is* causal
(over its own keys, or over prefix + own keys where the model's mask covers both) and raises
otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class NotCausalError(ValueError):
    pass


def _check_causal(mask: Tensor | None, is_causal: bool, sq: int, sk: int) -> None:
    """The model's SDPA arguments must describe plain causal attention (bottom-right aligned)."""
    if mask is None:
        if is_causal and sq != sk:
            # SDPA's is_causal is top-left aligned; with sq != sk that is not what we compute
            raise NotCausalError(
                f"scaled_dot_product_attention(is_causal=True) with {sq} queries and {sk} keys is "
                "top-left aligned; AtMan needs ordinary causal decoding"
            )
        if not is_causal and sq > 1:
            raise NotCausalError(
                "the model calls scaled_dot_product_attention without a causal mask: AtMan "
                "explanations (and prefix sharing) need a causal decoder"
            )
        return
    allowed = mask if mask.dtype == torch.bool else (mask == 0)
    if mask.dtype != torch.bool:
        blocked = mask[~allowed]
        if blocked.numel() and bool((blocked > -1e4).any()):
            raise NotCausalError("the model's attention mask is a soft bias, not a causal mask")
    want = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril(sk - sq)
    if not bool((allowed == want).all()):
        raise NotCausalError(
            "the model's attention mask is not a plain causal mask (padding? a prefix-LM or "
            "sliding window?): AtMan supports causal decoders on unpadded input"
        )


class AtmanAttentionMode(TorchFunctionMode):
    """Route SDPA through ``aa::atman_attention``; see the module docstring.

    Attributes set by the explainer between forwards: ``phase`` (``"record"`` or ``"perturb"``),
    ``start`` (first position of the pass), ``length`` (positions in the pass), ``spec``
    (``(suppress_idx [B, n], suppress_factor [B, n])``), ``prefix`` (whether the model passes
    only the pass's own keys, so that the recorded keys of positions ``< start`` go in front),
    ``record`` (whether the record pass keeps the keys/values).
    """

    def __init__(self, mode: str, layers: set[int] | None = None) -> None:
        super().__init__()
        self.mode = mode
        self.layers = layers
        self.phase = "record"
        self.start = 0
        self.length = 0
        self.spec: tuple[Tensor, Tensor] | None = None
        self.prefix = False
        self.record = True
        self.kv: list[tuple[Tensor, Tensor]] = []
        self.calls = 0

    def begin(self, phase: str, start: int, length: int, spec=None) -> None:
        self.phase, self.start, self.length, self.spec = phase, start, length, spec
        self.calls = 0
        if phase == "record":
            self.kv = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        bound = dict(zip(_SDPA_ARGS, args))
        bound.update(kwargs)
        return self._attention(**bound)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False):
        if dropout_p:
            raise ValueError(
                f"scaled_dot_product_attention was called with dropout_p={dropout_p}: put the "
                "model in eval() mode before explaining"
            )
        call = self.calls
        self.calls += 1
        q = query
        packed = q.dim() == 4 and q.shape[2] != self.length and self.length == 1
        if packed:  # HF packs a single query's GQA heads as [B, Hkv, n_rep, D]
            q = q.reshape(q.shape[0], q.shape[1] * q.shape[2], 1, q.shape[3])
        sq = q.shape[2]
        if q.dim() != 4 or not 0 < sq <= self.length:
            raise NotCausalError(
                f"scaled_dot_product_attention call {call} has query shape {tuple(query.shape)}; "
                f"expected [B, heads, n, D] with n <= {self.length} (queries of the pass's last "
                "n tokens)"
            )
        k, v = key, value
        n_pre = self.start if (self.phase == "perturb" and self.prefix and self.start > 0) else 0
        sk = k.shape[2]
        if attn_mask is not None and n_pre and attn_mask.shape[-1] == n_pre + sk:
            _check_causal(attn_mask, is_causal, sq, n_pre + sk)  # the model's mask sees the prefix
        else:
            _check_causal(attn_mask, is_causal, sq, sk)
        b = q.shape[0]
        pk = pv = None
        if self.phase == "record":
            if self.record:
                self.kv.append((k, v))
        elif n_pre:
            if call >= len(self.kv):
                raise RuntimeError(
                    f"the model made more attention calls ({call + 1}) in a suffix pass than in "
                    f"the unperturbed pass ({len(self.kv)})"
                )
            rk, rv = self.kv[call]
            if rk.shape[1] != k.shape[1] or rk.shape[3] != k.shape[3]:
                raise RuntimeError(
                    f"attention call {call}: keys {tuple(k.shape)} in a suffix pass do not match "
                    f"the unperturbed pass's {tuple(rk.shape)}"
                )
            pk, pv = rk[:1, :, :n_pre], rv[:1, :, :n_pre]
        if self.spec is not None and (self.layers is None or call in self.layers):
            idx, fac = self.spec
        else:
            idx = torch.empty(b, 0, dtype=torch.int64, device=q.device)
            fac = torch.empty(b, 0, dtype=torch.float32, device=q.device)
        out = torch.ops.aa.atman_attention(
            q, k, v, idx, fac, self.mode, True, n_pre + sk - sq, scale, pk, pv
        )
        if packed:
            out = out.reshape(query.shape[0], query.shape[1], query.shape[2], out.shape[-1])
        return out
