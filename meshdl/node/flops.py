"""A short compute benchmark: this host's FLOP/s for the node's birth state.

A float32 matrix product (numpy, no torch import: node start stays light) run
for a bounded time; the best rate of several rounds is reported. Real DNN layers
reach less than a large GEMM, so ``efficiency`` scales the figure down.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

DEFAULT_EFFICIENCY = 0.5


def measure_flops(budget_s: float = 0.25, n: int = 256,
                  efficiency: float = DEFAULT_EFFICIENCY) -> float:
    """Effective FLOP/s measured within about ``budget_s`` seconds (< 0.5 s)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b                                       # warm up (BLAS threads, caches)
    work = 2.0 * n ** 3
    best = 0.0
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        dt = time.perf_counter() - t0
        if dt > 0:
            best = max(best, 4 * work / dt)
    flops = best * efficiency
    log.info("measured %.2f GFLOP/s (matmul %d^3, x%.2f efficiency)", flops / 1e9, n,
             efficiency)
    return flops
