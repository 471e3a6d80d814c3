"""Native CPU forward of `aa::trigram_bag` for float32: an AVX2 + FMA C kernel, built on first use
with the system C compiler (:mod:`aa_compile.kernels._native`) and called through ``ctypes``.

``out[b] = sum_{j in [offsets[b], offsets[b + 1])} (psw[j] *) weight[indices[j]]``, each bag
summed in index order in float32 by one thread with the same operations in the same order as
ATen's (fbgemm) embedding bag, so the result is the same bits as
``aten::_embedding_bag_forward_only`` (tested) and does not depend on the thread count. It is
faster because it adds `ROWS` table rows per pass over the output row (which stays in L1) and
software-prefetches the rows `PREFETCH` entries ahead; bags are split over a small C thread pool.
It checks the offsets and every index itself, so callers need no separate pass. Design:
``docs/tfree.md``; measurements: ``docs/performance.md``.

`available` is False, and callers fall back to ATen, where `aa_compile.kernels._native` cannot
build or load the kernel, or when `ENABLED` is False (``AA_TRIGRAM_BAG_NATIVE=0`` before import,
or set the attribute).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

from aa_compile.kernels import _native

from .huge_pages import advise_huge_pages

#: use the native kernel where it is available (``AA_TRIGRAM_BAG_NATIVE=0``: ATen everywhere)
ENABLED: bool = os.environ.get("AA_TRIGRAM_BAG_NATIVE", "1").strip().lower() not in (
    "0", "false", "no", "off")
#: table rows added per pass over the output row, and the prefetch distance in entries
ROWS = 6
PREFETCH = 12
#: below this many adds (``nnz * h``) one thread does it all (a helper wake-up costs ~10 us)
PARALLEL_GRAIN = 1 << 18
#: chunks of bags per thread (claimed dynamically: a slow thread gets fewer)
CHUNKS_PER_THREAD = 8

_INDEX = (torch.int32, torch.int64)
OFFSETS_MESSAGE = ("offsets must start at 0, be non-decreasing and end at nnz == "
                   "indices.numel() (CSR bag boundaries)")

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <stdatomic.h>
#include <pthread.h>
#include <sched.h>
#include <immintrin.h>
""" + _native.POOL_SOURCE + r"""
#ifndef ROWS
#define ROWS 6
#endif

typedef struct {
    const float* w; int64_t ldw; int64_t v;
    const void* idx; int idx64;
    const void* offs; int offs64;
    const float* psw;
    float* out; int64_t ldo; int64_t h;
    int64_t n_bags, nnz, per_chunk;
    int pf;
    _Atomic int64_t bad;            /* lowest position of an index outside [0, v); nnz: none */
} bag_args_t;

static inline int64_t off_at(const bag_args_t* a, int64_t b) {
    return a->offs64 ? ((const int64_t*)a->offs)[b] : (int64_t)((const int32_t*)a->offs)[b];
}
static inline int64_t idx_at(const bag_args_t* a, int64_t j) {
    return a->idx64 ? ((const int64_t*)a->idx)[j] : (int64_t)((const int32_t*)a->idx)[j];
}

#define PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)

static void note_bad(bag_args_t* a, int64_t j) {
    int64_t cur = atomic_load(&a->bad);
    while (j < cur && !atomic_compare_exchange_weak(&a->bad, &cur, j)) {}
}

/* o[0:h] = the sum of the bag's entries j0..j1 in order; ROWS table rows per pass over o:
   y = (((y + x0) + x1) + ...), the order of one row at a time */
static void bag(bag_args_t* a, int64_t j0, int64_t j1, float* o) {
    const int64_t h = a->h, ldw = a->ldw, v = a->v, nnz = a->nnz;
    const float* w = a->w;
    const float* psw = a->psw;
    const int pf = a->pf;
    const int64_t h8 = h & ~(int64_t)7, m = h & 7;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)m),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    memset(o, 0, (size_t)h * sizeof(float));
    for (int64_t j = j0; j < j1; j += ROWS) {
        const int n = j1 - j < ROWS ? (int)(j1 - j) : ROWS;
        const float* r[ROWS]; __m256 p[ROWS]; const float* q[ROWS];
        for (int u = 0; u < n; ++u) {
            int64_t i = idx_at(a, j + u);
            if ((uint64_t)i >= (uint64_t)v) { note_bad(a, j + u); return; }
            r[u] = w + i * ldw;
            p[u] = _mm256_set1_ps(psw ? psw[j + u] : 1.0f);
            q[u] = NULL;
            if (pf && j + pf + u < nnz) {
                int64_t ip = idx_at(a, j + pf + u);
                if ((uint64_t)ip < (uint64_t)v) q[u] = w + ip * ldw;
            }
        }
        int64_t k = 0;
        if (n == ROWS) {
            for (; k < h8; k += 8) {
                if ((k & 15) == 0)
                    for (int u = 0; u < ROWS; ++u) if (q[u]) PREFETCH(q[u] + k);
                __m256 y = _mm256_loadu_ps(o + k);
                if (psw)
                    for (int u = 0; u < ROWS; ++u)
                        y = _mm256_fmadd_ps(_mm256_loadu_ps(r[u] + k), p[u], y);
                else
                    for (int u = 0; u < ROWS; ++u) y = _mm256_add_ps(y, _mm256_loadu_ps(r[u] + k));
                _mm256_storeu_ps(o + k, y);
            }
        } else {
            for (; k < h8; k += 8) {
                __m256 y = _mm256_loadu_ps(o + k);
                for (int u = 0; u < n; ++u) {
                    __m256 x = _mm256_loadu_ps(r[u] + k);
                    y = psw ? _mm256_fmadd_ps(x, p[u], y) : _mm256_add_ps(y, x);
                }
                _mm256_storeu_ps(o + k, y);
            }
        }
        if (m) {  /* the last 1-7 columns, masked */
            __m256 y = _mm256_maskload_ps(o + k, mask);
            for (int u = 0; u < n; ++u) {
                __m256 x = _mm256_maskload_ps(r[u] + k, mask);
                y = psw ? _mm256_fmadd_ps(x, p[u], y) : _mm256_add_ps(y, x);
            }
            _mm256_maskstore_ps(o + k, mask, y);
        }
    }
}

static int64_t lower_bound(const bag_args_t* a, int64_t x) {  /* first bag b: offs[b] >= x */
    int64_t lo = 0, hi = a->n_bags;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (off_at(a, mid) < x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* chunk c: the bags starting in [c * per_chunk, (c + 1) * per_chunk) entries (the last chunk
   also takes the trailing empty bags) */
static void bag_task(const void* args, int64_t chunk) {
    bag_args_t* a = (bag_args_t*)args;
    int64_t b0 = chunk == 0 ? 0 : lower_bound(a, chunk * a->per_chunk);
    int64_t b1 = (chunk + 1) * a->per_chunk >= a->nnz ? a->n_bags
                                                       : lower_bound(a, (chunk + 1) * a->per_chunk);
    for (int64_t b = b0; b < b1; ++b)
        bag(a, off_at(a, b), off_at(a, b + 1), a->out + b * a->ldo);
}

/* out[b * ldo + c] = sum_{j in [offs[b], offs[b + 1])} (psw[j] *) w[idx[j] * ldw + c], float32,
   in index order. Returns -1 (done), -2 (malformed offsets: nothing written) or the lowest
   position of an index outside [0, v) (the output is then partial). */
int64_t aa_trigram_bag_f32(const float* w, int64_t ldw, int64_t v, const void* idx, int idx64,
                           int64_t nnz, const void* offs, int offs64, int64_t n_bags,
                           const float* psw, float* out, int64_t ldo, int64_t h,
                           int nthreads, int64_t nchunks, int pf) {
    bag_args_t a;
    a.w = w; a.ldw = ldw; a.v = v; a.idx = idx; a.idx64 = idx64; a.offs = offs;
    a.offs64 = offs64; a.psw = psw; a.out = out; a.ldo = ldo; a.h = h; a.n_bags = n_bags;
    a.nnz = nnz; a.pf = pf;
    atomic_store(&a.bad, nnz);
    if (off_at(&a, 0) != 0 || off_at(&a, n_bags) != nnz) return -2;
    for (int64_t b = 0; b < n_bags; ++b)
        if (off_at(&a, b + 1) < off_at(&a, b)) return -2;
    if (n_bags == 0 || h == 0) return -1;
    if (nchunks < 1) nchunks = 1;
    a.per_chunk = nnz > nchunks ? (nnz + nchunks - 1) / nchunks : 1;
    nchunks = nnz > 0 ? (nnz + a.per_chunk - 1) / a.per_chunk : 1;
    pool_run(bag_task, &a, nchunks, nthreads);
    int64_t bad = atomic_load(&a.bad);
    return bad < nnz ? bad : -1;
}
"""


