"""Native CPU kernel of `aa::int8_linear` for small ``M`` (decode): AVX2 + FMA C, built on first
use by ``kernels/_native.py`` and called through ``ctypes``.

``y[m, n] = scale[n] * sum_k x[m, k] * w_int8[n, k] + bias[n]`` in float32: each int8 weight is
read once (1 byte, where float32 ``F.linear`` reads 4) and widened in registers, the next group
of weight rows is software-prefetched, and helper threads of ``_native``'s pool claim chunks of
output channels. Every output is summed by one thread in a fixed order, so results do not
depend on the thread count. `available` is False (the caller falls back to
``cpu.blocked_linear``) without AVX2/FMA or a working C compiler. Design and measurements:
``docs/dtm.md``, ``docs/performance.md``.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from aa_compile.kernels import _native
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>
#include <pthread.h>
#include <sched.h>
#include <immintrin.h>
""" + _native.POOL_SOURCE + r"""
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
    int64_t groups, chunk;      /* groups of 4 channels; groups per chunk of work */
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

/* chunk c of a call: groups [c * chunk, (c + 1) * chunk) (the last chunk: up to groups) */
static void group_task(const void* args, int64_t c) {
    const args_t* a = (const args_t*)args;
    int64_t g0 = c * a->chunk, g1 = g0 + a->chunk < a->groups ? g0 + a->chunk : a->groups;
    run_groups(a, g0, g1);
}

/* y[m * ldy + n] = scale[n] * sum_k x[m * ldx + k] * w[n * ldw + k] + bias[n] (bias may be NULL),
   on up to nthreads threads (the caller and nthreads - 1 helpers of the pool above) */
void aa_int8_linear_f32(const float* x, int64_t ldx, const int8_t* w, int64_t ldw,
                        const float* scale, const float* bias, float* y, int64_t ldy,
                        int64_t M, int64_t N, int64_t K, int nthreads) {
    int64_t groups = (N + 3) / 4;
    args_t a = {x, ldx, w, ldw, scale, bias, y, ldy, M, N, K, groups, groups};
    if (nthreads <= 1 || groups < 2) {
        run_groups(&a, 0, groups);  /* serial, one prefetch run over all groups */
        return;
    }
    /* about 4 chunks per thread, at least 16 groups (64 rows: long prefetch runs) each */
    int64_t chunk = groups / (4 * (int64_t)(nthreads > 256 ? 256 : nthreads));
    if (chunk < 16) chunk = 16;
    a.chunk = chunk;
    /* one chunk, or the pool busy (another caller): pool_run runs the chunks serially */
    pool_run(group_task, &a, (groups + chunk - 1) / chunk, nthreads);
}
"""

#: below this many multiply-adds (1024 x 1024 at M = 1) the caller does it all: waking a helper
#: costs ~10 us, and a single core already streams a small weight from L2/L3 fast
PARALLEL_GRAIN = 1 << 20

# the build plumbing and the thread pool are shared with the other native kernels
# (aa_compile.kernels._native)
supported_cpu = _native.supported_cpu
compiler = _native.compiler


@functools.cache
def library():
    """The loaded kernel function (``ctypes``), or None where it cannot be used (see module doc)."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return _native.function(SOURCE, "int8_linear_avx2", "aa_int8_linear_f32",
                            [p, i64, p, i64, p, p, p, i64, i64, i64, i64, ctypes.c_int], None,
                            "aa::int8_linear",
                            "dequantise + GEMM on the CPU path (slower at batch 1)")


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
