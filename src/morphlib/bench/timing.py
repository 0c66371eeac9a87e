"""Timing on the device, shared by the benchmarks: CUDA-graph replays between events (``time_cuda``),
CPU wall-clock medians (``time_cpu``) and the one copy-bandwidth ceiling (``copy_bandwidth_gbps``:
device to device, bytes read plus bytes written), which every bandwidth and roofline figure of the
benchmarks is compared with."""

from __future__ import annotations

import statistics
import time

import torch


def time_cuda(calls: list, min_ms: float = 20.0, max_reps: int = 30) -> float:
    """Median ms per call of ``calls`` (each a no-argument callable, e.g. one per weight copy),
    captured once into a CUDA graph and replayed between events (plain launches if capture fails)."""
    for c in calls:  # warm-up: compile, autotune-free, allocate
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for c in calls:
                c()
    except Exception:  # noqa: BLE001  (time the same calls without a graph)
        torch.cuda.synchronize()
        graph = _Launches(calls)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    first = start.elapsed_time(end)
    reps = max(3, min(max_reps, int(min_ms / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


class _Launches:
    def __init__(self, calls):
        self.calls = calls

    def replay(self):
        for c in self.calls:
            c()


def time_cpu(call, min_s: float = 0.05, max_reps: int = 50) -> float:
    """Median ms of wall-clock runs of ``call`` after one warm-up: at least 3 runs and ``min_s`` seconds,
    at most ``max_reps`` runs."""
    call()
    times, total = [], 0.0
    while (total < min_s or len(times) < 3) and len(times) < max_reps:
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        total += dt
    return statistics.median(times)


def copy_bandwidth_gbps(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written: the better of a
    memcpy (``copy_``) and an elementwise copy kernel over 1 GiB."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = min(time_cuda([lambda: dst.copy_(src)], min_ms=50.0),
             time_cuda([lambda: torch.mul(src, 1.0, out=dst)], min_ms=50.0))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9
