"""Run untrusted Python (a model's code) in a confined child process; see :mod:`.runner`."""

from tinker_cookbook.sandbox.runner import Limits, RunResult, run_python, run_python_async

__all__ = ["Limits", "RunResult", "run_python", "run_python_async"]
