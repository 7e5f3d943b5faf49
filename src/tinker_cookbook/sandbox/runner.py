"""Run an untrusted Python program in a confined child process and collect what it printed.

Each run gets a fresh scratch directory as its working directory and a new process session.
Inside, before the program starts (see ``_child.py``):

* a new network namespace with no interfaces up (``unshare(CLONE_NEWNET)``; without root, inside
  a new user namespace where the kernel allows it; :attr:`RunResult.network_namespace` says
  whether it worked) and, in every case, an audit hook that refuses sockets' ``connect``,
  ``bind``, ``sendto`` and name lookups;
* as root: a uid of its own (no files but the scratch directory's are writable, no signals to
  other processes; the standard-library modules in ``_child.PRELOADED_MODULES`` are imported
  before the switch, since the interpreter may live where that uid cannot read, e.g. ``/root``); ``RLIMIT_NPROC`` = 1 so it cannot start processes or threads (the audit hook
  also refuses ``fork``, ``exec``, ``subprocess`` and ``ctypes``);
* ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (output and any file it writes),
  ``RLIMIT_NOFILE``; writes, renames and removals outside the scratch directory are refused.

The parent waits at most ``wall_seconds``, then kills the whole process group, and always
removes the scratch directory. Not a security boundary against a determined attacker (it is
not a VM or seccomp filter): it keeps a model's mistakes and small mischief from harming the
machine that trains it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_CHILD = str(Path(__file__).with_name("_child.py"))
_UIDS = itertools.count()
_UID_BASE = 1_500_000  # far above ordinary users; no passwd entry is needed


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 2**20  # address space, so a little above what it allocates
    max_output_bytes: int = 64 * 2**10  # stdout, stderr and every file it writes
    max_open_files: int = 32

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "max_output_bytes", "max_open_files"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")


@dataclass(frozen=True)
class RunResult:
    """How a program ended and what it printed (each stream cut at ``max_output_bytes``)."""

    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool  # killed after ``wall_seconds``
    network_namespace: bool  # the program ran in an empty network namespace
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def output_limit_exceeded(self) -> bool:
        return self.returncode == -signal.SIGXFSZ

    @property
    def cpu_limit_exceeded(self) -> bool:
        return self.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not self.timed_out


def _sandbox_uid() -> int | None:
    """A uid no other running sandbox uses (as root); ``None`` when not root (the run keeps our uid)."""
    if os.geteuid() != 0:
        return None
    return _UID_BASE + (os.getpid() % 32768) * 1024 + next(_UIDS) % 1024


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(source: str, limits: Limits | None = None) -> RunResult:
    """Run ``source`` as ``__main__`` in a sandboxed Python (standard library only; see the module doc).

    Blocking; call it through ``asyncio.to_thread`` (or :func:`run_python_async`) from async code.
    """
    if not isinstance(source, str):
        raise TypeError(f"source: expected str, got {type(source).__name__}")
    limits = limits or Limits()
    uid = _sandbox_uid()
    work = Path(tempfile.mkdtemp(prefix="tinker-sandbox-"))
    try:
        scratch = work / "scratch"
        scratch.mkdir()
        if uid is not None:
            os.chown(scratch, uid, uid)
        child_limits = {**asdict(limits), "uid": uid}
        start = time.monotonic()
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _CHILD, json.dumps(child_limits)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=scratch,
                env={"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
                start_new_session=True,  # its own process group, killed as one
            )
            timed_out = False
            try:
                proc.communicate(source.encode(), timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also after a normal exit: nothing it started may outlive it
            proc.wait()
        elapsed = time.monotonic() - start
        stderr = _read(work / "stderr", limits.max_output_bytes)
        header, _, stderr = stderr.partition("\n")
        try:
            network_namespace = bool(json.loads(header)["network_namespace"])
        except (ValueError, KeyError, TypeError):  # setup failed before the header
            network_namespace, stderr = False, header + "\n" + stderr
        return RunResult(proc.returncode, _read(work / "stdout", limits.max_output_bytes), stderr, timed_out,
                         network_namespace, elapsed)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def run_python_async(source: str, limits: Limits | None = None) -> RunResult:
    """:func:`run_python` in a worker thread, so an event loop keeps running while the program does."""
    return await asyncio.to_thread(run_python, source, limits)
