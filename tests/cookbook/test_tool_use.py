"""Tool use: schemas from signatures, argument validation, the ``<tool_call>`` parser, ``ToolEnv``
driven by a scripted policy through whole episodes, the supervised warm-up (datums, falling
NLL), and the calculator recipe for 2 warm-up + 2 RL steps."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import pytest

from tinker_cookbook.completers import TokensWithLogprobs
from tinker_cookbook.recipes.tool_use import (
    CalculatorDatasetBuilder,
    CLIConfig,
    calculator,
    dataset_builder,
    grade,
)
from tinker_cookbook.renderers import RenderContext, TrainOnWhat, get_renderer
from tinker_cookbook.rl.data_processing import trajectory_to_data
from tinker_cookbook.rl.rollouts import do_group_rollout, do_single_rollout
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.tool_use import (
    ToolCall,
    ToolCallParseError,
    ToolDataset,
    ToolEnvConfig,
    ToolResult,
    ToolTask,
    build_tool_env,
    demonstration,
    format_tool_call,
    handle_tool_call,
    parse_tool_calls,
    supervised_warmup,
    tool,
    validate_arguments,
)
from tinker_cookbook.utils.plotting import read_metrics

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]


@tool
def power(
    base: Annotated[int, "the base"],
    exponent: Annotated[float, "the exponent"] = 2.0,
    mode: Literal["exact", "round"] = "exact",
    tags: list[str] | None = None,
    verbose: bool = False,
) -> float:
    """Raise a number to a power."""
    value = base**exponent
    return round(value) if mode == "round" else value


@tool(name="lookup")
async def async_lookup(key: str) -> str:
    """Look a key up."""
    await asyncio.sleep(0)
    if key == "boom":
        raise KeyError(key)
    return key.upper()


# --- schemas and validation -------------------------------------------------------------------


def test_schema_from_signature():
    assert power.name == "power" and power.description == "Raise a number to a power."
    assert power.parameters == {
        "type": "object",
        "properties": {
            "base": {"type": "integer", "description": "the base"},
            "exponent": {"type": "number", "description": "the exponent", "default": 2.0},
            "mode": {"enum": ["exact", "round"], "default": "exact"},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None},
            "verbose": {"type": "boolean", "default": False},
        },
        "required": ["base"],
        "additionalProperties": False,
    }
    assert async_lookup.name == "lookup" and async_lookup.parameters["required"] == ["key"]
    assert power(3) == 9.0  # still callable as the function


def test_unsupported_hints_fail_at_decoration():
    with pytest.raises(TypeError, match=r"f\.x: unsupported type hint"):
        @tool
        def f(x: dict) -> None: ...

    with pytest.raises(TypeError, match="needs a type hint"):
        @tool
        def g(x) -> None: ...


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "argument 'base': required, missing (expected integer)"),
        ({"base": "3"}, "argument 'base': expected integer, got string \"3\""),
        ({"base": True}, "argument 'base': expected integer, got boolean true"),
        ({"base": 3, "exponent": "x"}, "argument 'exponent': expected number, got string \"x\""),
        ({"base": 3, "mode": "fast"}, "argument 'mode': expected one of ['exact', 'round'], got string \"fast\""),
        ({"base": 3, "tags": ["a", 1]}, "argument 'tags': expected array of string or null, got array [\"a\", 1]"),
        ({"base": 3, "power": 2}, "argument 'power': unexpected; expected one of"),
        ([3], "arguments: expected an object, got array [3]"),
    ],
)
def test_validation_names_argument_expected_and_got(arguments, message):
    problem = validate_arguments(power.parameters, arguments)
    assert problem is not None and problem.startswith(message), problem


def test_valid_arguments_pass():
    assert validate_arguments(power.parameters, {"base": 3, "exponent": 1, "tags": None, "verbose": True}) is None
    assert validate_arguments(power.parameters, {"base": 3, "tags": ["a"], "mode": "round"}) is None


def test_handle_tool_call_returns_errors_instead_of_raising():
    tools = [power, async_lookup, calculator]

    def run(name, **arguments):
        return asyncio.run(handle_tool_call(tools, ToolCall(name, arguments)))

    assert run("power", base=3) == ToolResult("9.0")
    assert run("lookup", key="hi") == ToolResult("HI")  # async tool
    assert run("calculator", expression="37 * (48 + 2)") == ToolResult("1850")
    assert run("calculator", expression="7 / 2") == ToolResult("3.5")
    unknown = run("search", q="x")
    assert unknown.error and "unknown tool 'search'; available: calculator, lookup, power" in unknown.content
    bad = run("power", base="3")
    assert bad.error and bad.content == "power: argument 'base': expected integer, got string \"3\""
    crashed = run("lookup", key="boom")
    assert crashed.error and crashed.content == "lookup: KeyError: 'boom'"
    unsafe = run("calculator", expression="__import__('os')")
    assert unsafe.error and "unsupported expression element" in unsafe.content
    assert run("calculator", expression="1 / 0").error


# --- the text format --------------------------------------------------------------------------


def test_parse_good_calls():
    text = ('Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>\n'
            '<tool_call> {"name": "lookup", "arguments": "{\\"key\\": \\"a\\"}"} </tool_call>'
            '<tool_call>{"name": "now"}</tool_call>')
    assert parse_tool_calls(text) == [
        ToolCall("calculator", {"expression": "2*3"}), ToolCall("lookup", {"key": "a"}), ToolCall("now", {})
    ]
    assert parse_tool_calls("The answer is 6.") == []
    call = ToolCall("calculator", {"expression": "1+1"})
    assert parse_tool_calls(format_tool_call(call)) == [call]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('<tool_call>{"name": "calculator", "arguments": {</tool_call>', "tool call is not valid JSON"),
        ("<tool_call>[1, 2]</tool_call>", "tool call: expected a JSON object, got list"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'tool call: expected a string "name"'),
        ('<tool_call>{"name": "c", "arguments": [1]}</tool_call>', "tool call 'c': expected an object \"arguments\", got list"),
        ('<tool_call>{"name": "c", "arguments": {}}', "<tool_call> without a closing </tool_call>"),
    ],
)
def test_parse_malformed_calls(text, message):
    [parsed] = parse_tool_calls(text)
    assert isinstance(parsed, ToolCallParseError) and parsed.message.startswith(message), parsed


# --- ToolEnv with a scripted policy -----------------------------------------------------------


class ScriptedPolicy:
    """Replies with the next of a fixed list of texts, tokenized and ended with ``<|im_end|>``
    (or cut off without it when the text starts with ``CUT:``)."""

    def __init__(self, renderer, replies: list[str]) -> None:
        self.renderer, self.replies = renderer, list(replies)
        self.prompts: list[list[int]] = []

    async def __call__(self, model_input, stop):
        self.prompts.append(model_input.to_ints())
        text = self.replies.pop(0)
        tokens = self.renderer.encode(text.removeprefix("CUT:"))
        if not text.startswith("CUT:"):
            tokens.append(stop[0])
        return TokensWithLogprobs(tokens, [-1.0] * len(tokens))


def reference_grader(reference: str):
    return partial(grade, reference)


@pytest.fixture
def renderer(tiny_tokenizer):
    return get_renderer("chatml", tiny_tokenizer)


def episode(renderer, replies: list[str], **config):
    env = build_tool_env([calculator], renderer, reference_grader("1776"), "What is 37 * 48?",
                         ToolEnvConfig("Be brief.", **({"valid_call_bonus": 0.1} | config)))
    policy = ScriptedPolicy(renderer, replies)
    trajectory = asyncio.run(do_single_rollout(policy, env))  # type: ignore[arg-type]
    return env, policy, trajectory


CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48"}}</tool_call>'


def test_episode_tool_call_then_answer(renderer, tiny_tokenizer):
    env, policy, trajectory = episode(renderer, [CALL, "1776"])
    assert "<tools>" in tiny_tokenizer.decode(policy.prompts[0]) and "Be brief." in tiny_tokenizer.decode(policy.prompts[0])
    second = tiny_tokenizer.decode(policy.prompts[1])
    assert second.endswith("<|im_start|>user\n<tool_response>\n1776\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # The spliced observation equals the conversation rendered from scratch, and extends the
    # previous observation + action, so the episode trains as one datum.
    assert policy.prompts[1] == renderer.build_generation_prompt(env.messages[:-1]).to_ints()
    data, masks = trajectory_to_data(trajectory, advantage=1.0)
    assert len(data) == 1 and masks[0].sum() == sum(len(t.ac.tokens) for t in trajectory.transitions)
    assert [t.reward for t in trajectory.transitions] == [0.0, pytest.approx(1.1)]
    metrics = trajectory.transitions[-1].metrics
    assert metrics["tool_calls"] == 1 and metrics["valid_calls"] == 1 and metrics["answer_reward"] == 1.0
    assert metrics["parse_errors"] == 0 and metrics["answered"] == 1 and metrics["out_of_turns"] == 0
    assert [m["role"] for m in env.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_answer_without_tool_gets_no_bonus(renderer):
    _, _, trajectory = episode(renderer, ["It is 1776."])
    assert len(trajectory.transitions) == 1 and trajectory.transitions[0].reward == 1.0
    _, _, trajectory = episode(renderer, ["1700"])
    assert trajectory.transitions[0].reward == 0.0


def test_errors_are_fed_back_and_counted(renderer, tiny_tokenizer):
    replies = [
        '<tool_call>{"name": "search", "arguments": {"q": "37*48"}}</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>',
        '<tool_call>{"name": "calculator", "arguments": {"expr": "37*48"}}</tool_call>',
        "1776",
    ]
    _, policy, trajectory = episode(renderer, replies, max_turns=4)
    observations = [tiny_tokenizer.decode(p) for p in policy.prompts]
    assert "Error: unknown tool 'search'; available: calculator" in observations[1]
    assert "Error: tool call is not valid JSON" in observations[2]
    assert "Error: calculator: argument 'expression': required, missing" in observations[3]
    metrics = trajectory.transitions[-1].metrics
    assert (metrics["tool_calls"], metrics["unknown_tools"], metrics["parse_errors"], metrics["tool_errors"]) == (2, 1, 1, 2)
    assert metrics["valid_calls"] == 0
    assert trajectory.transitions[-1].reward == 1.0  # correct, but no valid call: no bonus


def test_max_turns_and_truncation_end_the_episode(renderer):
    _, policy, trajectory = episode(renderer, [CALL, CALL, CALL], max_turns=2)
    assert len(trajectory.transitions) == 2 and policy.replies == [CALL]
    metrics = trajectory.transitions[-1].metrics
    assert metrics["out_of_turns"] == 1 and metrics["answered"] == 0 and metrics["valid_calls"] == 2
    assert trajectory.transitions[-1].reward == pytest.approx(0.1)  # only the bonus
    _, _, trajectory = episode(renderer, ['CUT:<tool_call>{"name": "calc'])
    metrics = trajectory.transitions[-1].metrics
    assert len(trajectory.transitions) == 1 and metrics["truncated"] == 1 and metrics["tool_calls"] == 0


def test_dataset_groups(renderer):
    tasks = [ToolTask(f"What is {i} + 1?", reference_grader(str(i + 1))) for i in range(4)]
    dataset = ToolDataset(tasks, [calculator], renderer, batch_size=2, group_size=3, name="sums")
    assert len(dataset) == 2
    [first, _] = dataset.get_batch(1)
    policy = ScriptedPolicy(renderer, ["3", "4", "x"])
    group = asyncio.run(do_group_rollout(first, policy))  # type: ignore[arg-type]
    assert group.tags == ["sums"] and sorted(group.get_total_rewards()) == [0.0, 0.0, 1.0]


# --- the supervised warm-up -----------------------------------------------------------------


def test_demonstration_matches_what_the_env_shows(renderer):
    messages = asyncio.run(demonstration([calculator], "What is 37 * 48?", [ToolCall("calculator", {"expression": "37 * 48"})],
                                         "1776", "Be brief."))
    env, _, _ = episode(renderer, [CALL, "1776"])
    assert messages == env.messages  # the scripted episode, message for message
    with pytest.raises(ValueError, match="tool call failed: calculator: ZeroDivisionError"):
        asyncio.run(demonstration([calculator], "?", [ToolCall("calculator", {"expression": "1 / 0"})], "0"))


def test_warmup_datum_trains_only_the_assistant_turns(renderer, tiny_tokenizer):
    [problem] = dataset_builder(CLIConfig(test_size=0, warmup_steps=1, warmup_batch_size=1)).splits()[1]
    messages = asyncio.run(problem.demonstration())
    datum = conversation_to_datum(messages, renderer, None, TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    tokens = datum.model_input.to_ints() + datum.loss_fn_inputs["target_tokens"].tolist()[-1:]
    weights = [0.0, *datum.loss_fn_inputs["weights"].tolist()]  # weight i is for token i (the first is never a target)
    # The expected mask, message by message from the renderer: only assistant outputs are trained.
    expected = [0.0] * len(renderer.bos_tokens())
    for i, message in enumerate(messages):
        rendered = renderer.render_message(message, RenderContext(i, i == len(messages) - 1, 3))
        expected += [0.0] * len(rendered.header) + [float(message["role"] == "assistant")] * len(rendered.output)
    assert weights == expected
    trained = tiny_tokenizer.decode([t for t, w in zip(tokens, weights, strict=True) if w])
    call = format_tool_call(ToolCall("calculator", {"expression": problem.expression}))
    assert trained.replace("\n", "") == f"{call}<|im_end|>{problem.answer}<|im_end|>"
    assert problem.answer == str(calculator(problem.expression))


def test_splits_are_disjoint():
    builder = CalculatorDatasetBuilder(batch_size=4, group_size=2, n_batches=25, test_size=50, warmup_size=300, max_operand=30)
    test, warmup, rl = builder.splits()
    assert (len(test), len(warmup), len(rl)) == (50, 300, 100)
    assert len({p.question for p in test + warmup + rl}) == 450
    bigger = CalculatorDatasetBuilder(batch_size=4, group_size=2, n_batches=50, test_size=50, warmup_size=10, max_operand=30)
    assert bigger.splits()[0] == test  # the held-out set does not move with the other sizes
    with pytest.raises(ValueError, match="only 841 distinct"):
        CalculatorDatasetBuilder(4, 2, 250, test_size=0, warmup_size=0, max_operand=30).splits()


def test_warmup_nll_falls(tmp_path, embedded):
    problems = dataset_builder(CLIConfig(test_size=0, warmup_steps=6, warmup_batch_size=4)).splits()[1]
    conversations = [asyncio.run(p.demonstration()) for p in problems]  # 24 distinct questions
    state_path = asyncio.run(supervised_warmup(conversations, tmp_path, model_name=TINY, batch_size=4,
                                               learning_rate=1e-2, lora_rank=8, seed=0))
    assert state_path.startswith("tinker://")
    nll = [r["warmup/train_mean_nll"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [-6, -5, -4, -3, -2, -1]
    assert nll[-1] < nll[0] - 1.0, nll


# --- the recipe -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)  # a recipe subprocess: SFT warm-up then two RL steps
def test_recipe_runs_warmup_then_two_rl_steps(tmp_path):
    log_path = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TINKER_BASE_URL"}
    args = ["-m", "tinker_cookbook.recipes.tool_use", f"model_name={TINY}", "max_steps=2", f"log_path={log_path}",
            "batch_size=2", "group_size=4", "max_tokens=24", "max_turns=2", "test_size=2", "eval_every=0",
            "warmup_steps=2", "warmup_batch_size=2"]
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warmup = [r for r in read_metrics(log_path / "metrics.jsonl") if "warmup/train_mean_nll" in r]
    assert [r["step"] for r in warmup] == [-2, -1]
    rows = [r for r in read_metrics(log_path / "metrics.jsonl") if "reward/total" in r]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:  # per-episode counts, averaged
        assert 0 <= row["env/all/valid_calls"] <= row["env/all/tool_calls"]
        assert row["env/all/parse_errors"] >= 0 and 1 <= row["env/all/turns"] <= 2  # max_turns=2
    tests = [r["test/reward/total"] for r in read_metrics(log_path / "metrics.jsonl") if "test/reward/total" in r]
    assert tests and all(-0.01 <= t <= 1.1 + 1e-9 for t in tests)
