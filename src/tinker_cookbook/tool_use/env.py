"""Multi-turn RL environments where the policy may call tools before it answers.

An episode of :class:`ToolEnv`::

    system: <the tools and the call format>      user: <question>
    assistant: <tool_call>{...}</tool_call>       <- step 1: the call is run
    user: <tool_response>result</tool_response>
    assistant: 42                                 <- step 2: no call, so this is the final answer

Reward (given on the last step): ``reward_fn(final_answer, history)`` plus
``valid_call_bonus`` if at least one call succeeded. The model's mistakes never raise: a
malformed ``<tool_call>``, an unknown tool, bad arguments or a failing tool send an
``Error: ...`` tool response back and the episode goes on (counted in the metrics). After
``max_turns`` assistant turns the episode ends; if the last one still called a tool there is
no answer (``out_of_turns``) and the answer reward is 0. A reply cut off by ``max_tokens``
ends the episode and is graded as the answer (``truncated``).

When a turn ends with a stop *token* (ChatML, Llama 3), the next observation is the previous
observation + the sampled tokens + the tool-response message + the assistant header, so the
whole episode trains as one sequence (see ``rl.data_processing.trajectory_to_data``).
Episode metrics (``env/all/<key>``): ``tool_calls``, ``tool_errors``, ``unknown_tools``,
``parse_errors``, ``valid_calls``, ``answered``, ``answer_reward``, ``truncated``, ``out_of_turns``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import tinker
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.renderers import Message, RenderContext, Renderer
from tinker_cookbook.rl.types import Action, Env, EnvGroupBuilder, Observation, RLDataset, StepResult
from tinker_cookbook.tool_use.format import (
    ToolCallParseError,
    final_answer_text,
    parse_tool_calls,
    tool_response_message,
    tools_system_prompt,
)
from tinker_cookbook.tool_use.tools import Tool, ToolCall, ToolResult, handle_tool_call

RewardFn = Callable[[str, list[Message]], float]
"""``(final answer text, conversation so far) -> reward``."""


@dataclass(frozen=True)
class ToolEnvConfig:
    system_prompt: str = ""
    """Text before the tool list in the system prompt."""
    max_turns: int = 3
    """Assistant turns per episode (tool-calling turns plus the answer)."""
    valid_call_bonus: float = 0.0
    """Added to the reward when at least one tool call succeeded (a format bonus)."""


class ToolEnv(Env):
    """One question, answered with the help of ``tools``; see the module docstring."""

    def __init__(self, tools: Sequence[Tool], renderer: Renderer, question: str, reward_fn: RewardFn,
                 config: ToolEnvConfig = ToolEnvConfig()) -> None:
        self.tools = {t.name: t for t in tools}
        self.renderer = renderer
        self.reward_fn = reward_fn
        self.config = config
        self.messages: list[Message] = [
            Message(role="system", content=tools_system_prompt(list(tools), config.system_prompt)),
            Message(role="user", content=question),
        ]
        self.turns = 0
        self.counts = dict.fromkeys(
            ("tool_calls", "tool_errors", "unknown_tools", "parse_errors", "valid_calls", "truncated"), 0.0
        )
        self._ob: list[int] = []

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        ob = self.renderer.build_generation_prompt(self.messages)
        self._ob = ob.to_ints()
        return ob, self.renderer.get_stop_sequences()

    async def step(self, action: Action) -> StepResult:
        self.turns += 1
        reply, clean = self.renderer.parse_response(action)
        text = reply["content"]
        self.messages.append(Message(role="assistant", content=text))
        calls = parse_tool_calls(text)
        if not clean:
            self.counts["truncated"] = 1.0
            return self._finish(final_answer_text(text))
        if not calls:
            return self._finish(final_answer_text(text))
        results = [await self._run(call) for call in calls]
        if self.turns >= self.config.max_turns:
            return self._finish(None)
        response = tool_response_message(results)
        self.messages.append(response)
        ob = self._next_observation(action, response)
        return StepResult(0.0, False, ob, self.renderer.get_stop_sequences(), self._metrics(answered=False))

    async def _run(self, call: ToolCall | ToolCallParseError) -> ToolResult | ToolCallParseError:
        if isinstance(call, ToolCallParseError):
            self.counts["parse_errors"] += 1
            return call
        self.counts["tool_calls"] += 1
        if call.name not in self.tools:
            self.counts["unknown_tools"] += 1
        result = await handle_tool_call(self.tools, call)
        self.counts["tool_errors" if result.error else "valid_calls"] += 1
        return result

    def _finish(self, answer: str | None) -> StepResult:
        answer_reward = float(self.reward_fn(answer, self.messages)) if answer is not None else 0.0
        bonus = self.config.valid_call_bonus * float(self.counts["valid_calls"] > 0)
        metrics = self._metrics(answered=answer is not None)
        metrics["answer_reward"] = answer_reward
        metrics["out_of_turns"] = float(answer is None)
        return StepResult(answer_reward + bonus, True, tinker.ModelInput.empty(), [], metrics)

    def _metrics(self, answered: bool) -> dict[str, float]:
        return {**self.counts, "answered": float(answered)}

    def _next_observation(self, action: Action, new_message: Message) -> tinker.ModelInput:
        """Extend the last observation with the sampled tokens, ``new_message`` and the next
        assistant header when the reply ended at a stop token; otherwise re-render it all."""
        stop = self.renderer.get_stop_sequences()
        if action and stop and all(isinstance(s, int) for s in stop) and action[-1] in stop:
            index = len(self.renderer.preprocess(list(self.messages))) - 1  # preprocess may add a system prompt
            message = self.renderer.render_message(new_message, RenderContext(index, False, index))
            header = self.renderer.render_message(Message(role="assistant", content=""), RenderContext(index + 1, True, index))
            tokens = self._ob + list(action) + message.header + message.output + header.header
        else:
            tokens = self.renderer.build_generation_prompt(self.messages).to_ints()
        self._ob = tokens
        return tinker.ModelInput.from_ints(tokens)


def build_tool_env(tools: Sequence[Tool], renderer: Renderer, reward_fn: RewardFn, question: str,
                   config: ToolEnvConfig = ToolEnvConfig()) -> ToolEnv:
    """A :class:`ToolEnv` asking ``question`` with ``tools`` available."""
    return ToolEnv(tools, renderer, question, reward_fn, config)


@dataclass(frozen=True)
class ToolTask:
    """A question and the reward function that grades its answer (e.g. a ``partial`` of a
    grader with the reference answer bound)."""

    question: str
    reward_fn: RewardFn


@dataclass(frozen=True)
class ToolGroupBuilder(EnvGroupBuilder):
    """``num_envs`` attempts at one task."""

    env_thunk: Callable[[], ToolEnv]
    num_envs: int
    dataset_name: str = "tool_use"

    async def make_envs(self) -> Sequence[Env]:
        return [self.env_thunk() for _ in range(self.num_envs)]

    def logging_tags(self) -> list[str]:
        return [self.dataset_name]


class ToolDataset(RLDataset):
    """``batch_size`` tasks per batch, each attempted ``group_size`` times with ``tools``."""

    def __init__(self, tasks: Sequence[ToolTask], tools: Sequence[Tool], renderer: Renderer, batch_size: int,
                 group_size: int, config: ToolEnvConfig = ToolEnvConfig(), name: str = "tool_use") -> None:
        self.tasks = list(tasks)
        self.tools = list(tools)
        self.renderer = renderer
        self.batch_size = batch_size
        self.group_size = group_size
        self.config = config
        self.name = name

    def __len__(self) -> int:
        return len(self.tasks) // self.batch_size

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        batch = self.tasks[index * self.batch_size : (index + 1) * self.batch_size]
        return [
            ToolGroupBuilder(
                partial(build_tool_env, self.tools, self.renderer, task.reward_fn, task.question, self.config),
                self.group_size,
                self.name,
            )
            for task in batch
        ]
