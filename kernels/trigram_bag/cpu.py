"""CPU path of `aa::trigram_bag` (numerics: :mod:`aa_compile.kernels.trigram_bag.reference`).

Forward, float32: the AVX2 + FMA C kernel of `cpu_avx2` (built on first use; its module doc
has the design) where it is available, else ATen's. It performs the same operations in the
same order as ATen's kernel (``acc + row``, ``fma(row, psw, acc)``, each bag in index order by
one thread), so the result is the same bits (tested), but it adds 6 table rows per pass over
the output row (in L1) and software-prefetches the rows 12 entries ahead. It checks the
offsets and every index itself. ``AA_TRIGRAM_BAG_NATIVE=0`` (or ``cpu_avx2.ENABLED = False``)
turns it off.

Forward, other dtypes: ATen's inference-only embedding bag
(``aten::_embedding_bag_forward_only``; fbgemm-generated code for float32/float16/bfloat16, a
plain loop for float64). ``F.embedding_bag`` runs the same summation code
(``aten::_embedding_bag`` when the weight requires grad, even under ``no_grad``, which also
fills ``offset2bag`` / ``bag_size`` side outputs). Each bag is summed in order by one thread, in
float32 for the half types (rounded once on store: bit-equal to the correctly rounded float64
sum in a check here), so it is deterministic. Outputs larger than `CHUNK_BYTES` are written in
chunks (see "Large outputs"; the float32 kernel writes its huge-page advised output directly).

Measured, forward (float32, m=10, words of 1 + Poisson(4.5) trigrams, random slots; medians of
25 rounds, every variant once per round, interleaved in one process; 2-core EPYC dev VM at load
average 3-5 from other jobs, so times are 2-3x a quiet machine's). Kernel alone against
``aten::_embedding_bag_forward_only`` (= 1.0x; ``F.embedding_bag`` 0.95-1.01x): v=8192, h=1024,
512 words 1.75-1.95x; 4096 words 1.55-1.6x; v=32768, h=1024, 4096 words 1.3x; v=8192, h=4096,
1024 words 1.45-1.6x (two runs). Rejected there: one row per pass (0.6-1.05x: the output row's
loads and stores), register-blocked columns (64 lanes in 8 accumulators, each bag's rows walked
once per 64 columns: 0.55-0.9x, the rows are then read in 256-byte pieces the hardware
prefetcher does not follow), no software prefetch (0.6-0.85x), 4 or 8 rows per pass (within
noise of 6, a little slower at most shapes), prefetch distance 4-16 entries (8-12 best). One
thread was as fast as two on the loaded VM (memory-bound; other jobs hold the second core);
the kernel still splits bags over ``torch.get_num_threads()`` threads. End to end see
"Compiled" below; fwd + bwd also gains (the weight gradient is the same bag-sum kernel).

Compiled (``backend="aa"`` with inductor): `inductor_decompositions` hands inductor the forward
as a direct call: for float32 with the kernel available, ``aa::trigram_bag_cpu`` (a plain
dispatcher op, `trigram_bag_cpu`: ~10 us of Python, no custom-op layer, and no separate
offset checks: the kernel checks them), else ``aten::_embedding_bag_forward_only`` (an extern
kernel in the generated code), so a compiled graph pays no Python custom-op cost (validation,
dispatch: ~0.1 ms a call, ~0.7 ms measured for a tiny input on the loaded VM) for it; an
output known to exceed `CHUNK_BYTES` keeps the op (whose kernel then runs the same way). The
decomposition applies below autograd (aot_autograd traces the op's autograd formula, then
decomposes what runs under it), so the backward is still `aa::trigram_bag_backward`. The value
checks raise ``RuntimeError`` instead of ``ValueError`` there. Float32 with the kernel: the
kernel's own checks, with the op's messages (and without it, a numpy offsets check in
`trigram_bag_cpu` and ATen's index check). Other dtypes: an index outside ``[0, v)`` and
``offsets[0] != 0`` are caught by ATen's kernel (which checks each index it reads), and so are
decreasing offsets for the fbgemm dtypes; ``offsets[-1] != nnz`` (and decreasing offsets for
float64) by inductor asserts with the op's message.

`words_to_csr` converts the T-FREE reference embedding's input (trigram slots and the word of
each trigram, in any order) to the op's CSR bags; it backs ``aa::tfree_words_to_csr``, which the
``tfree_embedding`` pass emits. Word ids already in order (as a tokenizer emits them; the op
checks that in the same numpy pass as their range) skip the sort and gather: numpy copies the
slots and binary-searches the offsets. That conversion (0.1-0.5 ms at 512-4096 words) is most
of what the compiled module pays over the op on a prebuilt CSR; the copy stays because a custom
op's outputs may not alias its inputs.

Backward, ``dweight`` (deterministic, no atomics): ``dweight`` is itself an embedding bag over
the *transposed* CSR (`segments`). A stable sort of ``indices`` groups the entries of each slot
``i`` in their original order; ``bag(j)`` of the sorted entries are the rows to gather from
``grad``, ``psw[perm]`` their weights, and ``cumsum(bincount(indices))`` the segment
boundaries. On CPU with ``v <= 65536`` numpy builds these (`segments_numpy`: a radix argsort of
16-bit keys, ~2 ms for 226k entries on one core, like torch's sort) single-threaded: each
OpenMP region of the torch version (key cast, sort, ``repeat_interleave``, ``index_select``,
``bincount``) can stall for a scheduler time slice when the cores are shared (measured: the
bookkeeping took 0.2 s instead of 3 ms with two threads on a machine at load 9). Larger ``v``
and other devices use torch ops (`segments_torch`, sorting int16 / int32 keys). The same
embedding-bag kernel then sums each run of equal index (a segment reduction) in order into row
``i`` of a dense ``[v, h]`` result (rows no entry hits come out zero), accumulating in float32
for half types. The result depends only on the input, not on thread count or timing.

Large outputs (`bag_sum`): a fresh output is new memory from the OS (glibc maps each
allocation of 32 MiB or more, and smaller ones until its threshold adapts, and unmaps it on
free), so writing it costs a page fault and the kernel zeroing each 4 KiB page. For the
``[32768, 1024]`` float32 gradient (128 MiB) that was ~4x the cost of writing the same,
already mapped memory, and at v=32768 or h=4096 a third to half of the whole weight gradient.
Here an output larger than `CHUNK_BYTES` (16 MiB) is allocated with `advise_huge_pages`
(``madvise(MADV_HUGEPAGE)``: one fault per 2 MiB; measured 70 ms instead of 320 ms for
allocating and zeroing 128 MiB with one thread on the loaded VM, 38 ms for reused memory) and
filled in chunks of rows: each chunk is one kernel call whose ATen-allocated output (under 16
MiB: reused heap memory, in cache) is copied into place. ATen's
``_embedding_bag_forward_only.out`` cannot write there directly: it is a generated wrapper that
allocates and copies too. Each row is still summed by one call in the same order, so chunked
and unchunked results are the same bits. The peak memory grows by one chunk (16 MiB).
`HUGE_PAGES` (``AA_TRIGRAM_BAG_HUGE_PAGES=0``) turns the advice off. Running the whole process
with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's allocator then advises every large allocation)
would speed up the reference and ``F.embedding_bag`` the same way.

Before the float32 kernel (ATen forward and ``dweight``), measured with the bench harness
(``python -m bench -k "trigram_bag and not hashed" --rounds 3 --repeats 3``, m=10, float32,
words of 1 + Poisson(4.5) trigrams: ~55 slots a word) on the 2-core EPYC dev VM while other jobs
kept it at load average 6-9 (times 2-3x a quiet machine's; medians of 9 interleaved rounds); two
runs of the previous version of this module (torch bookkeeping, one kernel call into an
ATen-allocated output) before and after two runs of this one. Forward + backward,
``backend="aa"`` against the eager reference module / ``F.embedding_bag`` + its dense backward,
before -> after: v=8192, h=1024, 4096 words 7.8-9.2x -> 9.4-11.7x / 1.3-1.4x -> 1.7-2.2x;
v=32768: 5.5-5.9x -> 7.8-9.8x / 1.1x -> 1.7-2.1x; v=8192, h=4096, 1024 words: 5.3-5.6x ->
7.0-7.2x / 1.1-1.3x -> 1.6x. ``dweight`` alone, one thread, interleaved: 291 -> 239, 580 -> 366
and 538 -> 314 ms. The forward is unchanged at these shapes (16 MiB outputs: one call) and at
parity with ``F.embedding_bag``: the op called eagerly 0.91-1.07x over these runs (the same
summation code reading the same ``nnz * h`` table values), the compiled module 0.65-1.01x (its
graph also turns word ids into CSR, ~1 ms on one core, and checks the offsets in an
inductor-generated OpenMP loop, one more parallel region to stall on a loaded machine; the peer
gets its CSR prebuilt). Outputs above `CHUNK_BYTES` are where it wins: 5-8% at 16384 words x
h=1024 and 4096 words x h=4096.

With the float32 kernel (forward and ``dweight``), interleaved as above (25 / 9 rounds, load
3-5), ``backend="aa"`` against ``F.embedding_bag`` (= 1.0x) and against the same compiled module
with the kernel turned off (``aa_noavx``):
fwd: v=8192, h=1024, 512 words 1.44x (aa_noavx 1.01x; the op called eagerly 1.08x); 4096
words 1.54x (0.97x; op 1.38x); v=32768: 1.27x (0.91x; op 1.23x); v=8192, h=4096, 1024 words
1.56x (0.99x; op 1.45x) (ATen's kernel alone: 0.96-0.99x F.embedding_bag in the same rounds).
fwd + bwd: v=8192, h=1024, 512 words 2.48x (aa_noavx 1.74x); 4096 words 3.60x (2.60x);
v=32768: 2.95x (2.51x); v=8192, h=4096, 1024 words 3.17x (2.33x).

Alternatives measured and rejected: ``index_add_`` in float32 for ``dweight`` (bitwise
reproducible on CPU across runs and thread counts in a check here, but ~15x slower), a sparse
CSR matmul (~2x slower forward), chunks of 1-8 MiB (more kernel calls: slower on a loaded
machine), a sparse (row-compressed) gradient (at the realistic shapes the batch touches almost
every row, ``1 - exp(-nnz / v)`` >= 99.9% for 4096 words of ~55 slots at v=32768, so it would
not be smaller).

Only ATen ops are used for tensors off the CPU (numpy and the huge-page advice are for CPU
tensors), so the op also takes this path for float64 on CUDA and for CUDA without Triton (not
run here: no GPU on the dev machine; ATen's CUDA embedding-bag forward also sums each (bag,
column) in one thread, with a float accumulator for half types).

``dpsw[j] = <grad[bag(j)], weight[indices[j]]>``: ATen's
``_embedding_bag_per_sample_weights_backward`` (the kernel ``F.embedding_bag`` uses), one dot
product per entry, float32 accumulation for the half types (measured: correctly rounded), no
``[nnz, h]`` temporaries. A chunked gather + multiply + row sum was ~4x slower (memory traffic).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np
import torch
from torch import Tensor

from . import cpu_avx2, reference

#: Outputs larger than this are written in row chunks of about this many bytes into a buffer
#: allocated (and huge-page advised) here; smaller ones are one kernel call (see module doc,
#: "Large outputs"). 16 MiB: under glibc's largest mmap threshold (32 MiB), so a freed chunk's
#: memory is reused by the next chunk without page faults, and it fits the L3 cache.
CHUNK_BYTES: int = 16 << 20

#: Ask the OS for transparent huge pages (``madvise(MADV_HUGEPAGE)``, Linux) for outputs of at
#: least `HUGE_PAGE_MIN_BYTES`. Set ``AA_TRIGRAM_BAG_HUGE_PAGES=0`` (before import) or this
#: attribute to False to turn it off; results are the same bits either way.
HUGE_PAGES: bool = os.environ.get("AA_TRIGRAM_BAG_HUGE_PAGES", "1").strip().lower() not in (
    "0", "false", "no", "off")
HUGE_PAGE_MIN_BYTES: int = 4 << 20
_HUGE_PAGE = 2 << 20  # x86-64 / aarch64 (4 KiB base pages) transparent huge page size
_madvise = None  # libc's madvise via ctypes, loaded on first use; False where unavailable


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
            except (OSError, AttributeError):  # pragma: no cover - no libc symbol
                pass
            else:
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
    return _madvise


def advise_huge_pages(t: Tensor) -> bool:
    """Advise the OS to back ``t``'s memory with transparent huge pages (the whole 2 MiB pages
    inside it; Linux ``madvise(MADV_HUGEPAGE)``). Only a hint: the contents are unchanged, and
    memory already touched keeps its pages. Worth it for a large buffer before it is first
    written: one page fault per 2 MiB instead of per 4 KiB. Returns whether the advice was
    given (False off Linux / CPU, below `HUGE_PAGE_MIN_BYTES`, or with `HUGE_PAGES` off)."""
    nbytes = t.numel() * t.element_size()
    if not HUGE_PAGES or t.device.type != "cpu" or nbytes < HUGE_PAGE_MIN_BYTES:
        return False
    fn = _libc_madvise()
    if not fn:
        return False
    ptr = t.data_ptr()
    lo = (ptr + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    hi = (ptr + nbytes) & ~(_HUGE_PAGE - 1)
    return hi > lo and fn(lo, hi - lo, mmap.MADV_HUGEPAGE) == 0


def _bag(weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None) -> Tensor:
    """ATen's inference embedding bag (sum, ``include_last_offset``): ``[len(offsets) - 1, h]``.
    Its 1-D inputs are made contiguous: this internal op reads ``offsets`` and ``psw`` as if
    they were and rejects non-contiguous ``indices`` (``F.embedding_bag`` takes any)."""
    if psw is not None:
        psw = psw.contiguous()
    return torch.ops.aten._embedding_bag_forward_only(
        weight, indices.contiguous(), offsets.contiguous(), False, 0, False, psw, True
    )[0]


def native(weight: Tensor) -> bool:
    """Whether float32 CPU bag sums of ``weight`` run the AVX2 kernel (`cpu_avx2`)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and \
        cpu_avx2.available()


