"""The official cookbook's ``math_rl`` recipe (arithmetic env, default loss ``stable_reinforce``)
on SmolLM2-135M-Instruct against a ``tinker-server`` started here; prints the reward per step.

Runs in a venv with the official SDK and cookbook (``nox -s compat`` builds one); the server
runs with this repo's ``src`` and ``backend`` first on its path (tests/compat/conftest.py):

    .nox/compat/bin/python bench/compat_math_rl.py --steps 10 --groups 4 --lr 2e-4 --out /tmp/math_rl

The recipe runs through its own ``cli_main`` at its defaults except: the model, the
``qwen3_instruct`` renderer (the cookbook's ChatML renderer, which is SmolLM2's chat format;
the cookbook does not know SmolLM2), ``groups_per_batch``, ``learning_rate`` and
``max_steps`` (a short run on CPU), and no evals or checkpoints in between. ``--max-operand N``
draws the recipe's ``x + y`` problems with operands 0..N instead of its 0..100 (its own
``ArithmeticDataset``, with only that range changed): SmolLM2-135M almost never adds two-digit
numbers right when sampling at temperature 1 (docs/compat.md), so there is nothing to reinforce.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _set_max_operand(max_operand: int) -> None:
    """The recipe's dataset with operands 0..``max_operand``; its builder looks the class up here."""
    from functools import partial

    from tinker_cookbook.recipes.math_rl import arithmetic_env
    from tinker_cookbook.rl.problem_env import ProblemGroupBuilder

    class SmallerOperands(arithmetic_env.ArithmeticDataset):
        def _make_env_group_builder(self, rng: Any) -> ProblemGroupBuilder:
            x, y = rng.randint(0, max_operand + 1), rng.randint(0, max_operand + 1)
            prefix = arithmetic_env.ArithmeticEnv.standard_fewshot_prefix() if self.include_fewshot else None
            env = partial(arithmetic_env.ArithmeticEnv, x, y, convo_prefix=prefix, renderer=self.renderer)
            return ProblemGroupBuilder(env_thunk=env, num_envs=self.group_size)

    arithmetic_env.ArithmeticDataset = SmallerOperands  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--groups", type=int, default=4, help="groups_per_batch (4 samples each)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-operand", type=int, default=100, help="largest x and y (the recipe's: 100)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.max_operand != 100:
        _set_max_operand(args.max_operand)

    from compat.conftest import API_KEY, CompatServer

    args.out.mkdir(parents=True, exist_ok=True)
    server = CompatServer(args.out / "data")
    os.environ["TINKER_BASE_URL"], os.environ["TINKER_API_KEY"] = server.base_url, API_KEY
    from transformers import AutoTokenizer

    import tinker
    from tinker_cookbook.recipes.math_rl import train
    from tinker_cookbook.tokenizer_utils import register_tokenizer

    try:
        with tinker.ServiceClient() as service:  # the tokenizer from the folder the server names
            info = service.create_lora_training_client(MODEL, rank=1).result().get_info()
        register_tokenizer(MODEL, lambda: AutoTokenizer.from_pretrained(info.model_data.tokenizer_id))
        config = train.CLIConfig(
            model_name=MODEL,
            renderer_name="qwen3_instruct",
            groups_per_batch=args.groups,
            learning_rate=args.lr,
            max_steps=args.steps,
            eval_every=0,
            save_every=0,
            log_path=str(args.out / "log"),
            behavior_if_log_dir_exists="delete",
        )
        start = time.monotonic()
        asyncio.run(train.cli_main(config))
        print(f"wall {time.monotonic() - start:.0f} s")
    finally:
        server.stop()
    print("| step | reward | correct | format | s |")
    print("|---|---|---|---|---|")
    for line in (args.out / "log" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "env/all/reward/total" in row:
            print(
                f"| {row['step']} | {row['env/all/reward/total']:.3f} | {row['env/all/correct']:.3f} "
                f"| {row['env/all/format']:.3f} | {row['time/total']:.0f} |"
            )


if __name__ == "__main__":
    main()
