"""Process settings for the Ray processes that run the model: training workers, predict actors.

Why the allocator matters: a CPU training step of the LSTM allocates oneDNN's workspace (about
95 MB for a batch of 128 x 100 steps x 128 hidden units) and frees it again. glibc's malloc
serves a block that large with a fresh `mmap` and gives it back with `munmap`, so every step
pays ~24k page faults to zero the same memory again: a quarter of the step, all of it kernel time
(measured on one core: 100 ms -> 77 ms per step once freed memory is kept for reuse). PyTorch's
CPU tuning guide recommends jemalloc or tcmalloc for this reason; glibc's own tunables get the
effect without installing or preloading anything.

They must be in the environment when the process starts, not set later with `mallopt`: Ray Train
runs the training loop in a thread of the worker actor, and a thread allocates from its own
arena, whose heaps are capped at 64 MB, so a larger block is always `mmap`ed there whatever the
thresholds. One arena (MALLOC_ARENA_MAX=1) puts every thread on the main heap, which can grow.
Ray passes the variables to the processes it starts for us (`worker_runtime_env` for Train
workers, `runtime_env` for predict actors); other processes on the cluster are untouched.
Outside glibc (musl, macOS) the variables mean nothing and change nothing.
"""

from __future__ import annotations

KEEP_BYTES = 1 << 30
"""Blocks up to this size come from the heap, and up to this much free memory at the heap's top
stays mapped for the next step instead of going back to the OS."""

REUSE_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(KEEP_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(KEEP_BYTES),
}


def worker_env(reuse_memory: bool) -> dict[str, str]:
    """Environment variables for a process that runs the model (empty when `reuse_memory` is off)."""
    return dict(REUSE_MEMORY_ENV) if reuse_memory else {}


def allocator_in_use() -> str:
    """What this process runs with, for the run record: 'reuse' or 'default'."""
    import os

    return "reuse" if all(os.environ.get(k) == v for k, v in REUSE_MEMORY_ENV.items()) else "default"
