"""CPU time per thread of a process, grouped by what the thread does (for ``--profile``).

Reads ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds on the CPU; falls back to ``stat``'s
utime + stime in clock ticks), so it measures the work each thread did, which load from other
processes inflates much less than the wall clock. A thread is named from ``names`` (native
thread id -> Python thread name: ``threading.enumerate()`` of this process, or what a server
started by ``_common.Server`` dumps on ``SIGUSR1``); threads missing there are native ones
(torch's intra-op workers, for instance) and are grouped as such.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

_TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")

# Groups in report order: (label, whether a Python thread name belongs to it).
GROUPS: list[tuple[str, Callable[[str], bool]]] = [
    ("compute thread (engine-*)", lambda name: name.startswith("engine-")),
    ("event loop (tinker-loop, or the server's MainThread)", lambda name: name in ("tinker-loop", "server:MainThread")),
    ("caller (the benchmark's MainThread)", lambda name: name == "MainThread"),
    ("other Python threads", lambda name: True),
]
NATIVE = "native threads (torch workers, ...)"


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """Nanoseconds of CPU each live thread of ``pid`` has used, by native thread id."""
    times: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[int(task.name)] = _task_ns(task)
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
    return times


def _task_ns(task: Path) -> int:
    try:
        return int((task / "schedstat").read_text().split()[0])
    except OSError:
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) * _TICK_NS)  # utime, stime


def group_of(name: str | None) -> str:
    if name is None:
        return NATIVE
    return next(label for label, belongs in GROUPS if belongs(name))


def grouped_ms(
    before: Mapping[int, int], after: Mapping[int, int], names: Mapping[int, str], per: int
) -> dict[str, float]:
    """CPU milliseconds per ``per`` (steps) of each group between two ``thread_cpu_ns`` readings;
    a thread that started in between counts from zero, one that ended is lost (not counted)."""
    ms = {label: 0.0 for label, _ in GROUPS} | {NATIVE: 0.0}
    for tid, ns in after.items():
        ms[group_of(names.get(tid))] += (ns - before.get(tid, 0)) / 1e6 / per
    return ms