@functools.cache
def _library():
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return _native.function(
        SOURCE, "trigram_bag_avx2", "aa_trigram_bag_f32",
        [p, i64, i64, p, c_int, i64, p, c_int, i64, p, p, i64, i64, c_int, i64, c_int], i64,
        "aa::trigram_bag", "ATen's embedding bag for the float32 CPU forward")


def library():
    """The kernel (``ctypes`` function), or None where it cannot or may not be used (`ENABLED`
    False, no AVX2/FMA, no working C compiler)."""
    return _library() if ENABLED else None


def available() -> bool:
    """Whether `bag_sum` can run here (builds the kernel on the first call)."""
    return library() is not None


def _flat(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def bag_sum(weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None,
            op: str = "aa::trigram_bag", threads: int | None = None) -> Tensor:
    """``[len(offsets) - 1, h]`` float32 bag sums of float32 CPU ``weight`` (int32 / int64
    ``indices`` and ``offsets``; ``psw`` float32 or None). Raises ``RuntimeError`` (``op``'s
    message) for an index outside ``[0, v)`` or malformed offsets. ``threads``: default
    ``torch.get_num_threads()``. Needs `available`."""
    fn = library()
    if fn is None:
        raise RuntimeError(f"{op}: the AVX2 CPU kernel is not available here")
    if weight.dtype != torch.float32 or weight.dim() != 2 or indices.dtype not in _INDEX or \
            offsets.dtype not in _INDEX or offsets.dim() != 1 or offsets.shape[0] == 0 or \
            (psw is not None and (psw.dtype != torch.float32 or psw.shape != indices.shape)):
        raise RuntimeError(f"{op}: the AVX2 kernel takes a float32 [v, h] weight, int32/int64 "
                           "indices and [n_bags + 1] offsets, float32 per_sample_weights")
    v, h = weight.shape
    n_bags = offsets.shape[0] - 1
    if h > 1 and (weight.stride(1) != 1 or weight.stride(0) < h):
        weight = weight.contiguous()
    indices, offsets = _flat(indices), _flat(offsets)
    if psw is not None:
        psw = _flat(psw)
    nnz = indices.shape[0]
    out = torch.empty(n_bags, h, dtype=torch.float32)
    advise_huge_pages(out)  # a large fresh output: fewer page faults
    if threads is None:
        threads = torch.get_num_threads()
    threads = max(1, min(threads, nnz * h // PARALLEL_GRAIN))
    res = fn(weight.data_ptr(), weight.stride(0) if v else h, v, indices.data_ptr(),
             indices.dtype == torch.int64, nnz, offsets.data_ptr(), offsets.dtype == torch.int64,
             n_bags, None if psw is None else psw.data_ptr(), out.data_ptr(), h, h, threads,
             CHUNKS_PER_THREAD * threads, PREFETCH)
    if res == -1:
        return out
    if res == -2:
        raise RuntimeError(f"{op}: {OFFSETS_MESSAGE}")
    raise RuntimeError(f"{op}: indices must lie in [0, {v}) (weight has {v} rows), found "
                       f"{int(indices[res])}")
