"""Run the cookbook's seeded learning tests N times and tally pass/fail per test.

Each repetition is one ``pytest`` process over the selected tests (so nothing is shared between
repetitions but the machine), with a JUnit report per repetition; the tally is printed as a
Markdown table and written, with every run's durations and failure messages, to ``--out``.
A test stopped by its pytest-timeout mark is tallied as "timeout", apart from "failed" (a bound
not met, an error): on a loaded machine the first says nothing about learning.

    python bench/repeat_learning_tests.py -n 10 --out /tmp/repeat.json
    python bench/repeat_learning_tests.py -n 3 tests/cookbook/test_rl.py::test_rl_sync_reward_rises

Run it from the repository root (with ``PYTHONPATH=src:backend`` for a checkout that is not
the installed one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

LEARNING_TESTS = [
    "tests/cookbook/test_rl.py::test_rl_sync_reward_rises",
    "tests/cookbook/test_rl.py::test_rl_stream_and_async_modes",
    "tests/cookbook/test_rl.py::test_same_seed_same_run",
    "tests/cookbook/test_multiplayer.py::test_guess_number_reward_rises",
    "tests/cookbook/test_multiplayer.py::test_tic_tac_toe_reward_rises",
    "tests/cookbook/test_multiplayer.py::test_twenty_questions_reward_rises",
    "tests/cookbook/test_distillation.py::test_on_policy_distillation_kl_falls",
    "tests/cookbook/test_distillation.py::test_prompt_distillation_trains_on_teacher_answers",
    "tests/cookbook/test_preference.py::test_dpo_learns_on_tiny_model",
    "tests/cookbook/test_supervised.py::test_sft_learns_and_resumes",
    "tests/cookbook/test_chat_sl.py::test_chat_sl_recipe_lowers_held_out_nll",
]


def run_once(tests: list[str], report: Path) -> None:
    """One pytest process over ``tests``; its outcome per test goes to ``report`` (JUnit XML)."""
    cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    with tempfile.TemporaryDirectory(prefix="repeat-") as tmp:
        subprocess.run([*cmd, "--basetemp", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def outcomes(report: Path) -> dict[str, tuple[str, float, str]]:
    """Per test id: ("passed" | "failed" | "timeout" | "skipped", seconds, failure message)."""
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                message = (element.get("message") or "")[:300]
                status = "skipped" if tag == "skipped" else "timeout" if "Timeout" in message else "failed"
        results[name] = (status, float(case.get("time", 0.0)), message)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10, help="repetitions")
    parser.add_argument("--out", type=Path, default=Path("repeat_learning_tests.json"))
    parser.add_argument("tests", nargs="*", default=LEARNING_TESTS)
    args = parser.parse_args()
    tally: dict[str, list[tuple[str, float, str]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="repeat-reports-") as reports:
        for i in range(args.n):
            start = time.perf_counter()
            report = Path(reports) / f"run{i}.xml"
            run_once(args.tests, report)
            for name, outcome in outcomes(report).items():
                tally[name].append(outcome)
            print(f"repetition {i + 1}/{args.n} done in {time.perf_counter() - start:.0f} s", flush=True)
            args.out.write_text(json.dumps(tally, indent=1))
    statuses = ("passed", "failed", "timeout", "skipped")
    print(f"| test | {' | '.join(statuses)} | seconds (min-max) |\n|{' --- |' * (len(statuses) + 2)}")
    for name, runs in sorted(tally.items()):
        counts = " | ".join(str(sum(r[0] == s for r in runs)) for s in statuses)
        seconds = [r[1] for r in runs]
        print(f"| `{name}` | {counts} | {min(seconds):.0f}-{max(seconds):.0f} |")
        for status, _, message in runs:
            if status == "failed":
                print(f"|   failure: {message} |")


if __name__ == "__main__":
    main()
