"""Code RL: HumanEval grading in the sandbox (against the reference solutions and an in-process
count of the asserts), the env's reward, and the recipe end to end on the tiny model."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys

import pytest

from tinker_cookbook.recipes.code_rl.env import CodeEnv
from tinker_cookbook.recipes.code_rl.tasks import extract_code, grade, grade_async, load_problems, split
from tinker_cookbook.renderers import Message, get_renderer
from tinker_cookbook.utils.plotting import read_metrics

from .conftest import TINY
from .test_recipes import REPO, run

WRONG_BODIES = ["    return None\n", "    return 0\n", "    return []\n", "    return ''\n", "    return True\n"]


def asserts_passed_in_process(problem, body: str) -> int:
    """Independent reference: run each test statement of ``check`` on its own, here, without the sandbox."""
    namespace: dict = {}
    exec(problem.prompt + body, namespace)
    module = ast.parse(problem.test)
    check = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check")
    scope = {**namespace, "candidate": namespace[problem.entry_point]}
    for node in module.body:
        if not isinstance(node, ast.FunctionDef):
            exec(ast.unparse(node), scope)
    passed = 0
    for statement in check.body:
        source = ast.unparse(statement)
        is_test = "assert" in source and "candidate" in source
        try:
            exec(source, scope)
            passed += is_test
        except Exception:
            if not is_test:
                raise
    return passed


def test_split_is_fixed_and_disjoint():
    train, test = split("train"), split("test")
    assert len(load_problems()) == 164 and len(train) == 131 and len(test) == 33
    assert {p.task_id for p in train}.isdisjoint(p.task_id for p in test)
    assert [p.task_id for p in test[:3]] == ["HumanEval/0", "HumanEval/5", "HumanEval/10"]


@pytest.mark.parametrize("index", [0, 2, 4, 7, 12, 23, 30])
def test_partial_scores_match_an_in_process_count(index):
    problem = load_problems()[index]
    for body in WRONG_BODIES:
        g = grade(problem, body)
        assert g.total == problem.num_tests > 0
        assert g.passed == asserts_passed_in_process(problem, body), (problem.task_id, body)


@pytest.mark.slow
@pytest.mark.timeout(240)  # 164 sandboxed programs, 4 at a time: 15-40 s
def test_every_reference_solution_scores_one():
    async def all_grades():
        return await asyncio.gather(*(grade_async(p, p.canonical_solution) for p in load_problems()))

    grades = asyncio.run(all_grades())
    assert [g.fraction for g in grades] == [1.0] * 164


def test_replies_as_whole_functions_bodies_or_broken_code():
    problem = load_problems()[0]
    whole = "from typing import List\n\ndef has_close_elements(numbers, threshold):\n" + problem.canonical_solution
    assert grade(problem, whole).fraction == 1.0
    assert grade(problem, problem.canonical_solution).fraction == 1.0
    broken = grade(problem, "    return (((\n")
    assert broken.fraction == 0.0 and broken.run is None  # never sent to the sandbox
    reply = f"Here it is:\n```python\n{whole}```\nDone."
    assert extract_code(reply) == whole


def test_a_printed_fake_result_does_not_count():
    problem = load_problems()[0]
    cheat = "    print('0' * 32, 99)\n    import sys\n    sys.exit(0)\n"
    assert grade(problem, cheat).fraction == 0.0


def test_code_env_rewards_the_fraction_passed(tiny_tokenizer):
    renderer = get_renderer("role_colon", tiny_tokenizer)
    problem = load_problems()[0]

    async def reward(code: str):
        env = CodeEnv(problem, renderer)
        prompt, _ = await env.initial_observation()
        assert problem.entry_point in tiny_tokenizer.decode(prompt.to_ints())
        reply = renderer.build_supervised_example([Message(role="assistant", content=f"```python\n{code}```")])[0]
        tokens = reply.to_ints()[len(renderer.build_generation_prompt([]).to_ints()):]
        return await env.step(tokens)

    right = asyncio.run(reward(problem.canonical_solution))
    assert right.reward == 1.0 and right.metrics["all_passed"] == 1.0 and right.metrics["ran"] == 1.0
    wrong = asyncio.run(reward("    return False\n"))
    assert wrong.reward == pytest.approx(asserts_passed_in_process(problem, "    return False\n") / problem.num_tests)
    assert 0 < wrong.reward < 1 and wrong.metrics["all_passed"] == 0.0


@pytest.mark.slow
@pytest.mark.timeout(180)  # a recipe subprocess: 20-60 s loaded
def test_code_rl_recipe_runs_two_steps(tmp_path):
    log_path = tmp_path / "run"
    run(["-m", "tinker_cookbook.recipes.code_rl.train", f"model_name={TINY}", "max_steps=2", "group_size=2",
         "test_size=2", "max_tokens=16", f"log_path={log_path}"])
    rows = read_metrics(log_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward/total" in r] == [0, 1]
    assert all(0.0 <= r["reward/total"] <= 1.0 for r in rows if "reward/total" in r)
    assert sum("test/env/all/passed" in r for r in rows) == 2  # before training and at the end


def test_code_rl_rejects_a_bad_key():
    result = subprocess.run([sys.executable, "-m", "tinker_cookbook.recipes.code_rl.train", "group_size=many"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "group_size" in result.stderr
