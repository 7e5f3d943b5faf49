"""Checkpoints of a run, recorded in ``log_path/checkpoints.jsonl`` so a run can resume.

Each line is ``{"name", "step", "state_path"?, "sampler_path"?, "final"?}``: ``state_path``
(adapter + optimizer, for resuming) is a ``tinker://<run>/weights/<name>`` path and
``sampler_path`` a ``tinker://<run>/sampler_weights/<name>`` one. ``step`` is the number of
optimizer steps taken, i.e. the step a resumed run starts at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import tinker

CHECKPOINTS_FILE = "checkpoints.jsonl"


async def save_checkpoint(
    training_client: tinker.TrainingClient,
    name: str,
    log_path: str | Path,
    step: int,
    kind: Literal["state", "sampler", "both"] = "state",
    final: bool = False,
) -> dict[str, Any]:
    """Save the run's weights (after every call submitted so far) and append the record."""
    record: dict[str, Any] = {"name": name, "step": step}
    state = training_client.save_state(name) if kind in ("state", "both") else None
    sampler = training_client.save_weights_for_sampler(name) if kind in ("sampler", "both") else None
    if state is not None:
        record["state_path"] = (await state).path
    if sampler is not None:
        record["sampler_path"] = (await sampler).path
    if final:
        record["final"] = True
    with open(Path(log_path) / CHECKPOINTS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def load_checkpoints(log_path: str | Path) -> list[dict[str, Any]]:
    """Every record of ``checkpoints.jsonl`` (empty if the file does not exist)."""
    path = Path(log_path) / CHECKPOINTS_FILE
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def get_last_checkpoint(log_path: str | Path, required_key: str = "state_path") -> dict[str, Any] | None:
    """The latest record that has ``required_key``, or None."""
    records = [r for r in load_checkpoints(log_path) if required_key in r]
    return records[-1] if records else None


def create_training_client(
    service_client: tinker.ServiceClient, log_path: str | Path, model_name: str, lora_rank: int,
    load_checkpoint_path: str | None = None, seed: int | None = None,
) -> tuple[tinker.TrainingClient, int]:
    """A training client and the step to start at.

    Resumes from the last ``state_path`` in ``log_path/checkpoints.jsonl`` (weights and
    optimizer) if there is one; else starts from ``load_checkpoint_path`` (weights only,
    step 0) if given; else creates a fresh adapter.
    """
    last = get_last_checkpoint(log_path)
    if last is not None:
        client = service_client.create_training_client_from_state_with_optimizer(last["state_path"])
        return client, int(last["step"])
    if load_checkpoint_path is not None:
        return service_client.create_training_client_from_state(load_checkpoint_path), 0
    return service_client.create_lora_training_client(model_name, rank=lora_rank, seed=seed), 0
