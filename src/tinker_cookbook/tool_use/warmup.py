"""A supervised warm-up before tool-use RL: teach the call format from scripted demonstrations.

A small model rarely writes ``<tool_call>`` unprompted, so every RL reward is 0 and no group
has signal. A few SFT steps on demonstrations fix that:

    system: <the tools and the call format>       user: What is 37 * 48?
    assistant: <tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48"}}</tool_call>
    user: <tool_response>\\n1776\\n</tool_response>
    assistant: 1776

:func:`demonstration` builds such a conversation by running the real tools, so it is exactly
what :class:`~tinker_cookbook.tool_use.env.ToolEnv` shows the policy. :func:`supervised_warmup`
trains on the assistant turns only, with the library SFT loop (``supervised.train``) in
``log_path/warmup``, copies its rows into ``log_path/metrics.jsonl`` as ``warmup/<key>`` at
steps ``-N .. -1`` (the RL logger keeps rows before its start step, so RL step 0 follows),
and returns the final weights for RL to start from (``rl.train.Config.load_checkpoint_path``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tinker_cookbook.checkpoint_utils import get_last_checkpoint
from tinker_cookbook.exceptions import DataError
from tinker_cookbook.renderers import Message, Renderer, TrainOnWhat
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.data import ConversationDataset
from tinker_cookbook.tool_use.format import format_tool_call, tool_response_message, tools_system_prompt
from tinker_cookbook.tool_use.tools import Tool, ToolCall, handle_tool_call
from tinker_cookbook.utils.plotting import read_metrics


async def demonstration(tools: Sequence[Tool], question: str, calls: Sequence[ToolCall], answer: str,
                        system_prompt: str = "") -> list[Message]:
    """The conversation of a policy that makes ``calls`` (one turn), reads the results, and
    answers ``answer``. A failing call raises: a demonstration must not teach errors."""
    results = [await handle_tool_call(tools, call) for call in calls]
    failed = [r.content for r in results if r.error]
    if failed:
        raise DataError(f"demonstration for {question!r}: tool call failed: {failed[0]}")
    return [
        Message(role="system", content=tools_system_prompt(list(tools), system_prompt)),
        Message(role="user", content=question),
        Message(role="assistant", content="".join(format_tool_call(c) for c in calls)),
        tool_response_message(results),
        Message(role="assistant", content=answer),
    ]


class ConversationsBuilder:
    """A ``SupervisedDatasetBuilder`` over in-memory conversations, in order, assistant turns
    trained. (Not a dataclass, so the run's ``config.json`` holds a summary, not every row.)"""

    def __init__(self, conversations: Sequence[list[Message]], batch_size: int) -> None:
        self.conversations = list(conversations)
        self.batch_size = batch_size

    def __call__(self, renderer: Renderer) -> tuple[ConversationDataset, None]:
        rows = [{"messages": c} for c in self.conversations]
        return ConversationDataset(rows, renderer, self.batch_size, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES,
                                   shuffle=False), None

    def __repr__(self) -> str:
        return f"ConversationsBuilder({len(self.conversations)} conversations, batch_size={self.batch_size})"


async def supervised_warmup(conversations: Sequence[list[Message]], log_path: str | Path, *, model_name: str,
                            batch_size: int, learning_rate: float, lora_rank: int, base_url: str | None = None,
                            seed: int | None = None) -> str:
    """``len(conversations) // batch_size`` SFT steps from a fresh LoRA; the final state path.

    Runs in ``log_path/warmup`` (so it resumes from there) and rewrites ``log_path/metrics.jsonl``
    to hold its rows as ``warmup/<key>`` at steps ``-N .. -1``; call it before the RL run starts.
    """
    warmup_path = Path(log_path) / "warmup"
    config = sl_train.Config(
        log_path=str(warmup_path),
        model_name=model_name,
        dataset_builder=ConversationsBuilder(conversations, batch_size),
        learning_rate=learning_rate,
        lr_schedule="constant",  # a few steps: no time to decay
        lora_rank=lora_rank,
        base_url=base_url,
        eval_every=0,
        save_every=0,
        seed=seed,
    )
    await sl_train.main(config)
    rows = [r for r in read_metrics(warmup_path / "metrics.jsonl") if "train_mean_nll" in r]
    n = len(rows)
    with open(Path(log_path) / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"step": r["step"] - n, **{f"warmup/{k}": v for k, v in r.items() if k != "step"}}) + "\n")
    last = get_last_checkpoint(warmup_path)
    assert last is not None, f"supervised.train.main saved no checkpoint in {warmup_path}"
    return last["state_path"]
