"""CUDA-graph capture of a whole static-shape pipeline, replayed per call (gpt-fast style).

The function handed to `capture` must read only static input tensors and write only
static output tensors (its closure holds them): a replay re-runs exactly the kernels
recorded, on the same addresses, so new inputs are written into the input tensors in
place (`copy_`), and results are read from the outputs after `replay()`.

What capture needs, and how it is met here:
- warm-up runs before capture, on a side stream: cuBLAS handles and workspaces, CuPy
  module loads and the caching allocator's first blocks all happen there, not in capture;
- nothing in the function may sync with the host or branch on a tensor value (the
  sampler and the kernels are written that way);
- every graph has its own memory pool, so replaying one batch size's graph never
  overwrites another's intermediate or output tensors.

`GraphCache` keeps one graph per key, e.g. (preset, batch size, leads): captured on first
use (or at warm-up) and replayed afterwards.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Hashable

import torch

log = logging.getLogger(__name__)


class CapturedGraph:
    """A recorded pipeline; `replay()` enqueues it on the current stream (no host sync)."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", capture_s: float) -> None:
        self.graph = graph
        self.capture_s = capture_s

    def replay(self) -> None:
        self.graph.replay()


def capture(fn: Callable[[], None], warmup: int = 3) -> CapturedGraph:
    """Warm `fn` up on a side stream, then record one call of it into a CUDA graph."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    t0 = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a private memory pool per graph
        fn()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    log.info("captured a CUDA graph in %.2f s (%d warm-up runs)", elapsed, warmup)
    return CapturedGraph(graph, elapsed)


class GraphCache:
    """One captured graph per key; `build(key)` returns the function to capture for it."""

    def __init__(self, build: Callable[[Hashable], Callable[[], None]], warmup: int = 3) -> None:
        self._build = build
        self._warmup = warmup
        self._graphs: dict[Hashable, CapturedGraph] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def get(self, key: Hashable) -> CapturedGraph:
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = capture(self._build(key), self._warmup)
        return graph

    def keys(self) -> list[Hashable]:
        return list(self._graphs)
