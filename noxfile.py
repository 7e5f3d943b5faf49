"""Sessions: tests (the default suite), lint, typecheck, bench.

Each session installs the CPU torch wheel first (``torch==2.13.0``) so that pip never
resolves a multi-GB CUDA build on a CPU machine.
"""

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
TORCH = "torch==2.13.0"


def install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    install(session)
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "backend", "tests", "bench", "examples")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    install(session)
    session.run("mypy", "src/tinker")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    install(session)
    session.run("python", "bench/bench_roundtrip.py", *session.posargs)
    session.run("python", "bench/bench_training.py", *session.posargs)
