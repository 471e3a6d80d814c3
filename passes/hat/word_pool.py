"""Pass ``hat_word_pool``: the HAT reference's word pooling, SDPA of the shared latent query
``[W, H, 1, hd]`` (an ``expand``) over the padded keys/values ``k_bytes[word_bytes]``
(transposed) with the key mask ``word_mask[:, None, None, :]``, becomes ``aa::word_pool(q
[1, H, hd], k_bytes [T, H, hd], v_bytes, word_offsets, scale).unsqueeze(2)``: nothing padded.
Its guard, `prove_word_grid`, proves by evaluation that the index and mask are the padded grid
of the word offsets (``docs/hat.md``)."""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from aa_compile.passes import match
from aa_compile.passes.hat.proof import (INDEX_DTYPES, N_PROBES, ProofCache, bounded_layout,
                                         subgraph)
from aa_compile.passes.hat.rewrite import SdpaRewritePass, check_tensors, sdpa_args
from aa_compile.passes.hat.shapes import same, size_at


def prove_word_grid(gm: fx.GraphModule, index: fx.Node, mask: fx.Node, n
                    ) -> fx.Node | str:
    """The ``word_offsets`` node if ``index`` ``[W, L]`` and ``mask`` (``[W, 1|H, 1, L]``) are
    the padded word grid of a [W + 1] offsets input over ``n`` bytes, else the reason."""
    sub = subgraph(gm, [index, mask])
    if isinstance(sub, str):
        return sub
    length = match.tensor_value(sub.leaf).shape[0]
    iv, mv = match.tensor_value(index), match.tensor_value(mask)
    if not same(length, iv.shape[0] + 1):
        return f"the word grid's input {sub.leaf.name} is not [W + 1] offsets"
    why = sub.include(n, *iv.shape, *mv.shape)
    if why:
        return why

    def fits(sizes: dict) -> bool:  # a layout of W words of 1..L bytes covers T bytes
        n_words, width, t = (size_at(s, sizes) for s in (iv.shape[0], iv.shape[1], n))
        return n_words >= 1 and n_words <= t <= n_words * width

    gen = torch.Generator().manual_seed(0)
    for sizes in sub.size_probes(fits):
        try:
            n_words, width, t = (size_at(s, sizes) for s in (iv.shape[0], iv.shape[1], n))
            mask_shape = tuple(size_at(s, sizes) for s in mv.shape)
        except ValueError as e:
            return str(e)
        layouts = [bounded_layout(n_words, t, 1, width, gen) for _ in range(N_PROBES)]
        layouts += [bounded_layout(n_words, t, lo, hi, gen)
                    for lo, hi in ((1, 1), (width, width), (1, max(1, width // 2)))]
        layouts = [x for x in layouts if x is not None]
        if not layouts:
            return "no word layout fits T, W and L (T < W or T > W * L)"
        cols = torch.arange(width)
        for lay in layouts:
            try:
                got_index, got_mask = sub(lay, sizes)
            except Exception as e:  # noqa: BLE001
                return (f"evaluating the word grid on probe offsets failed "
                        f"({type(e).__name__}: {e})")
            want = cols < lay.diff()[:, None]
            if got_mask.dtype != torch.bool or tuple(got_mask.shape) != mask_shape \
                    or tuple(got_index.shape) != (n_words, width) \
                    or not torch.equal(got_mask[:, :, 0, :],
                                       want[:, None, :].expand(-1, got_mask.shape[1], -1)):
                return "the key mask is not the word-length mask of the word offsets"
            starts = (lay[:-1, None] + cols).expand_as(got_index)
            if not torch.equal(got_index[want], starts[want]) or got_index.min() < 0 \
                    or got_index.max() >= t:
                return "the gathered byte indices are not the word offsets' grid"
    return sub.leaf


def _gathered(node) -> tuple[fx.Node, fx.Node] | None:
    """``(base [T, H, hd], index [W, L])`` if ``node`` is ``base[index].transpose(1, 2)``."""
    if not match.is_op(node, (torch.transpose, torch.Tensor.transpose), ("transpose",)):
        return None
    dims = {match.arg(node, 1, "dim0"), match.arg(node, 2, "dim1")}
    if dims != {1, 2}:
        return None
    g = node.args[0]
    if not (isinstance(g, fx.Node) and g.op == "call_function" and g.target is operator.getitem):
        return None
    base, index = g.args
    bv, iv = match.tensor_value(base), match.tensor_value(index)
    if bv is None or iv is None or bv.dim() != 3 or iv.dim() != 2 or iv.dtype not in INDEX_DTYPES:
        return None
    return base, index


def _query(q: fx.Node) -> fx.Node:
    """The shared ``[1, H, 1, hd]`` query under an ``expand``, else ``q`` itself."""
    if match.is_op(q, (torch.Tensor.expand,), ("expand",)):
        src = q.args[0]
        sv = match.tensor_value(src)
        if sv is not None and sv.dim() == 4 and same(sv.shape[0], 1):
            return src
    return q


@dataclasses.dataclass
class WordPool:
    """A pooling SDPA node the guard admitted, and what the op call needs."""

    q: fx.Node  # the shared [1, H, 1, hd] query when q is its expand, else q
    k_bytes: fx.Node  # [T, H, hd], before the gather
    v_bytes: fx.Node
    offsets: fx.Node
    scale: float | None
    used: list[fx.Node]  # the SDPA's inputs that may go dead with it


class WordPoolPass(SdpaRewritePass):
    name = "hat_word_pool"
    description = ("SDPA of one query per word over the padded gathered bytes with a proven "
                   "word mask -> aa::word_pool")

    def check(self, gm: fx.GraphModule, node: fx.Node, cache: ProofCache
              ) -> WordPool | str | None:
        """The guard: k and v gathered by one ``[W, L]`` index from ``[T, H, hd]`` bytes, q
        ``[W, H, 1, hd]``, a ``[W, 1|H, 1, L]`` bool mask, float tensors on one cpu/cuda
        device, and index and mask proven to be the word grid."""
        args = sdpa_args(node)
        if isinstance(args, str):
            return None  # the window pass reports SDPA options; pooling never sets them
        q, k, v, mask, scale = args
        mv, qv = match.tensor_value(mask), match.tensor_value(q)
        gk, gv = _gathered(k), _gathered(v)
        if mv is None or mv.dim() != 4 or gk is None or gv is None:
            return None  # not the padded pooling pattern
        why = check_tensors(q, gk[0], gv[0])
        if why:
            return why
        (kb, index), (vb, index_v) = gk, gv
        if index_v is not index:
            return "keys and values are gathered with different index tensors"
        kbv, vbv = match.tensor_value(kb), match.tensor_value(vb)
        n_words, width = match.tensor_value(index).shape
        if qv.dim() != 4 or mv.dtype != torch.bool:
            return "q is not [W, H, 1, hd] or the mask is not bool"
        h = qv.shape[1]
        if not (same(qv.shape[0], n_words) and same(qv.shape[2], 1)
                and same(kbv.shape[1], h) and same(vbv.shape[1], h)
                and same(kbv.shape[0], vbv.shape[0]) and same(mv.shape[0], n_words)
                and same(mv.shape[2], 1) and same(mv.shape[3], width)
                and (same(mv.shape[1], 1) or same(mv.shape[1], h))):
            return "shapes are not q [W, H, 1, hd], k/v [W, H, L, hd], mask [W, 1, 1, L] bool"
        proof = cache.get((index, mask), lambda i=index, m=mask, t=kbv.shape[0]:
                          prove_word_grid(gm, i, m, t))
        if isinstance(proof, str):
            return proof
        return WordPool(_query(q), kb, vb, proof, scale, [q, k, v, mask])

    def rewrite(self, graph: fx.Graph, node: fx.Node, found: WordPool
                ) -> tuple[fx.Node, list[fx.Node]]:
        q3 = graph.call_method("squeeze", (found.q, 2))
        wp = graph.call_function(torch.ops.aa.word_pool.default,
                                 (q3, found.k_bytes, found.v_bytes, found.offsets, found.scale))
        return graph.call_method("unsqueeze", (wp, 2)), found.used
