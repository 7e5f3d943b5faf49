"""Supervised datasets: conversations (from JSONL files or ``datasets``) into ``tinker.Datum``s.

A datum for next-token prediction holds ``tokens[:-1]`` as input and, per position, the next
token (``target_tokens``) and its weight (``weights``); see :func:`datum_from_tokens_weights`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tinker
from tinker_cookbook.exceptions import DataError
from tinker_cookbook.renderers import Message, Renderer, TrainOnWhat
from tinker_cookbook.utils.rows import RowBatches, read_jsonl, split_test_rows


def datum_from_tokens_weights(tokens: Sequence[int], weights: Sequence[float], max_length: int | None = None) -> tinker.Datum:
    """Shift a weighted token sequence into a datum: input ``tokens[:-1]``, targets
    ``tokens[1:]`` with ``weights[1:]``. Sequences longer than ``max_length`` are cut at the end."""
    if len(tokens) != len(weights):
        raise DataError(f"weights: expected one per token ({len(tokens)}), got {len(weights)}")
    if len(tokens) < 2:
        raise DataError(f"tokens: expected at least 2 to predict one, got {len(tokens)}")
    if max_length is not None:
        tokens, weights = tokens[:max_length], weights[:max_length]
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": list(tokens[1:]), "weights": [float(w) for w in weights[1:]]},
    )


def conversation_to_datum(
    messages: list[Message],
    renderer: Renderer,
    max_length: int | None,
    train_on_what: TrainOnWhat = TrainOnWhat.ALL_ASSISTANT_MESSAGES,
) -> tinker.Datum:
    """Render ``messages`` and weight the tokens selected by ``train_on_what``."""
    model_input, weights = renderer.build_supervised_example(messages, train_on_what)
    return datum_from_tokens_weights(model_input.to_ints(), weights, max_length)


def check_conversation(row: Any, where: str) -> list[Message]:
    """``row["messages"]`` as a list of messages, or a ``DataError`` naming ``where``."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages': expected a non-empty list of {{role, content}}, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: 'messages[{i}]': expected {{'role': str, 'content': str}}, got {m!r:.80}")
    return messages


def load_conversations_jsonl(path: str | Path) -> list[list[Message]]:
    """Conversations from a JSONL file with one ``{"messages": [{"role", "content"}, ...]}`` per line."""
    return [check_conversation(row, where) for row, where in read_jsonl(path)]


class SupervisedDataset(ABC):
    """Batches of datums, indexed by batch number; ``set_epoch`` reshuffles."""

    @abstractmethod
    def get_batch(self, index: int) -> list[tinker.Datum]: ...

    @abstractmethod
    def __len__(self) -> int:
        """The number of batches in one epoch."""

    def set_epoch(self, seed: int = 0) -> None:  # noqa: B027 (optional hook)
        """Prepare epoch ``seed`` (e.g. a new shuffle)."""


class ConversationDataset(RowBatches, SupervisedDataset):
    """Conversations rendered into batches of ``batch_size`` datums.

    ``rows`` is any sequence of ``{"messages": [...]}`` rows: a list, or a Hugging Face
    ``datasets.Dataset``. Rows are checked and rendered when their batch is requested; the
    order is shuffled per epoch (seeded), and a last partial batch is dropped
    (:class:`~tinker_cookbook.utils.rows.RowBatches`).
    """

    def __init__(
        self,
        rows: Sequence[Any],
        renderer: Renderer,
        batch_size: int,
        max_length: int | None = None,
        train_on_what: TrainOnWhat = TrainOnWhat.ALL_ASSISTANT_MESSAGES,
        shuffle: bool = True,
    ) -> None:
        super().__init__(rows, batch_size, shuffle)
        self.renderer = renderer
        self.max_length = max_length
        self.train_on_what = train_on_what

    def get_batch(self, index: int) -> list[tinker.Datum]:
        return [
            conversation_to_datum(
                check_conversation(self.rows[i], f"row {i}"), self.renderer, self.max_length, self.train_on_what
            )
            for i in self.batch_indices(index)
        ]


class SupervisedDatasetBuilder(Protocol):
    """Builds the train and (optional) test datasets once the renderer is known."""

    def __call__(self, renderer: Renderer) -> tuple[SupervisedDataset, SupervisedDataset | None]: ...


@dataclass
class ConversationFileBuilder:
    """Train/test datasets from a conversations JSONL file; the first ``test_size`` rows are the test set."""

    file_path: str
    batch_size: int
    max_length: int | None = None
    test_size: int = 0
    train_on_what: TrainOnWhat = TrainOnWhat.ALL_ASSISTANT_MESSAGES

    def __call__(self, renderer: Renderer) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        rows = [{"messages": m} for m in load_conversations_jsonl(self.file_path)]
        return split_rows(rows, renderer, self.batch_size, self.max_length, self.test_size, self.train_on_what)


@dataclass
class HFDatasetBuilder:
    """Train/test datasets from a Hugging Face ``datasets`` dataset with a ``messages`` column.

    ``path`` and ``split`` go to ``datasets.load_dataset`` (e.g. ``path="json"`` with
    ``data_files=...`` for local files, or a Hub name already in the local cache).
    """

    path: str
    batch_size: int
    split: str = "train"
    data_files: str | None = None
    max_length: int | None = None
    test_size: int = 0
    train_on_what: TrainOnWhat = TrainOnWhat.ALL_ASSISTANT_MESSAGES

    def __call__(self, renderer: Renderer) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        import datasets

        dataset = datasets.load_dataset(self.path, data_files=self.data_files, split=self.split)
        return split_rows(dataset, renderer, self.batch_size, self.max_length, self.test_size, self.train_on_what)


def split_rows(
    rows: Any, renderer: Renderer, batch_size: int, max_length: int | None, test_size: int, train_on_what: TrainOnWhat
) -> tuple[SupervisedDataset, SupervisedDataset | None]:
    """The first ``test_size`` rows as a test set (one batch, unshuffled), the rest for training."""
    train_rows, test_rows = split_test_rows(rows, test_size)
    train = ConversationDataset(train_rows, renderer, batch_size, max_length, train_on_what)
    if test_rows is None:
        return train, None
    return train, ConversationDataset(test_rows, renderer, test_size, max_length, train_on_what, shuffle=False)
