"""An RL actor loop: many actors sample from the latest policy while one learner trains.

``actors`` asyncio tasks each loop forever: take the newest sampler, draw a sum ("What is
7 + 12?"), sample ``group_size`` answers in one call, score them (1 for the right number,
0.1 for any number), and queue the group with GRPO advantages. The learner takes
``groups_per_step`` queued groups (dropping any sampled more than ``max_staleness`` policy
versions ago), submits ``forward_backward`` + ``optim_step`` and the next sampler snapshot
without waiting, points the actors at that snapshot, and only then collects the previous
step's results. Nothing waits unless the backend is busy; the end prints throughput.

    python examples/rl_actor_loop.py
    python examples/rl_actor_loop.py model_name=tiny-llama steps=3 actors=4
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import numpy as np

import tinker
from tinker_cookbook.completers import TokensWithLogprobs
from tinker_cookbook.recipes.math_rl.envs import ARITHMETIC_SYSTEM, arithmetic_problem
from tinker_cookbook.recipes.math_rl.math_grading import extract_final_number, grade_answer
from tinker_cookbook.renderers import Renderer, get_recommended_renderer_name, get_renderer
from tinker_cookbook.rl.data_processing import trajectory_to_data
from tinker_cookbook.rl.types import Trajectory, Transition
from tinker_cookbook.utils.cli import parse_cli


@dataclass
class Config:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    steps: int = 10
    actors: int = 8
    group_size: int = 8
    groups_per_step: int = 4
    max_tokens: int = 8
    max_staleness: int = 2
    learning_rate: float = 4e-4
    lora_rank: int = 16
    base_url: str | None = None


@dataclass
class Group:
    version: int  # the policy version (learner step) that sampled it
    data: list[tinker.Datum]
    rewards: list[float]
    sampled_tokens: int


@dataclass
class Stats:
    start: float = field(default_factory=time.perf_counter)
    samples: int = 0
    sampled_tokens: int = 0
    trained_tokens: int = 0
    dropped: int = 0
    staleness: list[int] = field(default_factory=list)


class LatestPolicy:
    """The newest sampler; the learner swaps it, actors read it before each group."""

    def __init__(self, sampler: tinker.SamplingClient) -> None:
        self.sampler, self.version = sampler, 0

    def update(self, sampler: tinker.SamplingClient, version: int) -> None:
        self.sampler, self.version = sampler, version


def reward(reply: str, answer: str) -> float:
    return 1.0 if grade_answer(reply, answer) else 0.1 if extract_final_number(reply) is not None else 0.0


async def actor(seed: int, policy: LatestPolicy, renderer: Renderer, queue: asyncio.Queue[Group],
                config: Config, stats: Stats) -> None:
    rng = random.Random(seed)
    params = tinker.SamplingParams(max_tokens=config.max_tokens, stop=renderer.get_stop_sequences())
    while True:
        sampler, version = policy.sampler, policy.version
        question, answer = arithmetic_problem(rng, 20)
        prompt = renderer.build_generation_prompt(
            [{"role": "system", "content": ARITHMETIC_SYSTEM}, {"role": "user", "content": question}]
        )
        response = await sampler.sample(prompt, config.group_size, params)
        rewards = [reward(renderer.parse_response(s.tokens)[0]["content"], answer) for s in response.sequences]
        advantages = np.asarray(rewards) - np.mean(rewards)
        data: list[tinker.Datum] = []
        for seq, advantage in zip(response.sequences, advantages, strict=True):
            if advantage:
                transition = Transition(prompt, TokensWithLogprobs(seq.tokens, seq.logprobs), 0.0, True)
                data += trajectory_to_data(Trajectory([transition], tinker.ModelInput.empty()), float(advantage))[0]
        tokens = sum(len(s.tokens) for s in response.sequences)
        stats.samples += len(response.sequences)
        stats.sampled_tokens += tokens
        await queue.put(Group(version, data, rewards, tokens))


async def learner(training_client: tinker.TrainingClient, policy: LatestPolicy, queue: asyncio.Queue[Group],
                  config: Config, stats: Stats) -> None:
    pending = None
    for step in range(config.steps):
        groups: list[Group] = []
        while len(groups) < config.groups_per_step:
            group = await queue.get()
            if step - group.version > config.max_staleness:
                stats.dropped += 1
                continue
            groups.append(group)
            stats.staleness.append(step - group.version)
        data = [d for g in groups for d in g.data]
        fwd_bwd = training_client.forward_backward(data, "importance_sampling") if data else None
        optim = training_client.optim_step(tinker.AdamParams(learning_rate=config.learning_rate)) if data else None
        # Ordered after the optim_step: actors switch now and their calls wait for the new weights.
        policy.update(training_client.save_weights_and_get_sampling_client(), step + 1)
        if pending is not None:
            await finish(*pending, stats)
        pending = (step, fwd_bwd, optim, groups)
    if pending is not None:
        await finish(*pending, stats)


async def finish(step: int, fwd_bwd, optim, groups: list[Group], stats: Stats) -> None:
    if fwd_bwd is not None:
        await fwd_bwd
        await optim
    trained = sum(d.model_input.length for g in groups for d in g.data)
    stats.trained_tokens += trained
    mean_reward = float(np.mean([r for g in groups for r in g.rewards]))
    elapsed = time.perf_counter() - stats.start
    print(f"step {step}: reward {mean_reward:.3f}, trained {trained} tokens, "
          f"staleness {np.mean([step - g.version for g in groups]):.2f}, {elapsed:.1f}s", flush=True)


async def main(config: Config) -> Stats:
    service = tinker.ServiceClient(base_url=config.base_url)
    training_client = await service.create_lora_training_client(config.model_name, rank=config.lora_rank)
    renderer = get_renderer(get_recommended_renderer_name(config.model_name), training_client.get_tokenizer())
    policy = LatestPolicy(training_client.save_weights_and_get_sampling_client())
    queue: asyncio.Queue[Group] = asyncio.Queue(maxsize=2 * config.groups_per_step)
    stats = Stats()
    actors = [asyncio.create_task(actor(i, policy, renderer, queue, config, stats)) for i in range(config.actors)]
    try:
        await learner(training_client, policy, queue, config, stats)
    finally:
        for task in actors:
            task.cancel()
        await asyncio.gather(*actors, return_exceptions=True)
    elapsed = time.perf_counter() - stats.start
    print(
        f"throughput: {stats.samples / elapsed:.1f} samples/s, {stats.sampled_tokens / elapsed:.1f} sampled tok/s, "
        f"{stats.trained_tokens / elapsed:.1f} trained tok/s, {elapsed / config.steps:.2f} s/step; "
        f"mean staleness {np.mean(stats.staleness):.2f}, dropped {stats.dropped} stale groups"
    )
    return stats


if __name__ == "__main__":
    asyncio.run(main(parse_cli(Config)))
