"""The sandboxed side of :func:`tinker_cookbook.sandbox.run_python`: confine this process, then run the program.

Started as ``python -I -S _child.py LIMITS_JSON`` with the program on stdin and the scratch
directory as the working directory. Order matters: the network namespace and the uid change
need privileges that the later steps give up, and the audit hook goes in last because it
forbids ``ctypes``, which the namespace call uses. Standard library only (``-S``: no site).
"""

import ctypes
import importlib
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
EXIT_SETUP_FAILED = 121

# Audit events a program may not raise at all: new processes, signals to others, native code.
FORBIDDEN_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata",
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "pty.spawn", "sys.remote_exec",
})
# Events whose first argument is a path that must lie inside the scratch directory.
PATH_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
    "os.truncate", "os.utime", "os.chdir", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.move",
    "shutil.copyfile", "shutil.copytree", "shutil.chown",
})
# Imported before the uid changes: the interpreter may live where that uid cannot read (/root).
PRELOADED_MODULES = (
    "abc", "array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "enum", "fractions",
    "functools", "hashlib", "heapq", "io", "itertools", "json", "math", "operator", "pathlib", "random", "re", "shutil", "socket",
    "statistics", "string", "struct", "sys", "textwrap", "threading", "time", "typing", "unicodedata", "encodings.idna",
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def unshare_network() -> bool:
    """A new, empty network namespace (only a down loopback); as non-root inside a new user namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return True
    return os.geteuid() != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def drop_privileges(uid: int) -> None:
    """As root, become an unprivileged uid of this sandbox alone, so RLIMIT_NPROC binds and signals to others fail."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def set_limits(limits: dict) -> None:
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_output_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Counted per user: the launcher's own unique uid (root) or the whole user (else), so 1 forbids any fork.
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))


def inside(path: object, scratch: str) -> bool:
    if isinstance(path, int):  # an already open descriptor
        return True
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    full = os.path.realpath(os.path.join(scratch, os.fsdecode(path)))
    return full == scratch or full.startswith(scratch + os.sep)


def install_audit_hook(scratch: str) -> None:
    def hook(event: str, args: tuple) -> None:
        if event in FORBIDDEN_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & WRITE_FLAGS)
            if writes and path is not None and not inside(path, scratch):
                raise PermissionError(f"sandbox: writing {path!r} outside the scratch directory")
        elif event in PATH_EVENTS and args and not inside(args[0], scratch):
            raise PermissionError(f"sandbox: {event} on {args[0]!r} outside the scratch directory")
        elif event == "os.rename" and len(args) > 1 and not inside(args[1], scratch):
            raise PermissionError(f"sandbox: renaming to {args[1]!r} outside the scratch directory")

    sys.addaudithook(hook)


def main() -> None:
    limits = json.loads(sys.argv[1])
    source = sys.stdin.read()
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        networkless = unshare_network()
        for name in PRELOADED_MODULES:
            importlib.import_module(name)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: die at the output limit, not EFBIG
        if limits["uid"] is not None:
            drop_privileges(limits["uid"])
        set_limits(limits)
        install_audit_hook(os.path.realpath(os.getcwd()))
    except Exception:
        traceback.print_exc()
        os._exit(EXIT_SETUP_FAILED)
    print(json.dumps({"network_namespace": networkless}), file=sys.stderr, flush=True)
    del sys.argv[1:]
    code = compile(source, "<program>", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
