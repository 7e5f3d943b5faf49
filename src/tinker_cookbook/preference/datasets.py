"""Labeled comparisons from JSONL files (or ``datasets``), served in shuffled batches.

One row per line::

    {"prompt_conversation": [{"role": "user", "content": "What is 2 + 2?"}],
     "completion_A": [{"role": "assistant", "content": "4."}],
     "completion_B": "5, or maybe 6.",
     "label": "A"}

A completion may be a list of messages or a string (one assistant message). Errors name the
file, line and field (``data.jsonl:7: completion_B[0]: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tinker_cookbook.exceptions import DataError
from tinker_cookbook.preference.types import Comparison, LabeledComparison
from tinker_cookbook.utils.rows import RowBatches, read_jsonl, split_test_rows

FIELDS = ("prompt_conversation", "completion_A", "completion_B", "label")


def labeled_comparison_from_row(row: Any, where: str) -> LabeledComparison:
    """Check and convert one row; a ``DataError`` starts with ``where`` and names the field."""
    if isinstance(row, LabeledComparison):
        return row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {row!r:.80}")
    for key in FIELDS:
        if key not in row:
            raise DataError(f"{where}: {key}: missing (a row needs {', '.join(FIELDS)})")
    completions = [_as_messages(row[key]) for key in ("completion_A", "completion_B")]
    try:
        return LabeledComparison(Comparison(row["prompt_conversation"], *completions), row["label"])
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _as_messages(value: Any) -> Any:
    """A bare string is shorthand for one assistant message."""
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else value


def load_comparisons_jsonl(path: str | Path) -> list[LabeledComparison]:
    """Every labeled comparison of a JSONL file (blank lines are skipped)."""
    comparisons = [labeled_comparison_from_row(row, where) for row, where in read_jsonl(path)]
    if not comparisons:
        raise DataError(f"{path}: no comparisons")
    return comparisons


class ComparisonDataset(RowBatches):
    """Batches of ``batch_size`` labeled comparisons, shuffled per epoch (seeded).

    ``rows`` is a list of ``LabeledComparison`` or of raw rows (e.g. a ``datasets.Dataset``),
    which are checked when their batch is requested. A last partial batch is dropped
    (:class:`~tinker_cookbook.utils.rows.RowBatches`).
    """

    def get_batch(self, index: int) -> list[LabeledComparison]:
        return [labeled_comparison_from_row(self.rows[i], f"row {i}") for i in self.batch_indices(index)]


class ComparisonDatasetBuilder(Protocol):
    """Builds the train and (optional) test comparison datasets."""

    def __call__(self) -> tuple[ComparisonDataset, ComparisonDataset | None]: ...


@dataclass
class ComparisonFileBuilder:
    """Train/test datasets from a comparisons JSONL file; the first ``test_size`` rows are the test set."""

    file_path: str
    batch_size: int
    test_size: int = 0

    def __call__(self) -> tuple[ComparisonDataset, ComparisonDataset | None]:
        return split_rows(load_comparisons_jsonl(self.file_path), self.batch_size, self.test_size)


@dataclass
class HFComparisonBuilder:
    """Train/test datasets from a Hugging Face ``datasets`` dataset with the JSONL row's columns.

    ``path``, ``split`` and ``data_files`` go to ``datasets.load_dataset``.
    """

    path: str
    batch_size: int
    split: str = "train"
    data_files: str | None = None
    test_size: int = 0

    def __call__(self) -> tuple[ComparisonDataset, ComparisonDataset | None]:
        import datasets

        dataset = datasets.load_dataset(self.path, data_files=self.data_files, split=self.split)
        missing = [c for c in FIELDS if c not in dataset.column_names]
        if missing:
            raise DataError(f"{self.path}: missing columns {missing}; has {dataset.column_names}")
        return split_rows(dataset, self.batch_size, self.test_size)


def split_rows(rows: Any, batch_size: int, test_size: int) -> tuple[ComparisonDataset, ComparisonDataset | None]:
    """The first ``test_size`` rows as a test set (one unshuffled batch), the rest for training."""
    train_rows, test_rows = split_test_rows(rows, test_size)
    train = ComparisonDataset(train_rows, batch_size)
    if test_rows is None:
        return train, None
    return train, ComparisonDataset(test_rows, test_size, shuffle=False)
