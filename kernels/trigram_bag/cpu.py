"""CPU path of `aa::trigram_bag` (numerics: :mod:`aa_compile.kernels.trigram_bag.reference`).

Forward: ATen's inference-only embedding bag (``aten::_embedding_bag_forward_only``, the kernel
behind ``F.embedding_bag`` under ``no_grad``; fbgemm-generated code for float32/float16/bfloat16,
a plain loop for float64). Each bag is summed in order by one thread, in float32 for the half
types (rounded once on store: bit-equal to the correctly rounded float64 sum in a check here),
so it is deterministic. Unlike ``F.embedding_bag`` with autograd on, it builds no ``offset2bag`` /
``bag_size`` side outputs.

Compiled (``backend="aa"`` with inductor): `inductor_decompositions` hands inductor the forward
as a direct ``aten::_embedding_bag_forward_only`` call (an extern kernel in the generated code),
so a compiled graph pays no Python custom-op cost (validation, dispatch: ~0.1 ms a call) for
it. The decomposition applies below autograd (aot_autograd traces the op's autograd formula,
then decomposes what runs under it), so the backward is still `aa::trigram_bag_backward`. The
value checks raise ``RuntimeError`` instead of ``ValueError`` there: an index outside ``[0, v)``
and ``offsets[0] != 0`` are caught by ATen's kernel (which checks each index it reads), and so
are decreasing offsets for the fbgemm dtypes; ``offsets[-1] != nnz`` (and decreasing offsets
for float64) by inductor asserts with the op's message.

`words_to_csr` converts the T-FREE reference embedding's input (trigram slots and the word of
each trigram, in any order) to the op's CSR bags; it backs ``aa::tfree_words_to_csr``, which the
``tfree_embedding`` pass emits.

Backward, ``dweight`` (deterministic, no atomics): ``dweight`` is itself an embedding bag over
the *transposed* CSR. A stable sort of ``indices`` (as int16 / int32 keys when ``v`` allows:
fewer radix passes) groups the entries of each slot ``i`` in their original order; ``bag(j)`` of
the sorted entries are the rows to gather from ``grad``, ``psw[perm]`` their weights, and
``cumsum(bincount(indices))`` the segment boundaries. The same embedding-bag kernel then sums
each run of equal index (a segment reduction) in order into row ``i`` of a dense ``[v, h]``
result (rows no entry hits come out zero), accumulating in float32 for half types. The result
depends only on the input, not on thread count or timing.

Measured on the 2-core EPYC dev VM (v=8192, h=1024, 4096 words of 1 + Poisson(4.5) trigrams,
m=10: 226k slots; medians of interleaved runs, the VM is noisy by +-15%): forward 0.92-0.99x
``F.embedding_bag`` (the same kernel; the difference is the Python custom op's fixed per-call
cost, ~0.1 ms warm, which only shows on small batches); forward+backward 1.26x float32, 3.6x
bfloat16, 1.06x at v=32768 (there writing the dense 128 MB gradient dominates) faster than
``F.embedding_bag`` + its dense backward, and 14-32x faster than the reference module's gather /
``index_add_`` (forward 13-24x). Alternatives measured and rejected: ``index_add_`` in float32
for ``dweight`` (bitwise reproducible on CPU across runs and thread counts in a check here, but
~15x slower), a sparse CSR matmul (~2x slower forward).

All ops used here exist on every device, so the op also takes this path for float64 on CUDA and
for CUDA without Triton (not run here: no GPU on the dev machine; ATen's CUDA embedding-bag
forward also sums each (bag, column) in one thread, with a float accumulator for half types).

``dpsw[j] = <grad[bag(j)], weight[indices[j]]>``: ATen's
``_embedding_bag_per_sample_weights_backward`` (the kernel ``F.embedding_bag`` uses), one dot
product per entry, float32 accumulation for the half types (measured: correctly rounded), no
``[nnz, h]`` temporaries. A chunked gather + multiply + row sum was ~4x slower (memory traffic).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference


def _bag(weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None) -> Tensor:
    """ATen's inference embedding bag (sum, ``include_last_offset``): ``[len(offsets) - 1, h]``."""
    return torch.ops.aten._embedding_bag_forward_only(
        weight, indices, offsets, False, 0, False, psw, True
    )[0]


def trigram_bag_fwd(
    weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None
) -> Tensor:
    """Forward: ``[n_bags, h]`` in ``weight.dtype`` (input assumed valid, see ``check_inputs``)."""
    n_bags, h = offsets.numel() - 1, weight.shape[1]
    if n_bags == 0 or indices.numel() == 0 or h == 0:
        return torch.zeros(n_bags, h, dtype=weight.dtype, device=weight.device)
    return _bag(weight.contiguous(), indices, offsets, per_sample_weights)


