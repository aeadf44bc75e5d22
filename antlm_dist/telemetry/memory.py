"""Peak CPU tensor memory of a call, from the profiler's allocation events.

Used by the kernel benchmarks (``benchmarks/bench_masked_token_loss.py``) and by the
loss kernel's memory test.
"""
from __future__ import annotations


def cpu_peak_allocated_bytes(fn) -> int:
    """Peak of (CPU bytes allocated - bytes freed) while ``fn()`` runs, in bytes, from the
    profiler's allocation events (memory held before the call does not count)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
