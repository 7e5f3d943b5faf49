"""The start-up and shut-down every training loop shares (supervised, RL, DPO, distillation).

A loop's ``Config`` has the fields of :class:`RunConfig`; :func:`start_training_run` turns it
into a :class:`TrainingRun`: the service client (``base_url``, else ``$TINKER_BASE_URL``, else
the embedded backend), a ready training client (resumed from the last checkpoint in
``log_path``, or from ``load_checkpoint_path``, or fresh; see
:func:`~tinker_cookbook.checkpoint_utils.create_training_client`), the step to start at, the
renderer (``renderer_name``, else the model's recommended one, on the run's tokenizer) and the
metrics logger. The loop then trains and ends with :meth:`TrainingRun.finish`::

    run = await start_training_run(config)
    for step in range(run.start_step, total):
        ...  # run.training_client.optim_step(run.adam(lr)); await run.maybe_save(step + 1, total)
    await run.finish(total)  # the final checkpoint, then the logger closes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import tinker
from tinker_cookbook import checkpoint_utils
from tinker_cookbook.renderers import Renderer, get_recommended_renderer_name, get_renderer
from tinker_cookbook.utils.ml_log import MetricsLogger


class ModelConfig(Protocol):
    """Which backend and base model, and how to render for it."""

    model_name: str
    renderer_name: str | None  # None: the model's recommended renderer
    base_url: str | None  # None: $TINKER_BASE_URL, else the embedded backend


class RunConfig(ModelConfig, Protocol):
    """The fields a training loop's ``Config`` shares with every other loop's."""

    log_path: str
    lora_rank: int
    load_checkpoint_path: str | None
    seed: int | None
    wandb_project: str | None
    save_every: int  # 0: only the final checkpoint
    adam_beta1: float
    adam_beta2: float
    adam_eps: float


C = TypeVar("C", bound=RunConfig)


def create_service_client(config: ModelConfig) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=config.base_url)


def resolve_renderer_name(config: ModelConfig) -> str:
    return config.renderer_name or get_recommended_renderer_name(config.model_name)


def count_steps(batches_per_epoch: int, num_epochs: int = 1, max_steps: int | None = None) -> int:
    """Steps in ``num_epochs`` passes over the data, at most ``max_steps``."""
    total = batches_per_epoch * num_epochs
    return total if max_steps is None else min(total, max_steps)


@dataclass
class TrainingRun(Generic[C]):
    """What a loop trains with; built by :func:`start_training_run`."""

    config: C
    service: tinker.ServiceClient
    training_client: tinker.TrainingClient
    start_step: int  # optimizer steps already taken (0 for a fresh run)
    renderer: Renderer
    ml_logger: MetricsLogger

    def adam(self, learning_rate: float) -> tinker.AdamParams:
        """Adam with the config's betas and eps."""
        c = self.config
        return tinker.AdamParams(learning_rate=learning_rate, beta1=c.adam_beta1, beta2=c.adam_beta2, eps=c.adam_eps)

    async def maybe_save(self, step_done: int, total: int) -> None:
        """After ``step_done`` optimizer steps: a checkpoint every ``save_every`` (not the final one)."""
        every = self.config.save_every
        if every > 0 and step_done % every == 0 and step_done < total:
            await checkpoint_utils.save_checkpoint(self.training_client, f"{step_done:06d}", self.config.log_path, step_done)

    async def finish(self, total: int) -> None:
        """The ``final`` checkpoint (state and sampler) if this run took a step; close the logger."""
        if total > self.start_step:
            await checkpoint_utils.save_checkpoint(
                self.training_client, "final", self.config.log_path, total, kind="both", final=True
            )
        self.ml_logger.close()


async def start_training_run(config: C) -> TrainingRun[C]:
    """Connect, create or resume the training client, and open the logger (see the module doc)."""
    service = create_service_client(config)
    training_client, start_step = checkpoint_utils.create_training_client(
        service, config.log_path, config.model_name, config.lora_rank, config.load_checkpoint_path, config.seed
    )
    await training_client
    ml_logger = MetricsLogger(config.log_path, config, resume_step=start_step, wandb_project=config.wandb_project)
    renderer = get_renderer(resolve_renderer_name(config), training_client.get_tokenizer())
    return TrainingRun(config, service, training_client, start_step, renderer, ml_logger)