def words_to_csr(slots: Tensor, word_of_trigram: Tensor, n_words: int, presorted: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """The T-FREE reference embedding's input (``slots [n, m]``, ``word_of_trigram [n]`` in any
    order, ``n_words``) as the op's CSR bags: ``(indices [n * m] in slots' dtype, offsets
    [n_words + 1] int64)``. A stable sort of the word ids orders the trigram rows word by word,
    each word's trigrams in their original order (``presorted=True``, word ids known to be
    non-decreasing as a tokenizer emits them: no sort and no gather, ``indices`` is a plain copy
    of ``slots``); ``offsets = m * [0, cumsum(trigrams per word)]``, the counts by ``index_add_``
    (bounds-checked on every device, unlike ``bincount``). Word ids are assumed to lie in
    ``[0, n_words)`` (the op checks them). ATen ops only, so it serves every device."""
    n, m = slots.shape
    if presorted:  # a copy: a custom op's outputs may not alias its inputs
        indices = slots.reshape(-1).clone()
    else:
        perm = torch.sort(word_of_trigram, stable=True).indices
        indices = slots.index_select(0, perm).reshape(-1)
    counts = torch.zeros(n_words, dtype=torch.int64, device=slots.device)
    counts.index_add_(0, word_of_trigram, torch.ones(n, dtype=torch.int64, device=slots.device))
    offsets = torch.zeros(n_words + 1, dtype=torch.int64, device=slots.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return indices, offsets.mul_(m)


def inductor_decompositions() -> dict:
    """Inductor decompositions (see module doc, "Compiled"): the CPU forward becomes a direct
    call of ``aten::_embedding_bag_forward_only`` in inductor's generated code, without the
    Python custom-op layer. The backward op is not decomposed (it stays ours). Declines
    (``NotImplemented``) off CPU and for a width that is not a known positive int."""

    def fwd(weight, indices, offsets, per_sample_weights=None, deterministic=True):
        h = weight.shape[1] if weight.dim() == 2 else None
        if weight.device.type != "cpu" or not isinstance(h, int) or h == 0:
            return NotImplemented
        # ATen's kernel checks every index it reads (RuntimeError naming the bad one) and
        # offsets[0]. The rest is checked by inductor asserts: offsets[-1] == nnz and
        # non-decreasing offsets. (fbgemm's kernels reject some decreasing offsets themselves,
        # but not every pattern, as a CI run showed: the loop over the offsets stays, one
        # cheap pass over n_bags + 1 integers.)
        nnz = indices.shape[0]
        msg = ("aa::trigram_bag: offsets must start at 0, be non-decreasing and end at nnz == "
               "indices.numel() (CSR bag boundaries)")
        torch.ops.aten._assert_async.msg(offsets[-1] == nnz, msg)
        torch.ops.aten._assert_async.msg((offsets[1:] >= offsets[:-1]).all(), msg)
        return _bag(weight.contiguous(), indices, offsets, per_sample_weights)

    return {torch.ops.aa.trigram_bag.default: fwd}


def stable_sort(indices: Tensor, v: int) -> tuple[Tensor, Tensor]:
    """``(sorted keys, perm)`` of a stable sort of ``indices`` (values in ``[0, v)``), sorting
    the narrowest integer type that holds ``v``: int16 / int32 keys sort about 2x / 1.5x
    faster than int64 (fewer radix passes). The keys keep that narrow dtype."""
    if v <= torch.iinfo(torch.int16).max:
        key_dtype = torch.int16
    elif v <= torch.iinfo(torch.int32).max:
        key_dtype = torch.int32
    else:  # pragma: no cover - tables of 2**31 rows
        key_dtype = torch.int64
    return torch.sort(indices.to(key_dtype), stable=True)


def weight_grad(
    grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None
) -> Tensor:
    """``dweight [v, h]`` in ``weight.dtype``: sorted segment sums (see module doc)."""
    v, h = weight.shape
    nnz = indices.numel()
    if nnz == 0 or h == 0:
        return torch.zeros(v, h, dtype=weight.dtype, device=weight.device)
    perm = stable_sort(indices, v)[1]
    rows = reference.bag_ids(offsets, nnz).index_select(0, perm)
    seg = torch.zeros(v + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(torch.bincount(indices, minlength=v), 0, out=seg[1:])
    psw_sorted = None if psw is None else psw.index_select(0, perm)
    return _bag(grad.to(weight.dtype).contiguous(), rows, seg, psw_sorted)


def psw_grad(grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor) -> Tensor:
    """``dpsw [nnz]`` in ``weight.dtype``: one row-wise dot product per entry (see module doc)."""
    nnz = indices.numel()
    if nnz == 0 or weight.shape[1] == 0:
        return torch.zeros(nnz, dtype=weight.dtype, device=weight.device)
    bags = reference.bag_ids(offsets, nnz).to(indices.dtype)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad.to(weight.dtype).contiguous(), weight.contiguous(), indices,
        offsets[:-1].to(indices.dtype), bags, 0, -1,
    )


def trigram_bag_bwd(
    grad: Tensor,
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
    need_weight_grad: bool = True,
    need_psw_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dweight [v, h] or None, dpsw [nnz] or None)``, both in ``weight.dtype``.

    ``dpsw`` is None without ``per_sample_weights``; either is None when not asked for.
    """
    dweight = dpsw = None
    if need_weight_grad:
        dweight = weight_grad(grad, weight, indices, offsets, per_sample_weights)
    if need_psw_grad and per_sample_weights is not None:
        dpsw = psw_grad(grad, weight, indices, offsets)
    return dweight, dpsw
