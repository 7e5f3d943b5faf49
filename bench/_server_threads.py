"""``tinker-server`` that, on ``SIGUSR1``, writes its Python threads' names to a file.

    python bench/_server_threads.py NAMES_FILE [tinker-server arguments]

For ``--profile`` through a server: the benchmark reads the server's per-thread CPU time from
``/proc`` and needs to know which native thread is the event loop (``MainThread``) and which
the compute thread (``engine-*``). The file holds one ``native_id<TAB>name`` line per thread.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from tinker_backend import cli


def _dump(path: Path) -> None:
    lines = "".join(f"{t.native_id}\t{t.name}\n" for t in threading.enumerate())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(lines)
    tmp.replace(path)  # the reader never sees half a file


def main() -> None:
    names_file = Path(sys.argv[1])

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _dump(names_file)

    signal.signal(signal.SIGUSR1, on_signal)
    cli.main(sys.argv[2:])


if __name__ == "__main__":
    main()
