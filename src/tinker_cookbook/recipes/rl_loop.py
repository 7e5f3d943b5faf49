"""A minimal GRPO loop written directly against the Tinker primitives.

Each step: snapshot the weights into a sampler, sample ``group_size`` answers to each of
``batch_size`` generated sums ("What is 7 + 12?"), reward 1 for a correct number, take
each answer's advantage as its reward minus its group's mean, and train on the sampled
tokens with the ``importance_sampling`` loss (the sampler's logprobs correct for any
sampler/trainer mismatch). Groups where every answer got the same reward carry no signal
and are skipped. See ``rl_basic`` for the library loop (async modes, KL penalty, evals).

    python -m tinker_cookbook.recipes.rl_loop
    python -m tinker_cookbook.recipes.rl_loop model_name=tiny-llama max_steps=2 log_path=/tmp/rl_loop
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgspec
import numpy as np

import tinker
from tinker_cookbook.recipes.math_rl.envs import ARITHMETIC_SYSTEM, arithmetic_problem
from tinker_cookbook.recipes.math_rl.math_grading import grade_answer
from tinker_cookbook.renderers import get_recommended_renderer_name, get_renderer
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir
from tinker_cookbook.utils.ml_log import MetricsLogger


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/rl_loop"
    max_steps: int = 12
    batch_size: int = 4
    group_size: int = 8
    max_operand: int = 20
    max_tokens: int = 16
    learning_rate: float = 4e-4
    lora_rank: int = 16
    base_url: str | None = None
    seed: int = 0  # LoRA initialisation, the problems and the sampling seeds
    if_exists: IfExists = "raise"


def main(cli: CLIConfig) -> None:
    check_log_dir(cli.log_path, cli.if_exists)
    ml_logger = MetricsLogger(cli.log_path, cli)
    service = tinker.ServiceClient(base_url=cli.base_url)
    training_client = service.create_lora_training_client(cli.model_name, rank=cli.lora_rank, seed=cli.seed)
    renderer = get_renderer(get_recommended_renderer_name(cli.model_name), training_client.get_tokenizer())
    params = tinker.SamplingParams(max_tokens=cli.max_tokens, temperature=1.0, stop=renderer.get_stop_sequences())
    rng = random.Random(cli.seed)

    for step in range(cli.max_steps):
        sampler = training_client.save_weights_and_get_sampling_client()
        problems = [arithmetic_problem(rng, cli.max_operand) for _ in range(cli.batch_size)]
        prompts = [
            renderer.build_generation_prompt(
                [{"role": "system", "content": ARITHMETIC_SYSTEM}, {"role": "user", "content": question}]
            )
            for question, _ in problems
        ]
        # One sample() call per problem, all in flight at once.
        futures = [
            sampler.sample(prompt, cli.group_size, msgspec.structs.replace(params, seed=cli.seed * 1_000_003 + step * 1_009 + i))
            for i, prompt in enumerate(prompts)
        ]
        data, rewards = [], []
        for prompt, (_, answer), future in zip(prompts, problems, futures, strict=True):
            sequences = future.result().sequences
            rewards_G = np.array(
                [float(grade_answer(renderer.parse_response(s.tokens)[0]["content"], answer)) for s in sequences]
            )
            rewards += rewards_G.tolist()
            advantages_G = rewards_G - rewards_G.mean()
            if not advantages_G.any():
                continue  # every answer equally good: no signal
            ob = prompt.to_ints()
            for seq, advantage in zip(sequences, advantages_G, strict=True):
                tokens = ob + seq.tokens
                n_ob = len(ob) - 1  # prompt positions among the targets (tokens[1:])
                data.append(
                    tinker.Datum(
                        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": tokens[1:],
                            "logprobs": [0.0] * n_ob + list(seq.logprobs),
                            "advantages": [0.0] * n_ob + [float(advantage)] * len(seq.tokens),
                        },
                    )
                )
        if data:
            fwd_bwd = training_client.forward_backward(data, "importance_sampling")
            optim = training_client.optim_step(tinker.AdamParams(learning_rate=cli.learning_rate))
            fwd_bwd.result()
            optim.result()
        ml_logger.log_metrics({"reward/total": float(np.mean(rewards)), "num_datums": len(data)}, step=step)
    ml_logger.close()


if __name__ == "__main__":
    main(parse_cli(CLIConfig))
