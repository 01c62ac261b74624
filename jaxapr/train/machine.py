"""What this machine can do: the memory a run may use (``jaxapr.train.plan`` checks a run
against it per device before it starts) and the matmul peak that "fraction of peak" figures
are measured against."""

from __future__ import annotations

import time

import jax


def available_bytes() -> int | None:
    """Memory available to a run: the first device's limit on an accelerator, the host's
    ``MemAvailable`` on CPU; None when unknown."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def matmul_peak_flops(n: int | None = None, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a jitted ``dtype`` [n, n] @ [n, n] on the default device (random operands):
    the reference peak that "fraction of peak" figures are measured against (in the same run).
    Use the model's compute dtype: on GPU/TPU a bfloat16 product runs several times faster
    than a float32 one. ``n`` defaults to 2,048 on a CPU and 8,192 on an accelerator (a
    smaller product does not fill it)."""
    import jax.numpy as jnp

    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
