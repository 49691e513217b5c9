"""What the Python anchors share: the best wall time of repeated runs."""
import time


def best_time(repeats, fn):
    """Smallest wall time of `repeats` calls of fn, in seconds (as bench_util.h's best_time)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