def bag_sum(weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None,
            chunk_bytes: int | None = None) -> Tensor:
    """``[len(offsets) - 1, h]`` bag sums (valid CSR input, contiguous ``weight``): float32
    on CPU with the AVX2 kernel where `native` (same bits as ATen's), else ATen's kernel. For
    ATen's, an output larger than ``chunk_bytes`` (default `CHUNK_BYTES`) is filled in
    chunks of bags, each one kernel call, copied into an output allocated here with huge pages
    advised (module doc, "Large outputs"); the sums and their order are the same either way."""
    if native(weight):  # writes its (huge-page advised) output directly: no chunks needed
        return cpu_avx2.bag_sum(weight, indices, offsets, psw)
    n, h = offsets.numel() - 1, weight.shape[1]
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    row_bytes = h * weight.element_size()
    if n * row_bytes <= chunk_bytes or weight.device.type != "cpu":
        return _bag(weight, indices, offsets, psw)
    out = torch.empty(n, h, dtype=weight.dtype)
    advise_huge_pages(out)
    step = max(1, chunk_bytes // max(1, row_bytes))
    o = offsets.numpy()
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        s0, s1 = int(o[b0]), int(o[b1])
        if s0 == s1:
            out[b0:b1].zero_()
            continue
        part_offsets = torch.from_numpy(o[b0:b1 + 1] - o[b0])
        part_psw = None if psw is None else psw[s0:s1]
        out[b0:b1].copy_(_bag(weight, indices[s0:s1], part_offsets, part_psw))
    return out


def trigram_bag_fwd(
    weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Forward: ``[n_bags, h]`` in ``weight.dtype`` (input assumed valid, see ``check_inputs``).
    ``chunk_bytes``: see `bag_sum`."""
    n_bags, h = offsets.numel() - 1, weight.shape[1]
    if n_bags == 0 or indices.numel() == 0 or h == 0:
        return torch.zeros(n_bags, h, dtype=weight.dtype, device=weight.device)
    return bag_sum(weight.contiguous(), indices, offsets, per_sample_weights, chunk_bytes)


def words_to_csr(slots: Tensor, word_of_trigram: Tensor, n_words: int, presorted: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """The T-FREE reference embedding's input (``slots [n, m]``, ``word_of_trigram [n]`` in any
    order, ``n_words``) as the op's CSR bags: ``(indices [n * m] in slots' dtype, offsets
    [n_words + 1] int64)``. A stable sort of the word ids orders the trigram rows word by word,
    each word's trigrams in their original order (``presorted=True``, word ids known to be
    non-decreasing as a tokenizer emits them: no sort and no gather, ``indices`` is a plain copy
    of ``slots``); ``offsets = m * [0, cumsum(trigrams per word)]``, the counts by ``index_add_``
    (bounds-checked on every device, unlike ``bincount``), or for presorted CPU input
    ``offsets[k] = m * #(word ids < k)`` by numpy's binary search. Word ids are assumed to lie
    in ``[0, n_words)`` (the op checks them). ATen ops (numpy for presorted CPU tensors), so it
    serves every device."""
    n, m = slots.shape
    if presorted and slots.device.type == "cpu":
        # numpy only (no ATen op, no OpenMP region): a copy of the slots (a custom op's outputs
        # may not alias its inputs) and offsets[k] = m * #(word ids < k) by binary search
        indices = torch.empty(n * m, dtype=slots.dtype)
        np.copyto(indices.numpy(), slots.numpy().reshape(-1))
        starts = np.searchsorted(word_of_trigram.numpy(), np.arange(n_words + 1))
        offsets = torch.from_numpy(starts.astype(np.int64, copy=False))
        return indices, offsets.mul_(m)
    if presorted:
        indices = slots.reshape(-1).clone()
    else:
        perm = torch.sort(word_of_trigram, stable=True).indices
        indices = slots.index_select(0, perm).reshape(-1)
    counts = torch.zeros(n_words, dtype=torch.int64, device=slots.device)
    counts.index_add_(0, word_of_trigram, torch.ones(n, dtype=torch.int64, device=slots.device))
    offsets = torch.zeros(n_words + 1, dtype=torch.int64, device=slots.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return indices, offsets.mul_(m)


def _decline(op):
    """``NotImplemented`` (the op stays in the graph), after giving inductor a fallback lowering
    for ``op`` (an extern call of the op itself): inductor refuses an op that is in its
    decomposition table but has no lowering. Called while inductor compiles, so its lowering
    module is already imported."""
    from torch._inductor import lowering

    if op not in lowering.lowerings:
        lowering.make_fallback(op, warn=False, override_decomp=True)
    return NotImplemented


def _check_offsets(offsets: Tensor, nnz: int, op: str) -> None:
    """``RuntimeError`` unless ``offsets`` start at 0, do not decrease and end at ``nnz``."""
    o = offsets.numpy()
    if o.shape[0] == 0 or o[0] != 0 or o[-1] != nnz or bool((o[1:] < o[:-1]).any()):
        raise RuntimeError(f"{op}: {cpu_avx2.OFFSETS_MESSAGE}")


def trigram_bag_cpu(weight: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Tensor | None = None) -> Tensor:
    """``aa::trigram_bag_cpu``: the CPU forward that compiled graphs call (see
    `inductor_decompositions`), with no validation beyond the values: the AVX2 kernel checks
    the offsets and every index itself (``RuntimeError`` with `aa::trigram_bag`'s messages);
    without it the offsets are checked here and ATen's kernel checks the indices."""
    op = "aa::trigram_bag"
    if native(weight):
        return cpu_avx2.bag_sum(weight, indices, offsets, per_sample_weights, op=op)
    _check_offsets(offsets, indices.shape[0], op)
    return trigram_bag_fwd(weight, indices, offsets, per_sample_weights)


# A plain dispatcher op (no torch.library.custom_op layer: ~10 us a call instead of ~100), only
# emitted by `inductor_decompositions` below autograd, so it has no autograd formula.
_LIB = torch.library.Library("aa", "FRAGMENT")
_LIB.define("trigram_bag_cpu(Tensor weight, Tensor indices, Tensor offsets, "
            "Tensor? per_sample_weights=None) -> Tensor")
_LIB.impl("trigram_bag_cpu", trigram_bag_cpu, "CPU")


@torch.library.register_fake("aa::trigram_bag_cpu", lib=_LIB)
def _trigram_bag_cpu_fake(weight, indices, offsets, per_sample_weights=None):
    return weight.new_empty(offsets.shape[0] - 1, weight.shape[1])


def inductor_decompositions() -> dict:
    """Inductor decompositions (see module doc, "Compiled"): the CPU forward becomes a direct
    call of ``aa::trigram_bag_cpu`` (float32 where the AVX2 kernel is available) or of
    ``aten::_embedding_bag_forward_only`` in inductor's generated code, without the Python
    custom-op layer. The backward op is not decomposed (it stays ours). Declines
    (``NotImplemented``) off CPU, for a width that is not a known positive int, and for an
    output known to exceed `CHUNK_BYTES` (there the op's own chunked, huge-page kernel runs:
    the Python cost is small next to the page faults it saves)."""

    def fwd(weight, indices, offsets, per_sample_weights=None, deterministic=True):
        h = weight.shape[1] if weight.dim() == 2 else None
        if weight.device.type != "cpu" or not isinstance(h, int) or h == 0:
            return _decline(torch.ops.aa.trigram_bag.default)
        n_bags = offsets.shape[0] - 1
        if isinstance(n_bags, int) and n_bags * h * weight.element_size() > CHUNK_BYTES:
            return _decline(torch.ops.aa.trigram_bag.default)
        if native(weight):
            # the AVX2 kernel through a plain op: it checks the offsets and indices itself
            return torch.ops.aa.trigram_bag_cpu(weight, indices, offsets, per_sample_weights)
        # ATen's kernel checks every index it reads (RuntimeError naming the bad one) and
        # offsets[0]. The rest is checked by inductor asserts: offsets[-1] == nnz and
        # non-decreasing offsets. (fbgemm's kernels reject some decreasing offsets themselves,
        # but not every pattern, as a CI run showed: the loop over the offsets stays, one
        # cheap pass over n_bags + 1 integers.)
        nnz = indices.shape[0]
        msg = f"aa::trigram_bag: {cpu_avx2.OFFSETS_MESSAGE}"
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


def segments(indices: Tensor, offsets: Tensor, v: int) -> tuple[Tensor, Tensor, Tensor]:
    """The transposed CSR of the bags: ``(perm, rows, seg)``, all int64 on ``indices``' device.
    ``perm`` is the stable sort of ``indices`` (the entries of slot 0 in their order, then slot
    1's, ...), ``rows[k] = bag(perm[k])``, and ``seg [v + 1]`` the start of each slot's run
    (``seg[i + 1] - seg[i]`` entries hit slot ``i``). On CPU with ``v <= 65536``:
    `segments_numpy`, else `segments_torch` (the same three tensors)."""
    if indices.device.type == "cpu" and v <= 1 << 16:
        return segments_numpy(indices, offsets, v)
    return segments_torch(indices, offsets, v)


def segments_numpy(indices: Tensor, offsets: Tensor, v: int) -> tuple[Tensor, Tensor, Tensor]:
    """`segments` for CPU tensors and ``v <= 65536``, in numpy: single-threaded (no OpenMP
    region, which a loaded machine can stall for a scheduler time slice each) and about as fast
    as torch's on one core: ``argsort(kind="stable")`` of 16-bit keys is a radix sort."""
    idx = indices.numpy()
    perm = np.argsort(idx.astype(np.uint16), kind="stable")
    o = offsets.numpy()
    rows = np.repeat(np.arange(o.shape[0] - 1, dtype=np.int64), np.diff(o))[perm]
    seg = np.zeros(v + 1, dtype=np.int64)
    np.cumsum(np.bincount(idx, minlength=v), out=seg[1:])
    return torch.from_numpy(perm.astype(np.int64, copy=False)), torch.from_numpy(rows), \
        torch.from_numpy(seg)


def segments_torch(indices: Tensor, offsets: Tensor, v: int) -> tuple[Tensor, Tensor, Tensor]:
    """`segments` with ATen ops (any device, any ``v``): `stable_sort`, ``bincount``."""
    perm = stable_sort(indices, v)[1]
    rows = reference.bag_ids(offsets, indices.numel()).index_select(0, perm)
    seg = torch.zeros(v + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(indices, minlength=v), 0, out=seg[1:])
    return perm, rows, seg


def weight_grad(
    grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None,
    chunk_bytes: int | None = None,
) -> Tensor:
    """``dweight [v, h]`` in ``weight.dtype``: sorted segment sums (see module doc).
    ``chunk_bytes``: see `bag_sum`."""
    v, h = weight.shape
    nnz = indices.numel()
    if nnz == 0 or h == 0:
        return torch.zeros(v, h, dtype=weight.dtype, device=weight.device)
    perm, rows, seg = segments(indices, offsets, v)
    psw_sorted = None if psw is None else psw.index_select(0, perm)
    return bag_sum(grad.to(weight.dtype).contiguous(), rows, seg, psw_sorted, chunk_bytes)


def psw_grad(grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor) -> Tensor:
    """``dpsw [nnz]`` in ``weight.dtype``: one row-wise dot product per entry (see module doc)."""
    nnz = indices.numel()
    if nnz == 0 or weight.shape[1] == 0:
        return torch.zeros(nnz, dtype=weight.dtype, device=weight.device)
    bags = reference.bag_ids(offsets, nnz).to(indices.dtype)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad.to(weight.dtype).contiguous(), weight.contiguous(), indices.contiguous(),
        offsets[:-1].to(indices.dtype).contiguous(), bags, 0, -1,
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
