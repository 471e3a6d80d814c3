"""Native CPU kernel of `aa::int8_linear` for small ``M`` (decode): AVX2 + FMA C, built on first
use with the system C compiler and called through ``ctypes``.

``y[m, n] = scale[n] * sum_k x[m, k] * w_int8[n, k] + bias[n]`` with float32 ``x``, ``y``,
``scale``, ``bias``. For each group of 4 output channels the kernel reads the int8 weights once
from memory (1 byte per weight, float32 ``F.linear`` reads 4), widens them to float32 in
registers (``vpmovsxbd`` + ``vcvtdq2ps``) and accumulates ``x * w`` with FMAs in float32: 16
``k`` per step in 8 independent accumulators for one activation row at a time, or 4 activation
rows x 2 weight rows per step (each widened weight used 4 times) while ``M >= 4`` rows remain;
the group's rows stay in L1/L2 while the activation rows are walked. While a group streams, the
same ``k`` range of the next group is software-prefetched: on the 2-core EPYC dev VM (one
thread) that took the 4096 x 4096 GEMV from 1.8x to 2.6-3.0x float32 ``F.linear``'s speed (the
hardware prefetcher alone leaves one core well short of its bandwidth on 4 interleaved
streams). The scale and the bias are applied once per output.

Threads: up to ``torch.get_num_threads()`` (one when the call has fewer than
``PARALLEL_GRAIN`` multiply-adds): the caller plus helper threads of a small pool in the C code
that claim chunks of channel groups from a shared counter. The caller claims chunks too and then
waits only for chunks a helper has already claimed, never for a helper that has not started: on
the shared dev VM an OpenMP region (and any torch op that runs one) took 15-20 ms whenever a
team thread was descheduled, because the region's end waits for every thread. Every output is
summed by one thread in a fixed order, so results do not depend on the thread count (tested
bitwise). Idle helpers watch for the next job for tens of microseconds, then sleep on a
condition variable. Concurrent callers (Python threads) run serially while the pool is busy; a
forked child starts a new pool.

Numerics: float32 products and sums (like float32 ``F.linear`` on the dequantised weight, with the
scale applied to the sum instead of to each weight); tested against the float64 reference
(:mod:`aa_compile.kernels.int8_linear.reference`).

Build: the C source below is compiled once per source / compiler / flags (``$CC``, else
``cc``/``gcc``/``clang``; ``-O3 -mavx2 -mfma -pthread``) into ``$AA_COMPILE_CACHE/kernels``
(default ``~/.cache/aa-compile``; a temporary folder when that is not writable), published by an
atomic rename; later processes load the cached ``.so``. Without PyTorch headers this takes 1.4 s
(0.6 s of CPU) with gcc on the busy dev VM; a ``torch.utils.cpp_extension`` build spends most of
a minute on the headers.
`available` is False, and the CPU path falls back to blocked dequantise + GEMM
(:func:`aa_compile.kernels.int8_linear.cpu.blocked_linear`), off x86-64 Linux/macOS, on CPUs
without AVX2/FMA as ATen detects them (so ``ATEN_CPU_CAPABILITY=default`` turns it off too), or
when no compiler works (a warning says why, once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>
#include <pthread.h>
#include <sched.h>
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the low 8 int8 lanes of v as 8 floats (exact: |q| <= 128) */
static inline __m256 widen8(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

#define PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)

/* one activation row x 4 weight rows (w, w + ldw, w + 2 ldw, w + 3 ldw); pf: the next 4 rows,
   prefetched over the same k range (NULL: none) */
static void dot_1x4(const float* x, const int8_t* w, int64_t ldw, int64_t K,
                    const int8_t* pf, float out[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const int8_t *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        if (pf && (k & 63) == 0) {
            PREFETCH(pf + k); PREFETCH(pf + ldw + k);
            PREFETCH(pf + 2 * ldw + k); PREFETCH(pf + 3 * ldw + k);
        }
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        __m128i q;
        q = _mm_loadu_si128((const __m128i*)(w0 + k));
        a0 = _mm256_fmadd_ps(x0, widen8(q), a0);
        b0 = _mm256_fmadd_ps(x1, widen8(_mm_unpackhi_epi64(q, q)), b0);
        q = _mm_loadu_si128((const __m128i*)(w1 + k));
        a1 = _mm256_fmadd_ps(x0, widen8(q), a1);
        b1 = _mm256_fmadd_ps(x1, widen8(_mm_unpackhi_epi64(q, q)), b1);
        q = _mm_loadu_si128((const __m128i*)(w2 + k));
        a2 = _mm256_fmadd_ps(x0, widen8(q), a2);
        b2 = _mm256_fmadd_ps(x1, widen8(_mm_unpackhi_epi64(q, q)), b2);
        q = _mm_loadu_si128((const __m128i*)(w3 + k));
        a3 = _mm256_fmadd_ps(x0, widen8(q), a3);
        b3 = _mm256_fmadd_ps(x1, widen8(_mm_unpackhi_epi64(q, q)), b3);
    }
    float s0 = hsum8(_mm256_add_ps(a0, b0)), s1 = hsum8(_mm256_add_ps(a1, b1));
    float s2 = hsum8(_mm256_add_ps(a2, b2)), s3 = hsum8(_mm256_add_ps(a3, b3));
    for (; k < K; ++k) {
        float xk = x[k];
        s0 += xk * (float)w0[k]; s1 += xk * (float)w1[k];
        s2 += xk * (float)w2[k]; s3 += xk * (float)w3[k];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

/* 4 activation rows (x, x + ldx, ...) x 2 weight rows, 8 k per step; pf as in dot_1x4 (2 rows) */
static void dot_4x2(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t K,
                    const int8_t* pf, float out[4][2]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00;
    __m256 c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    const int8_t *w0 = w, *w1 = w + ldw;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if (pf && (k & 63) == 0) { PREFETCH(pf + k); PREFETCH(pf + ldw + k); }
        __m256 v0 = widen8(_mm_loadl_epi64((const __m128i*)(w0 + k)));
        __m256 v1 = widen8(_mm_loadl_epi64((const __m128i*)(w1 + k)));
        __m256 a;
        a = _mm256_loadu_ps(x0 + k); c00 = _mm256_fmadd_ps(a, v0, c00); c01 = _mm256_fmadd_ps(a, v1, c01);
        a = _mm256_loadu_ps(x1 + k); c10 = _mm256_fmadd_ps(a, v0, c10); c11 = _mm256_fmadd_ps(a, v1, c11);
        a = _mm256_loadu_ps(x2 + k); c20 = _mm256_fmadd_ps(a, v0, c20); c21 = _mm256_fmadd_ps(a, v1, c21);
        a = _mm256_loadu_ps(x3 + k); c30 = _mm256_fmadd_ps(a, v0, c30); c31 = _mm256_fmadd_ps(a, v1, c31);
    }
    float s[4][2] = {{hsum8(c00), hsum8(c01)}, {hsum8(c10), hsum8(c11)},
                     {hsum8(c20), hsum8(c21)}, {hsum8(c30), hsum8(c31)}};
    for (; k < K; ++k) {
        float q0 = (float)w0[k], q1 = (float)w1[k];
        s[0][0] += x0[k] * q0; s[0][1] += x0[k] * q1;
        s[1][0] += x1[k] * q0; s[1][1] += x1[k] * q1;
        s[2][0] += x2[k] * q0; s[2][1] += x2[k] * q1;
        s[3][0] += x3[k] * q0; s[3][1] += x3[k] * q1;
    }
    for (int i = 0; i < 4; ++i) { out[i][0] = s[i][0]; out[i][1] = s[i][1]; }
}

static float dot_1x1(const float* x, const int8_t* w, int64_t K) {
    __m256 a = _mm256_setzero_ps(), b = a;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m128i q = _mm_loadu_si128((const __m128i*)(w + k));
        a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen8(q), a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), widen8(_mm_unpackhi_epi64(q, q)), b);
    }
    float s = hsum8(_mm256_add_ps(a, b));
    for (; k < K; ++k) s += x[k] * (float)w[k];
    return s;
}

static inline float finish(float acc, const float* scale, const float* bias, int64_t n) {
    return acc * scale[n] + (bias ? bias[n] : 0.0f);
}

typedef struct {
    const float* x; int64_t ldx; const int8_t* w; int64_t ldw;
    const float* scale; const float* bias; float* y; int64_t ldy;
    int64_t M, N, K;
} args_t;

/* groups [g0, g1) of 4 output channels, all M rows */
static void run_groups(const args_t* a, int64_t g0, int64_t g1) {
    const float *x = a->x, *scale = a->scale, *bias = a->bias;
    const int8_t* w = a->w;
    float* y = a->y;
    int64_t ldx = a->ldx, ldw = a->ldw, ldy = a->ldy, M = a->M, N = a->N, K = a->K;
    for (int64_t g = g0; g < g1; ++g) {
        int64_t n = 4 * g;
        if (n + 4 > N) {  /* the last 1-3 rows */
            for (int64_t r = n; r < N; ++r)
                for (int64_t m = 0; m < M; ++m)
                    y[m * ldy + r] = finish(dot_1x1(x + m * ldx, w + r * ldw, K), scale, bias, r);
            continue;
        }
        const int8_t* wg = w + n * ldw;
        /* prefetch the next group while this one streams (not past this range's end) */
        const int8_t* pf = g + 1 < g1 && n + 8 <= N ? wg + 4 * ldw : NULL;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            for (int h = 0; h < 4; h += 2) {
                float s[4][2];
                dot_4x2(x + m * ldx, ldx, wg + h * ldw, ldw, K, m == 0 && pf ? pf + h * ldw : NULL, s);
                for (int i = 0; i < 4; ++i)
                    for (int r = 0; r < 2; ++r)
                        y[(m + i) * ldy + n + h + r] = finish(s[i][r], scale, bias, n + h + r);
            }
        }
        for (; m < M; ++m) {
            float s[4];
            dot_1x4(x + m * ldx, wg, ldw, K, m == 0 ? pf : NULL, s);
            for (int r = 0; r < 4; ++r)
                y[m * ldy + n + r] = finish(s[r], scale, bias, n + r);
        }
    }
}

/* ---- a small thread pool in which the caller never waits for a helper that has not started.
   The caller publishes a job and claims chunks of groups itself; sleeping helpers are woken and
   claim chunks too when (if) they get a core. The caller then waits only for chunks already
   claimed, i.e. being computed by running helpers. (An OpenMP region instead ends in a barrier
   that waits for every team thread to arrive: on a busy machine, a descheduled helper stalled
   every call by a scheduler time slice, 15-20 ms, measured.) */

typedef struct {
    args_t a;
    int64_t groups, chunk, nchunks;
    int helpers;                /* helpers allowed to join (nthreads - 1) */
} job_t;

static job_t pool_job;                     /* written under pool_mu before pool_gen moves */
static _Atomic uint64_t pool_claim;        /* generation << 32 | next chunk */
static _Atomic int64_t pool_done;          /* chunks of the current job finished */
static _Atomic int pool_busy;              /* a caller owns the pool */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static uint32_t pool_gen;                  /* under pool_mu */
static int pool_started;                   /* helper threads started (under pool_mu) */

#ifndef HELPER_SPINS
#define HELPER_SPINS 2000
#endif

static void work(const job_t* j, uint32_t gen) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&pool_claim, memory_order_acquire);
        int64_t c = (int64_t)(v & 0xffffffffu);
        if ((uint32_t)(v >> 32) != gen || c >= j->nchunks) return;
        if (!atomic_compare_exchange_weak_explicit(&pool_claim, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        int64_t g0 = c * j->chunk, g1 = g0 + j->chunk < j->groups ? g0 + j->chunk : j->groups;
        run_groups(&j->a, g0, g1);
        atomic_fetch_add_explicit(&pool_done, 1, memory_order_acq_rel);
    }
}

static void* helper(void* arg) {
    int index = (int)(intptr_t)arg;
    uint32_t seen;
    pthread_mutex_lock(&pool_mu);
    seen = pool_gen;
    for (;;) {
        if (pool_gen == seen) {
            /* decode calls its linears back to back: watch for the next job a little while
               (2000 pauses: tens of us) before sleeping, as OpenMP and MKL threads do */
            pthread_mutex_unlock(&pool_mu);
            for (int i = 0; i < HELPER_SPINS; ++i) {
                if ((uint32_t)(atomic_load_explicit(&pool_claim, memory_order_relaxed) >> 32) != seen)
                    break;
                _mm_pause();
            }
            pthread_mutex_lock(&pool_mu);
        }
        while (pool_gen == seen) pthread_cond_wait(&pool_cv, &pool_mu);
        seen = pool_gen;
        if (index >= pool_job.helpers) continue;
        job_t j = pool_job;  /* stable while the generation is current */
        pthread_mutex_unlock(&pool_mu);
        work(&j, seen);
        pthread_mutex_lock(&pool_mu);
    }
    return NULL;
}

static void pool_after_fork(void) {  /* the child has no helper threads */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    pool_started = 0;
    atomic_store(&pool_busy, 0);
}

/* y[m * ldy + n] = scale[n] * sum_k x[m * ldx + k] * w[n * ldw + k] + bias[n] (bias may be NULL),
   on up to nthreads threads (the caller and nthreads - 1 pool helpers) */
void aa_int8_linear_f32(const float* x, int64_t ldx, const int8_t* w, int64_t ldw,
                        const float* scale, const float* bias, float* y, int64_t ldy,
                        int64_t M, int64_t N, int64_t K, int nthreads) {
    static int atfork_done;
    args_t a = {x, ldx, w, ldw, scale, bias, y, ldy, M, N, K};
    int64_t groups = (N + 3) / 4;
    if (nthreads > 256) nthreads = 256;
    if (nthreads <= 1 || groups < 2 || atomic_exchange(&pool_busy, 1)) {
        run_groups(&a, 0, groups);  /* serial (also when another caller holds the pool) */
        return;
    }
    /* about 4 chunks per thread, at least 16 groups (64 rows: long prefetch runs) each */
    int64_t chunk = groups / (4 * (int64_t)nthreads);
    if (chunk < 16) chunk = 16;
    int64_t nchunks = (groups + chunk - 1) / chunk;
    pthread_mutex_lock(&pool_mu);
    if (!atfork_done) { pthread_atfork(NULL, NULL, pool_after_fork); atfork_done = 1; }
    while (pool_started < nthreads - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, helper, (void*)(intptr_t)pool_started) != 0) break;
        pthread_detach(t);
        ++pool_started;
    }
    pool_job.a = a;
    pool_job.groups = groups; pool_job.chunk = chunk; pool_job.nchunks = nchunks;
    pool_job.helpers = nthreads - 1;
    uint32_t gen = ++pool_gen;
    atomic_store_explicit(&pool_done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool_claim, (uint64_t)gen << 32, memory_order_release);
    job_t j = pool_job;
    pthread_mutex_unlock(&pool_mu);
    pthread_cond_broadcast(&pool_cv);
    work(&j, gen);
    for (int spins = 0; atomic_load_explicit(&pool_done, memory_order_acquire) < nchunks; ++spins) {
        if (spins < 256) _mm_pause(); else sched_yield();
    }
    atomic_store(&pool_busy, 0);
}
"""

_FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread", "-x", "c")
#: below this many multiply-adds (1024 x 1024 at M = 1) the caller does it all: waking a helper
#: costs ~10 us, and a single core already streams a small weight from L2/L3 fast
PARALLEL_GRAIN = 1 << 20
_LOCK = threading.Lock()


def supported_cpu() -> bool:
    """x86-64 with AVX2 and FMA, as ATen's dispatcher sees it (``AVX2`` or ``AVX512``)."""
    if os.name != "posix" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def compiler() -> str | None:
    """``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on ``PATH`` (None: none)."""
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    root = Path(os.environ.get("AA_COMPILE_CACHE", os.path.expanduser("~/.cache/aa-compile")))
    path = root / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"aa-compile-kernels-{os.getuid()}"  # posix only


def _build(cc: str, flags: tuple[str, ...]) -> Path:
    """The ``.so`` for ``flags`` (compiled unless cached). Raises on a compiler error."""
    key = hashlib.sha256("\0".join((SOURCE, cc, *flags)).encode()).hexdigest()[:16]
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"int8_linear_avx2-{key}.so"
    if lib.exists():
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # atomic publish: build, then rename
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-", "-o", tmp], input=SOURCE.encode(), check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def library():
    """The loaded kernel function (``ctypes``), or None where it cannot be used (see module doc)."""
    if not supported_cpu():
        return None
    cc = compiler()
    if cc is None:
        warnings.warn("aa::int8_linear: no C compiler found ($CC, cc, gcc, clang): the CPU path "
                      "falls back to dequantise + GEMM (slower at batch 1)", stacklevel=2)
        return None
    with _LOCK:
        try:
            fn = ctypes.CDLL(str(_build(cc, _FLAGS))).aa_int8_linear_f32
        except (OSError, subprocess.SubprocessError) as e:
            err = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-800:]
            warnings.warn("aa::int8_linear: building the AVX2 CPU kernel failed, the CPU path "
                          f"falls back to dequantise + GEMM (slower at batch 1): {e} {err}",
                          stacklevel=2)
            return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, p, i64, p, p, p, i64, i64, i64, i64, ctypes.c_int]
    fn.restype = None
    return fn


