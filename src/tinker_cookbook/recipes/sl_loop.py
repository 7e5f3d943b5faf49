"""A minimal supervised fine-tuning loop written directly against the Tinker primitives.

Renders the bundled chat examples (``example_data/conversations.jsonl``: a made-up travel
guide for the planet Zorblax) into weighted token sequences, then for each batch submits
``forward_backward(cross_entropy)`` and ``optim_step`` back to back (one server cycle) and
logs the batch's mean NLL. No evaluators, checkpoints-for-resume or LR schedule beyond a
linear decay: see ``sl_basic`` for the library loop with all of those.

    python -m tinker_cookbook.recipes.sl_loop
    python -m tinker_cookbook.recipes.sl_loop model_name=tiny-llama max_steps=2 log_path=/tmp/sl_loop
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources

import tinker
from tinker_cookbook.eval.evaluators import compute_mean_nll
from tinker_cookbook.renderers import TrainOnWhat, get_recommended_renderer_name, get_renderer
from tinker_cookbook.supervised.data import conversation_to_datum, load_conversations_jsonl
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir
from tinker_cookbook.utils.ml_log import MetricsLogger


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/sl_loop"
    max_steps: int = 14
    batch_size: int = 8
    learning_rate: float = 5e-4
    lora_rank: int = 16
    max_length: int = 256
    base_url: str | None = None
    seed: int = 0  # LoRA initialisation and the order of the conversations
    if_exists: IfExists = "raise"


def main(cli: CLIConfig) -> None:
    check_log_dir(cli.log_path, cli.if_exists)
    ml_logger = MetricsLogger(cli.log_path, cli)
    service = tinker.ServiceClient(base_url=cli.base_url)
    training_client = service.create_lora_training_client(cli.model_name, rank=cli.lora_rank, seed=cli.seed)
    renderer = get_renderer(get_recommended_renderer_name(cli.model_name), training_client.get_tokenizer())

    conversations = load_conversations_jsonl(str(resources.files("tinker_cookbook") / "example_data" / "conversations.jsonl"))
    rng = random.Random(cli.seed)
    for step in range(cli.max_steps):
        batch = rng.sample(conversations, cli.batch_size)
        data = [conversation_to_datum(c, renderer, cli.max_length, TrainOnWhat.ALL_ASSISTANT_MESSAGES) for c in batch]
        lr = cli.learning_rate * (1 - step / cli.max_steps)
        fwd_bwd = training_client.forward_backward(data, "cross_entropy")  # both submitted before
        optim = training_client.optim_step(tinker.AdamParams(learning_rate=lr))  # waiting on either
        nll = compute_mean_nll(fwd_bwd.result().loss_fn_outputs, data)
        optim.result()
        ml_logger.log_metrics({"train_mean_nll": nll, "learning_rate": lr}, step=step)

    print(f"saved {training_client.save_weights_for_sampler('final').result().path}")
    ml_logger.close()


if __name__ == "__main__":
    main(parse_cli(CLIConfig))
