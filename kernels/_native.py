"""Shared plumbing of the native (C, AVX2/FMA) CPU kernels: build with the system C compiler on
first use, cache the ``.so``, load it through ``ctypes``; and a small C thread pool to paste into
a kernel's source.

Build: a source is compiled once per source / compiler / flags (``$CC``, else
``cc``/``gcc``/``clang``) into ``$AA_COMPILE_CACHE/kernels`` (default ``~/.cache/aa-compile``;
a temporary folder when that is not writable), published by an atomic rename; later processes
load the cached ``.so``. No PyTorch headers: about a second with gcc, where a
``torch.utils.cpp_extension`` build spends most of a minute on the headers. `load` returns None
(and warns once, naming the kernel and its fallback) off x86-64 Linux/macOS, on CPUs without
AVX2/FMA as ATen detects them (so ``ATEN_CPU_CAPABILITY=default`` turns the kernels off too), or
when no compiler works.

Used by `aa_compile.kernels.int8_linear.cpu_avx2` and `aa_compile.kernels.trigram_bag.cpu_avx2`
(each pastes `POOL_SOURCE` into its source; a job is any
``void task(const void* args, int64_t chunk)``).
"""

from __future__ import annotations

import ctypes
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

#: compiler flags of an AVX2 + FMA shared library built from C source on stdin
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread", "-x", "c")
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


def cache_dir() -> Path:
    root = Path(os.environ.get("AA_COMPILE_CACHE", os.path.expanduser("~/.cache/aa-compile")))
    path = root / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"aa-compile-kernels-{os.getuid()}"  # posix only


def build(source: str, stem: str, cc: str, flags: tuple[str, ...] = AVX2_FLAGS) -> Path:
    """The ``.so`` of ``source`` (compiled unless cached). Raises on a compiler error."""
    key = hashlib.sha256("\0".join((source, cc, *flags)).encode()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"{stem}-{key}.so"
    if lib.exists():
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # atomic publish: build, then rename
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-", "-o", tmp], input=source.encode(), check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(source: str, stem: str, what: str, fallback: str,
         flags: tuple[str, ...] = AVX2_FLAGS) -> ctypes.CDLL | None:
    """The loaded library (building it first), or None where AVX2/FMA or a working compiler is
    missing; a failed build warns ``"{what}: ... falls back to {fallback}"``. Callers cache
    the result (``functools.cache``)."""
    if not supported_cpu():
        return None
    cc = compiler()
    if cc is None:
        warnings.warn(f"{what}: no C compiler found ($CC, cc, gcc, clang): falls back to "
                      f"{fallback}", stacklevel=3)
        return None
    with _LOCK:
        try:
            return ctypes.CDLL(str(build(source, stem, cc, flags)))
        except (OSError, subprocess.SubprocessError) as e:
            err = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-800:]
            warnings.warn(f"{what}: building the AVX2 CPU kernel failed, falls back to "
                          f"{fallback}: {e} {err}", stacklevel=3)
            return None


def function(source: str, stem: str, name: str, argtypes: list, restype, what: str,
             fallback: str) -> ctypes._CFuncPtr | None:
    """The C function ``name`` of `load`'s library, its ``argtypes`` / ``restype`` set; None where
    `load` gives None. Callers cache the result."""
    lib = load(source, stem, what, fallback)
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


#: C: ``pool_run(task, args, nchunks, nthreads)`` runs ``task(args, c)`` for every chunk
#: ``c < nchunks`` on the caller plus up to ``nthreads - 1`` helper threads. The caller claims
#: chunks too and then waits only for chunks a helper has already claimed, never for a helper
#: that has not started (an OpenMP region's closing barrier waits for every team thread: on a
#: shared machine a descheduled one stalls the call by a scheduler time slice). Idle helpers
#: watch for the next job for tens of microseconds, then sleep on a condition variable. A
#: second caller while the pool is busy (another Python thread) runs its chunks serially; a
#: forked child starts a new pool. Needs ``<stdint.h> <stdatomic.h> <pthread.h> <sched.h>
#: <immintrin.h>``.
POOL_SOURCE = r"""
typedef void (*pool_task_t)(const void* args, int64_t chunk);
typedef struct { pool_task_t task; const void* args; int64_t nchunks; int helpers; } pool_job_t;

static pool_job_t pool_job;                /* written under pool_mu before pool_gen moves */
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

static void pool_work(const pool_job_t* j, uint32_t gen) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&pool_claim, memory_order_acquire);
        int64_t c = (int64_t)(v & 0xffffffffu);
        if ((uint32_t)(v >> 32) != gen || c >= j->nchunks) return;
        if (!atomic_compare_exchange_weak_explicit(&pool_claim, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        j->task(j->args, c);
        atomic_fetch_add_explicit(&pool_done, 1, memory_order_acq_rel);
    }
}

static void* pool_helper(void* arg) {
    int index = (int)(intptr_t)arg;
    uint32_t seen;
    pthread_mutex_lock(&pool_mu);
    seen = pool_gen;
    for (;;) {
        if (pool_gen == seen) {
            /* calls come back to back (decode runs its linears one after another): watch for
               the next job a little while (HELPER_SPINS pauses: tens of us) before sleeping,
               as OpenMP and MKL threads do */
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
        pool_job_t j = pool_job;  /* stable while the generation is current */
        pthread_mutex_unlock(&pool_mu);
        pool_work(&j, seen);
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

static void pool_run(pool_task_t task, const void* args, int64_t nchunks, int nthreads) {
    static int atfork_done;
    if (nthreads > 256) nthreads = 256;
    if (nthreads <= 1 || nchunks < 2 || atomic_exchange(&pool_busy, 1)) {
        for (int64_t c = 0; c < nchunks; ++c) task(args, c);
        return;
    }
    pthread_mutex_lock(&pool_mu);
    if (!atfork_done) { pthread_atfork(NULL, NULL, pool_after_fork); atfork_done = 1; }
    while (pool_started < nthreads - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, pool_helper, (void*)(intptr_t)pool_started) != 0) break;
        pthread_detach(t);
        ++pool_started;
    }
    pool_job.task = task; pool_job.args = args; pool_job.nchunks = nchunks;
    pool_job.helpers = nthreads - 1;
    uint32_t gen = ++pool_gen;
    atomic_store_explicit(&pool_done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool_claim, (uint64_t)gen << 32, memory_order_release);
    pool_job_t j = pool_job;
    pthread_mutex_unlock(&pool_mu);
    pthread_cond_broadcast(&pool_cv);
    pool_work(&j, gen);
    for (int spins = 0; atomic_load_explicit(&pool_done, memory_order_acquire) < nchunks; ++spins) {
        if (spins < 256) _mm_pause(); else sched_yield();
    }
    atomic_store(&pool_busy, 0);
}
"""
