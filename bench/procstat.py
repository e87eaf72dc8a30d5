"""What /proc says, for the benchmarks: a process's CPU seconds and memory, and whether
the machine is quiet enough to measure on."""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of every thread of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the peak so far), in MiB."""
    figures = {"VmRSS": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in figures:
            figures[name] = int(value.split()[0]) / 1024
    return figures


def peak_rss_mb(pid: int) -> float:
    return memory_mb(pid)["VmHWM"]


def _cpu_times() -> tuple[int, int]:
    """Busy and total jiffies of the whole machine so far (the `cpu` line of /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def wait_for_quiet(
    max_busy: float = 0.25, window_s: float = 5.0, timeout_s: float = 180.0
) -> dict[str, float]:
    """Wait until the machine's CPUs were busy at most `max_busy` of a `window_s` window.

    A step measured right after a heavy one shares the machine with what that one left
    running (Kafka deleting its topics, compactions): its figures would be the leftovers'.
    Gives up after `timeout_s`; returns the wait and the last window's busy share.
    """
    began = time.monotonic()
    while True:
        busy_before, total_before = _cpu_times()
        time.sleep(window_s)
        busy_after, total_after = _cpu_times()
        busy = (busy_after - busy_before) / max(total_after - total_before, 1)
        waited = time.monotonic() - began
        if busy <= max_busy or waited >= timeout_s:
            return {"waited_s": round(waited, 1), "busy_share": round(busy, 3)}
