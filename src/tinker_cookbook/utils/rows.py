"""Dataset rows, shared by the supervised and the preference datasets: read from JSONL, a test
set split off, and served in batches.

``rows`` is any sequence (a list, or a Hugging Face ``datasets.Dataset``). Batch ``i`` of an
epoch holds ``batch_size`` rows of an order shuffled per epoch (seeded by the epoch, so a
resumed run sees the same batches); a last partial batch is dropped.

>>> batches = RowBatches(list("abcde"), batch_size=2, shuffle=False)
>>> len(batches), batches.batch_indices(1)
(2, [2, 3])
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tinker_cookbook.exceptions import DataError


def read_jsonl(path: str | Path) -> Iterator[tuple[Any, str]]:
    """Each row of a JSONL file with where it stands (``"data.jsonl:7"``); blank lines skipped."""
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e})") from e
            yield row, f"{path}:{line_no}"


class RowBatches:
    """Indices into ``rows`` per batch; subclasses turn the rows into what they serve."""

    def __init__(self, rows: Sequence[Any], batch_size: int, shuffle: bool = True) -> None:
        if batch_size < 1 or len(rows) < batch_size:
            raise DataError(f"batch_size: expected between 1 and the number of rows ({len(rows)}), got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.order = list(range(len(rows)))
        self.set_epoch(0)

    def set_epoch(self, seed: int = 0) -> None:
        """The order of epoch ``seed``: shuffled with that seed (unless ``shuffle=False``)."""
        self.order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(seed).shuffle(self.order)

    def __len__(self) -> int:
        """The number of batches in one epoch."""
        return len(self.rows) // self.batch_size

    def batch_indices(self, index: int) -> list[int]:
        """The row numbers of batch ``index`` of the current epoch."""
        return self.order[index * self.batch_size : (index + 1) * self.batch_size]


def split_test_rows(rows: Any, test_size: int) -> tuple[Any, Any | None]:
    """The rows after the first ``test_size`` (for training) and the first ``test_size`` (the
    test set; None when 0). A ``datasets.Dataset`` is split with ``select``, a list by slicing."""
    n = len(rows)
    if not 0 <= test_size < n:
        raise DataError(f"test_size: expected in [0, {n}) for {n} rows, got {test_size}")
    if hasattr(rows, "select"):
        return rows.select(range(test_size, n)), (rows.select(range(test_size)) if test_size else None)
    return rows[test_size:], (rows[:test_size] if test_size else None)
