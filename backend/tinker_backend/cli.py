"""``tinker-server``: serve the native protocol (and health) on one port."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from aiohttp import web

from tinker_backend.api import make_app


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, so logs can be shipped and queried."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tinker-server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--data-dir", type=Path, default=Path("tinker-data"), help="store and checkpoints")
    parser.add_argument("--max-lora-rank", type=int, default=256, help="largest LoRA rank accepted")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    log = logging.getLogger("tinker_backend")
    app = make_app(args.data_dir, max_lora_rank=args.max_lora_rank)
    log.info("serving on http://%s:%d (data dir %s)", args.host, args.port, args.data_dir.resolve())
    # run_app handles SIGINT and SIGTERM: it stops accepting, runs cleanup, and exits 0.
    web.run_app(app, host=args.host, port=args.port, print=None, handle_signals=True, access_log=None)
    log.info("stopped")


if __name__ == "__main__":
    main()
