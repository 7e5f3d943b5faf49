"""RL with a calculator tool on generated arithmetic, on the library loop (``rl.train``).

Each episode asks "What is 37 * 48?". The policy may call the ``calculator`` tool with
``<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48"}}</tool_call>``;
the result comes back as a ``<tool_response>`` user message and the episode goes on, for up
to ``max_turns`` assistant turns (see ``tool_use/env.py``). A reply without a tool call is
the final answer.

Reward: ``1`` if the final answer's last number equals the result, plus ``format_bonus``
(default 0.1) if at least one tool call parsed, named a known tool, had valid arguments and
ran without error; so a correct answer with a valid call scores 1.1, a correct answer
without one 1.0, a valid call and a wrong (or no) answer 0.1. GRPO advantages within each
group of ``group_size`` attempts. ``metrics.jsonl`` has ``reward/total`` and per-episode
means ``env/all/tool_calls``, ``valid_calls``, ``tool_errors``, ``unknown_tools``,
``parse_errors``, ``answer_reward``, ``out_of_turns`` and ``turns``.

Warm-up: SmolLM2-135M never writes ``<tool_call>`` on its own, so every reward is 0 and RL
has no signal. So RL starts from ``warmup_steps`` SFT steps on demonstrations (call the
calculator, read its ``<tool_response>``, answer with the result; trained on the assistant
turns only; see ``tool_use/warmup.py``), logged as ``warmup/train_mean_nll`` at steps
``-warmup_steps .. -1`` of the same ``metrics.jsonl``. Test, warm-up and RL questions are
disjoint draws (``arithmetic_problems``); the test set (``test_size``) is held out.

    python -m tinker_cookbook.recipes.tool_use
    python -m tinker_cookbook.recipes.tool_use model_name=tiny-llama max_steps=2 log_path=/tmp/tool_use

Measured on SmolLM2-135M-Instruct, CPU (2 cores, shared; 10 min), with
``warmup_steps=2 warmup_batch_size=4 max_steps=8 batch_size=2 group_size=8 test_size=8 eval_every=8``:
warm-up NLL 0.855 -> 0.270; RL ``reward/total`` by step 0.02, 0.09, 0.16, 0.36, 0.77, 0.98,
0.76, 0.96 with ``env/all/tool_calls`` 0.19 -> 0.88; held-out ``test/reward/total`` 0.0 before
RL, 1.1 (all 8 correct, each with a valid call) after. A longer warm-up (8 steps of 4: NLL
0.855 -> 0.0007) solves the task by itself (reward 1.1 from RL step 0), which leaves RL no signal.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from tinker_cookbook.checkpoint_utils import get_last_checkpoint
from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.recipes.math_rl.math_grading import grade_answer
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl import train
from tinker_cookbook.tool_use import (
    ToolCall,
    ToolDataset,
    ToolEnvConfig,
    ToolTask,
    demonstration,
    supervised_warmup,
    tool,
)
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir

SYSTEM_PROMPT = "You are a careful assistant. Use the calculator for arithmetic, then reply with only the final number."

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression element {ast.dump(node)[:40]!r}; use numbers, + - * / // % and ()")


@tool
def calculator(expression: Annotated[str, "an arithmetic expression, e.g. '37 * (48 + 2)'"]) -> str:
    """Evaluate an arithmetic expression with + - * / // % and parentheses."""
    value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    return str(int(value)) if float(value).is_integer() else str(round(value, 6))


def grade(reference: str, answer: str, history: list[Message]) -> float:
    """1 if the last number of ``answer`` equals ``reference``."""
    return float(grade_answer(answer, reference))


@dataclass(frozen=True)
class Problem:
    question: str
    expression: str
    answer: str

    def task(self) -> ToolTask:
        return ToolTask(self.question, partial(grade, self.answer))

    async def demonstration(self) -> list[Message]:
        """The warm-up conversation: call the calculator, then answer with its result."""
        call = ToolCall("calculator", {"expression": self.expression})
        return await demonstration([calculator], self.question, [call], self.answer, SYSTEM_PROMPT)


