"""Training loops that must learn through the official SDK: the cookbook's own supervised
``train.main`` on a small local JSONL, and a small RL loop written against the SDK."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

import tinker
from tinker import types
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

from .conftest import TINY

CONVERSATIONS = [
    [("What colour is the sky?", "The sky is blue."), ("And grass?", "Grass is green.")],
    [("Name a fruit.", "An apple is a fruit.")],
    [("What is two plus two?", "Two plus two is four.")],
    [("Say hello.", "Hello there, friend.")],
]


@pytest.mark.slow
@pytest.mark.timeout(300)  # not measured here (needs datasets, chz)
def test_cookbook_supervised_train_learns(tmp_path: Path, tiny_tokenizer: None) -> None:
    data_file = tmp_path / "conversations.jsonl"
    with data_file.open("w") as f:
        for turns in CONVERSATIONS * 4:
            messages = [
                {"role": role, "content": text}
                for pair in turns
                for role, text in zip(("user", "assistant"), pair, strict=True)
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    log_path = tmp_path / "sft"
    config = train.Config(
        log_path=str(log_path),
        model_name=TINY,
        recipe_name="compat-sft",
        renderer_name="role_colon",
        dataset_builder=FromConversationFileBuilder(
            file_path=str(data_file),
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=TINY, renderer_name="role_colon", max_length=64, batch_size=4
            ),
        ),
        learning_rate=1e-2,
        num_epochs=4,
        lora_rank=8,
        save_every=0,
        eval_every=0,
    )
    asyncio.run(train.main(config))

    metrics = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    nll = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(nll) == 16  # 16 conversations / 4 per batch * 4 epochs
    assert np.mean(nll[-2:]) < 0.6 * np.mean(nll[:2]), nll
    final = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()][-1]
    listed = tinker.RestClient().list_user_checkpoints(limit=1000).result().checkpoints
    assert final["state_path"] in [c.tinker_path for c in listed]


def reward(tokens: list[int]) -> float:
    """The share of even token ids: about 0.5 for the untrained model, 1 at best."""
    return float(np.mean([t % 2 == 0 for t in tokens]))


def _params(seed: int) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=4, temperature=1.0, stop=[], seed=seed)


async def rl_loop(steps: int) -> list[float]:
    """Group-relative REINFORCE with the ``importance_sampling`` loss: each step samples a group
    per prompt from a fresh snapshot of the weights, centres rewards within each group, and
    trains on the sampled tokens. Returns the mean reward of each step."""
    prompts = [[1, 50, 60], [1, 70, 80]]
    mean_rewards = []
    with tinker.ServiceClient() as service:
        tc = await service.create_lora_training_client(TINY, rank=8, seed=0)
        for step_index in range(steps):
            sampler = await tc.save_weights_and_get_sampling_client()
            groups = await asyncio.gather(
                *[
                    # Seeded per step and prompt: the run is reproducible, its bound measured.
                    sampler.sample(types.ModelInput.from_ints(p), 8, _params(seed=100 * step_index + i))
                    for i, p in enumerate(prompts)
                ]
            )
            data, rewards = [], []
            for prompt, group in zip(prompts, groups, strict=True):
                rewards_G = np.array([reward(s.tokens) for s in group.sequences])
                rewards.extend(rewards_G)
                for sequence, advantage in zip(group.sequences, rewards_G - rewards_G.mean(), strict=True):
                    tokens, n_prompt = prompt + sequence.tokens, len(prompt) - 1
                    data.append(
                        types.Datum(
                            model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={
                                "target_tokens": tokens[1:],
                                "logprobs": [0.0] * n_prompt + sequence.logprobs,
                                "advantages": [0.0] * n_prompt + [float(advantage)] * len(sequence.tokens),
                            },
                        )
                    )
            step = tc.forward_backward(data, "importance_sampling")
            update = tc.optim_step(types.AdamParams(learning_rate=3e-2))
            await step
            await update
            mean_rewards.append(float(np.mean(rewards)))
    return mean_rewards


@pytest.mark.slow
@pytest.mark.timeout(300)  # not measured here (needs datasets, chz)
def test_rl_loop_on_the_official_sdk_raises_the_reward() -> None:
    rewards = asyncio.run(rl_loop(steps=10))
    # Measured (seeded, twice, identical): 0.56, 0.39, 0.48, 0.72, 0.98, then 1.0 from step 5 on.
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.2, rewards
