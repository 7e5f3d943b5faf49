"""The sandbox contains hostile programs: each is stopped, scores 0 as a code-RL answer, and the
harm it tried did not happen (no file, no stray process, no connection, the test process fine)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tinker_cookbook.recipes.code_rl.tasks import grade, load_problems
from tinker_cookbook.sandbox import Limits, run_python

FAST = Limits(wall_seconds=4.0, cpu_seconds=1)


def processes_running(marker: bytes, parent: int | None = None) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if marker in (entry / "cmdline").read_bytes() and parent in (None, ppid):
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def sandbox_processes() -> list[int]:
    """This test's sandbox launchers still running, or the ``sleep 3737`` the fork bombs try, anywhere."""
    return processes_running(b"tinker_cookbook/sandbox/_child.py", os.getpid()) + processes_running(b"sleep\x003737\x00")


def as_answer(body: str) -> float:
    """The code-RL reward of ``body`` as the answer to HumanEval/0 (a function body)."""
    indented = "".join(f"    {line}\n" for line in body.splitlines())
    return grade(load_problems()[0], indented, FAST).fraction


def test_a_plain_program_runs_in_its_scratch_directory():
    r = run_python("import os\nopen('note.txt', 'w').write('hi')\nprint(open('note.txt').read(), os.getcwd())")
    assert r.ok and r.stdout.split()[0] == "hi"
    scratch = r.stdout.split()[1]
    assert not os.path.exists(scratch)  # removed after the run


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    # A wall-clock limit far above the CPU limit, so a loaded machine still shows the CPU limit acting.
    r = run_python("while True:\n    pass", Limits(wall_seconds=30.0, cpu_seconds=1))
    assert not r.ok and not r.timed_out and r.cpu_limit_exceeded
    assert as_answer("while True:\n    pass") == 0.0
    assert sandbox_processes() == []


def test_sleeping_forever_is_killed_at_the_wall_clock_limit():
    r = run_python("import time\ntime.sleep(60)", Limits(wall_seconds=1.0))
    assert r.timed_out and not r.ok and not r.cpu_limit_exceeded and r.wall_seconds < 30  # not the sleep's 60 s
    assert sandbox_processes() == []


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '3737'])",
    "import os\nos.system('sleep 3737 &')",
    "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()",
])
def test_fork_bombs_start_nothing(bomb):
    r = run_python(bomb, FAST)
    assert not r.ok
    # Refused by the audit hook, RLIMIT_NPROC, or (as root) because the sandbox uid cannot read the module.
    assert any(reason in r.stderr for reason in ("PermissionError", "can't start new thread", "ModuleNotFoundError"))
    assert as_answer(bomb) == 0.0
    assert sandbox_processes() == []


def test_thread_limit_holds_without_the_audit_hook():
    """RLIMIT_NPROC, not only the audit hook: threads raise no audit event, yet none start."""
    r = run_python("import threading\nthreading.Thread(target=print).start()", FAST)
    assert not r.ok and "can't start new thread" in r.stderr


@pytest.mark.parametrize("spam", ["print('x' * 10**7)", "while True:\n    print('x' * 1000)"])
def test_huge_output_is_cut_and_fails(spam):
    limits = Limits(max_output_bytes=4096, cpu_seconds=2)
    r = run_python(spam, limits)
    assert r.output_limit_exceeded and not r.ok
    assert len(r.stdout) <= 4096
    assert as_answer(spam) == 0.0


def test_writes_outside_the_scratch_directory_do_not_happen(tmp_path):
    tmp_path.chmod(0o777)  # even a world-writable directory
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "pwned.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.symlink('/', 'root')\nopen('root' + {str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
    ]
    for program in attempts:
        r = run_python(program, FAST)
        assert not r.ok, program
        assert "PermissionError" in r.stderr, program
        assert as_answer(program) == 0.0
    assert not target.exists()
    assert victim.read_text() == "keep me"


def test_network_is_unreachable():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')"
        r = run_python(program, FAST)
        assert not r.ok and "PermissionError" in r.stderr
        assert as_answer(program) == 0.0
        with pytest.raises(TimeoutError):
            server.accept()  # nothing connected


def test_the_network_namespace_is_empty_where_the_os_allows_one():
    r = run_python("print(open('/proc/self/net/dev').read())", FAST)
    assert r.ok
    if not r.network_namespace:
        pytest.skip("this OS refuses new network namespaces (the audit hook still blocks sockets)")
    interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line]
    assert interfaces == ["lo"]


def test_memory_limit_and_signals_to_others():
    r = run_python("x = bytearray(4 * 2**30)", FAST)
    assert not r.ok and "MemoryError" in r.stderr
    r = run_python(f"import os\nos.kill({os.getpid()}, 9)", FAST)
    assert not r.ok and "PermissionError" in r.stderr  # and this test process is still here


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="cpu_seconds: expected a positive number, got 0"):
        Limits(cpu_seconds=0)
    with pytest.raises(TypeError, match="source: expected str, got bytes"):
        run_python(b"print(1)")  # type: ignore[arg-type]
