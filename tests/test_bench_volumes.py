"""``benchmarks/bench_volumes.py``: its GIL probe tells a process whose GIL is held from an idle one."""

import importlib.util
import sys
import threading
import time
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_volumes.py"
_SPEC = importlib.util.spec_from_file_location("bench_volumes_under_test", _PATH)
bench_volumes = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_volumes)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # pure Python: holds the GIL but for the forced switches
        sum(range(200))


def test_gil_probe_sees_a_thread_that_holds_the_gil():
    idle = bench_volumes.idle_gil_lag(0.3)
    busy = threading.Thread(target=_spin, args=(0.6,))
    with bench_volumes.GilProbe() as probe:
        busy.start()
        busy.join()
    held = probe.summary()
    assert idle["wakeups"] > 50 and held["wakeups"] > 10
    # beside a busy Python thread each wake-up waits for the forced switch (sys.getswitchinterval(), 5 ms)
    switch_ms = 1e3 * sys.getswitchinterval()
    assert held["median_ms"] > 0.5 * switch_ms, (idle, held)
    assert held["median_ms"] > 10 * idle["median_ms"], (idle, held)
