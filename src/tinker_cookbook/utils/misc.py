"""Small helpers: timing, run folders and progress bars."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

from tinker_cookbook.exceptions import ConfigurationError

T = TypeVar("T")

IfExists = Literal["raise", "resume", "delete"]


@contextlib.contextmanager
def timed(name: str, metrics: dict[str, float]) -> Iterator[None]:
    """Add the seconds the block took to ``metrics[f"time/{name}"]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[f"time/{name}"] = metrics.get(f"time/{name}", 0.0) + time.perf_counter() - start


def check_log_dir(log_path: str | Path, if_exists: IfExists) -> None:
    """Prepare the run folder.

    A folder that does not exist or is empty is always fine. Otherwise ``if_exists`` says
    what to do: ``raise`` (the default in recipes) refuses, ``delete`` starts over, and
    ``resume`` keeps it so the loop continues from the last checkpoint in ``checkpoints.jsonl``.
    """
    path = Path(log_path)
    if not path.exists() or not any(path.iterdir()):
        return
    if if_exists == "raise":
        raise ConfigurationError(
            f"log_path: {str(path)!r} already holds a run; pass if_exists=resume to continue it "
            "or if_exists=delete to start over"
        )
    if if_exists == "delete":
        shutil.rmtree(path)
    elif if_exists != "resume":
        raise ConfigurationError(f"if_exists: expected 'raise', 'resume' or 'delete', got {if_exists!r}")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A progress bar on a terminal (tqdm), the plain iterable elsewhere (logs, CI, pipes)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False, dynamic_ncols=True)