def available() -> bool:
    """Whether `int8_linear` can run here (builds the kernel on the first call)."""
    return library() is not None


def int8_linear(x2: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``[M, K]`` float x ``[N, K]`` int8 -> ``[M, N]`` float32 (CPU tensors; ``x2`` is used in
    float32, ``scales`` and ``bias`` are cast to float32). Needs `available`."""
    fn = library()
    if fn is None:
        raise RuntimeError("aa::int8_linear: the AVX2 CPU kernel is not available here")
    m, k = x2.shape
    n = w_int8.shape[0]
    f32 = torch.float32
    y = torch.empty((m, n), dtype=f32, device=x2.device)
    if m == 0 or n == 0:
        return y
    # (plain checks instead of no-op .to() / .contiguous() calls: this runs per decode step)
    if x2.dtype != f32:
        x2 = x2.to(f32)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    if k > 1 and w_int8.stride(1) != 1:
        w_int8 = w_int8.contiguous()
    if scales.dtype != f32 or not scales.is_contiguous():
        scales = scales.to(f32).contiguous()
    if bias is not None and (bias.dtype != f32 or not bias.is_contiguous()):
        bias = bias.to(f32).contiguous()
    threads = max(1, min(torch.get_num_threads(), m * n * k // PARALLEL_GRAIN))
    fn(x2.data_ptr(), x2.stride(0), w_int8.data_ptr(), w_int8.stride(0), scales.data_ptr(),
       None if bias is None else bias.data_ptr(), y.data_ptr(), n, m, n, k, threads)
    return y