def arithmetic_problems(sizes: Sequence[int], seed: int, ops: str, max_operand: int) -> list[list[Problem]]:
    """Distinct questions "What is a <op> b?" (``op`` from ``ops``), split into lists of ``sizes``:
    no question is in two lists, and each list stays the same when later sizes change."""
    capacity = len(set(ops)) * (max_operand - 1) ** 2
    if sum(sizes) > capacity:
        raise ConfigurationError(f"sizes: {sum(sizes)} questions asked for, but ops={ops!r} and "
                                 f"max_operand={max_operand} give only {capacity} distinct ones")
    rng = random.Random(seed)
    drawn: dict[tuple[int, str, int], None] = {}  # insertion-ordered set
    while len(drawn) < sum(sizes):
        drawn.setdefault((rng.randint(2, max_operand), rng.choice(ops), rng.randint(2, max_operand)), None)
    problems = [
        Problem(f"What is {a} {op} {b}?", f"{a} {op} {b}", str({"+": a + b, "-": a - b, "*": a * b}[op]))
        for a, op, b in drawn
    ]
    bounds = list(itertools.accumulate(sizes, initial=0))
    return [problems[lo:hi] for lo, hi in itertools.pairwise(bounds)]


@dataclass
class CalculatorDatasetBuilder:
    """RL questions, disjoint from the held-out test questions and the warm-up's."""

    batch_size: int
    group_size: int
    n_batches: int
    test_size: int = 0
    warmup_size: int = 0
    ops: str = "*"
    max_operand: int = 99
    max_turns: int = 3
    format_bonus: float = 0.1
    seed: int = 0

    def splits(self) -> tuple[list[Problem], list[Problem], list[Problem]]:
        """(test, warm-up, RL) problems."""
        test, warmup, rl = arithmetic_problems(
            [self.test_size, self.warmup_size, self.batch_size * self.n_batches], self.seed, self.ops, self.max_operand
        )
        return test, warmup, rl

    def __call__(self, renderer: Renderer) -> tuple[ToolDataset, ToolDataset | None]:
        config = ToolEnvConfig(SYSTEM_PROMPT, self.max_turns, self.format_bonus)
        test, _, rl = self.splits()
        train_set = ToolDataset([p.task() for p in rl], [calculator], renderer, self.batch_size, self.group_size,
                                config, "calculator")
        test_set = None
        if test:
            test_set = ToolDataset([p.task() for p in test], [calculator], renderer, len(test), 1, config, "calculator")
        return train_set, test_set


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/tool_use"
    max_steps: int = 12
    batch_size: int = 4
    group_size: int = 8
    test_size: int = 16  # held-out questions, answered greedily before steps 0, eval_every, ... and at the end
    ops: str = "*"  # operators to draw questions from, any of "+-*"
    max_operand: int = 99
    max_turns: int = 3
    max_tokens: int = 48  # per assistant turn
    format_bonus: float = 0.1
    learning_rate: float = 4e-4
    lora_rank: int = 16
    eval_every: int = 6
    warmup_steps: int = 2  # SFT steps on demonstrations before RL (0: none); ~8 of 4 already solve the task
    warmup_batch_size: int = 4
    warmup_learning_rate: float = 1e-3
    seed: int = 0
    base_url: str | None = None
    if_exists: IfExists = "raise"


def dataset_builder(cli: CLIConfig) -> CalculatorDatasetBuilder:
    return CalculatorDatasetBuilder(
        cli.batch_size, cli.group_size, cli.max_steps, cli.test_size, cli.warmup_steps * cli.warmup_batch_size,
        cli.ops, cli.max_operand, cli.max_turns, cli.format_bonus, cli.seed,
    )


def build_config(cli: CLIConfig, load_checkpoint_path: str | None = None) -> train.Config:
    return train.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        dataset_builder=dataset_builder(cli),
        learning_rate=cli.learning_rate,
        max_tokens=cli.max_tokens,
        remove_constant_reward_groups=True,  # groups where all attempts tie carry no signal
        lora_rank=cli.lora_rank,
        max_steps=cli.max_steps,
        eval_every=cli.eval_every,
        save_every=0,
        base_url=cli.base_url,
        load_checkpoint_path=load_checkpoint_path,
        seed=cli.seed,
    )


async def main(cli: CLIConfig) -> None:
    """The warm-up (skipped when the RL run resumes from its own checkpoint), then RL from its weights."""
    load_checkpoint_path = None
    if cli.warmup_steps > 0 and get_last_checkpoint(cli.log_path) is None:
        _, warmup, _ = dataset_builder(cli).splits()
        conversations = [await p.demonstration() for p in warmup]
        load_checkpoint_path = await supervised_warmup(
            conversations, cli.log_path, model_name=cli.model_name, batch_size=cli.warmup_batch_size,
            learning_rate=cli.warmup_learning_rate, lora_rank=cli.lora_rank, base_url=cli.base_url, seed=cli.seed,
        )
    await train.main(build_config(cli, load_checkpoint_path))


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(main(cli))
