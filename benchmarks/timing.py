"""Timing and memory helpers shared by the benchmark sections."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def total_ram_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up when repeating)."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_with_peak(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds of ``fn()``, peak memory in MB above the level before it): the allocator's peak on CUDA, the
    RSS high-water mark on CPU (reset first). Run it in a fresh process, so the high-water mark is this case's."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        base = rss_mb("VmRSS")
    seconds = timed(fn, device, repeats)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else rss_mb("VmHWM") - base
    return seconds, extra


def log(*a) -> None:
    """A timestamped progress line, flushed."""
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def load_avg() -> str:
    """The 1-, 5- and 15-minute load averages: how busy the shared machine was."""
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())
