"""Capacity limits of a backend, set with ``tinker-server`` options (one per field)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields

_HELP = {
    "max_lora_rank": "largest LoRA rank a run may ask for",
    "max_runs": "training runs kept per base model",
    "adapter_slots": "adapters attached on the device at once (and most runs per clock cycle)",
    "host_adapters": "adapters out of a slot kept in host memory; older ones go to disk",
    "max_tokens_per_cycle": "tokens of forward/backward work merged into one clock cycle",
    "checkpoint_tokens": "padded tokens of a training pass from which the decoder layers' activations are "
    "recomputed in the backward pass instead of kept (less memory, about one more forward; 0: never)",
    "ephemeral_samplers_per_run": "in-memory samplers (save_weights_and_get_sampling_client) kept per "
    "training run; making one more unloads its oldest",
    "stability_max_tokens": "tokens of sampling records (record_stability_info) kept in memory; past it the "
    "least recently used records go",
    "stability_ttl_s": "seconds a sampling record (record_stability_info) is kept without use",
}


@dataclass(frozen=True)
class Limits:
    """Every limit the engine enforces (meanings in ``_HELP``); an error that hits one states it."""

    max_lora_rank: int = 256
    max_runs: int = 4096
    adapter_slots: int = 64
    host_adapters: int = 256
    max_tokens_per_cycle: int = 16384
    checkpoint_tokens: int = 2048  # engine.model_engine.DEFAULT_CHECKPOINT_TOKENS (not imported: no torch here)
    ephemeral_samplers_per_run: int = 8
    stability_max_tokens: int = 16_000_000  # about 128 MB (stability.py)
    stability_ttl_s: int = 24 * 3600  # a day, as the Tinker docs say

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            minimum = _minimum(field.name)
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{field.name}: expected an int >= {minimum}, got {value!r}")


def _minimum(name: str) -> int:
    return 0 if name in ("host_adapters", "checkpoint_tokens") else 1


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a bad value stops the server with "expected an int >= N, got 'X'"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per limit, e.g. ``--adapter-slots 16``."""
    for field in fields(Limits):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_int_at_least(_minimum(field.name)),
            default=field.default,
            help=f"{_HELP[field.name]} (default {field.default})",
        )


def from_args(args: argparse.Namespace) -> Limits:
    return Limits(**{field.name: getattr(args, field.name) for field in fields(Limits)})
