"""Timing one encoder call in JAX and in PyTorch the same way, for the encoder benchmarks (CLIP, LLaMA, ...):
best of ``iters`` wall times after a first (compiling / warming) call, and the device's peak memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def best_time(fn: Callable[[], Any], iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def time_torch(model, feeds: dict, pick: Callable[[Any], Any], iters: int) -> tuple[float, int | None, np.ndarray]:
    """``model(**feeds, output_hidden_states=True)`` without grad: (seconds per call, peak bytes on CUDA or None,
    ``pick(output)`` as a float32 numpy array)."""
    import torch

    cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def call():
        with torch.no_grad():
            out = model(**feeds, output_hidden_states=True)
        sync()
        return out

    out = call()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sec = best_time(call, iters)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return sec, peak, pick(out).float().cpu().numpy()


def time_jax(call: Callable[[], Any], iters: int) -> tuple[float, float, int | None, np.ndarray]:
    """``call()`` returns the array compared: (seconds per call, first-call (compile) seconds, peak bytes of
    device 0 or None, the output as float32 numpy)."""
    import jax
    import jax.numpy as jnp

    def run():
        return jax.block_until_ready(call())

    t0 = time.perf_counter()
    out = run()  # compiles; later calls reuse the executable (compiled_call)
    compile_s = time.perf_counter() - t0
    sec = best_time(run, iters)
    stats = jax.local_devices()[0].memory_stats() or {}
    return sec, compile_s, stats.get("peak_bytes_in_use"), np.asarray(out.astype(jnp.float32))


def gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"
