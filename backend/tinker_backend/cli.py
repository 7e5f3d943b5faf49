"""``tinker-server``: serve both protocols on one port; ``tinker-server keys ...``: manage API keys.

    tinker-server --data-dir DIR [--host H --port P] [--api-key KEY ...] [--keys-file F] ...
    tinker-server --workers local --models models.toml ...   # placements: docs/scaling.md
    tinker-server keys create [--owner NAME] --data-dir DIR   # prints a new tml-... key once
    tinker-server keys list --data-dir DIR
    tinker-server keys revoke KEY_ID --data-dir DIR
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import time
from pathlib import Path

from aiohttp import web

from tinker_backend import auth, limits
from tinker_backend.api import MAX_FRAME_BYTES, make_app
from tinker_backend.store import Store
from tinker_backend.tenancy import KeyLimits
from tinker_backend.workers.config import WORKER_KINDS, PlacementError, load_deployment


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
    parser.add_argument("--sampler", choices=["torch", "vllm"], default=None,
                        help="sampling engine: torch (continuous batching) or vllm, which needs vllm "
                        "installed; default $TINKER_SAMPLER, else torch (docs/sampling.md)")
    parser.add_argument("--workers", choices=list(WORKER_KINDS), default="inprocess",
                        help="where base models train: inprocess (this process, the default), local "
                        "(supervised worker processes, trainer_ranks of them per model) or ray (Ray actors; "
                        "needs the [ray] extra; docs/scaling.md)")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="with --workers ray: the Ray cluster to join (e.g. 10.0.0.1:6379); default: "
                        "start a local Ray")
    parser.add_argument("--models", type=Path, metavar="FILE",
                        help="TOML placement per base model: trainer_ranks, sampler, devices, dtype, "
                        "max_adapter_slots (docs/scaling.md); checked before anything loads")
    limits.add_arguments(parser)
    _add_tenancy_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def _add_tenancy_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("API keys and per-key limits (docs/operations.md)")
    group.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="accept this API key (repeatable); its owner is key-<key id>")
    group.add_argument("--keys-file", type=Path, help="file of 'KEY [OWNER]' lines, re-read when it changes")
    group.add_argument("--admin-owner", action="append", default=[], metavar="OWNER",
                       help="an owner whose keys see the console's server page (repeatable)")
    group.add_argument("--allow-no-auth", action="store_true",
                       help="serve a non-loopback address without any API key (everyone is one user)")
    group.add_argument("--allow-local-models", action="store_true",
                       help="let API keys name a local folder as base_model (always allowed without keys)")
    group.add_argument("--max-runs-per-key", type=_limit, default=64, metavar="N",
                       help="training runs loaded at once per key, 0 = no limit (default 64)")
    group.add_argument("--max-pending-per-key", type=_limit, default=1024, metavar="N",
                       help="requests in progress at once per key, 0 = no limit (default 1024)")
    group.add_argument("--max-storage-per-key", type=_size, default=None, metavar="BYTES",
                       help="checkpoint bytes per key, e.g. 50G, 0 = no limit (default none)")
    group.add_argument("--session-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="unload the runs of a session silent this long (no heartbeat or request; default 300)")
    group.add_argument("--max-request-bytes", type=_size, default=MAX_FRAME_BYTES, metavar="BYTES",
                       help=f"largest native frame or HTTP body (default {MAX_FRAME_BYTES // 2**20}M)")


def _limit(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value or None


def _size(text: str) -> int | None:
    """``123``, ``64K``, ``500M``, ``50G``, ``1T`` (powers of 1024); 0 means none."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    scale = units.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 1048576, 500M or 50G, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a size >= 0, got {text!r}")
    return value or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _exposure_problem(args: argparse.Namespace) -> str | None:
    """Why serving as configured would be unsafe, or None."""
    if _is_loopback(args.host) or args.allow_no_auth or _has_keys(args):
        return None
    return (
        f"refusing to serve {args.host} (not a loopback address) without API keys: pass --api-key, "
        "--keys-file or create one with 'tinker-server keys create', or accept the risk with --allow-no-auth"
    )


def keys_main(argv: list[str]) -> int:
    """``tinker-server keys create|list|revoke``: keys in the store of ``--data-dir``."""
    parser = argparse.ArgumentParser(prog="tinker-server keys", description="Manage the API keys of a data dir.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a new key and print it (only its hash is stored)")
    create.add_argument("--owner", help="the tenant it acts as (default: key-<key id>, a tenant of its own)")
    commands.add_parser("list", help="key ids, owners, creation and revocation times")
    revoke = commands.add_parser("revoke", help="revoke a key at once (also on open connections)")
    revoke.add_argument("key_id", help="the id 'keys list' shows, or the key itself")
    for sub in commands.choices.values():
        sub.add_argument("--data-dir", type=Path, default=Path("tinker-data"), help="store and checkpoints")
    args = parser.parse_args(argv)
    store = Store(args.data_dir / "tinker.sqlite3")
    try:
        if args.command == "create":
            key = auth.generate_key()
            owner = args.owner or f"key-{auth.key_id(key)}"
            store.add_key(auth.key_id(key), auth.hash_key(key), owner)
            print(key)
            print(f"key id {auth.key_id(key)}, owner {owner}; store the key now, it is not shown again", file=sys.stderr)
        elif args.command == "list":
            for record in store.list_keys():
                state = f"revoked {record.revoked_at}" if record.revoked_at else "active"
                print(f"{record.key_id}  {record.owner}  created {record.created_at}  {state}")
        else:
            key_id = args.key_id if len(args.key_id) == 12 else auth.key_id(args.key_id)
            if not store.revoke_key(key_id):
                print(f"key_id: expected an active key id (see 'keys list'), got {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"revoked {key_id}")
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        sys.exit(keys_main(argv[1:]))
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    log = logging.getLogger("tinker_backend")
    problem = _exposure_problem(args)
    if problem is not None:
        log.error(problem)
        sys.exit(2)
    try:
        deployment = load_deployment(args.workers, args.models, args.ray_address,
                                     args.sampler or os.environ.get("TINKER_SAMPLER"))
    except PlacementError as e:
        log.error("%s", e)
        sys.exit(2)
    app = make_app(
        args.data_dir,
        limits=limits.from_args(args),
        api_keys=tuple(args.api_key),
        admin_owners=tuple(args.admin_owner),
        keys_file=args.keys_file,
        key_limits=KeyLimits(args.max_runs_per_key, args.max_pending_per_key, args.max_storage_per_key),
        session_timeout_s=args.session_timeout or None,
        allow_local_models=args.allow_local_models or not _has_keys(args),
        max_request_bytes=args.max_request_bytes or MAX_FRAME_BYTES,
        sampler=args.sampler,
        deployment=deployment,
    )
    if deployment.workers == "ray":
        from tinker_backend.workers import ray_driver

        ray_driver.prepare_environment()  # before Ray is imported
    log.info("serving on http://%s:%d (data dir %s)", args.host, args.port, args.data_dir.resolve())
    # run_app handles SIGINT and SIGTERM: it stops accepting, runs cleanup, and exits 0.
    web.run_app(app, host=args.host, port=args.port, print=None, handle_signals=True, access_log=None)
    log.info("stopped")


def _has_keys(args: argparse.Namespace) -> bool:
    """Whether any API key is configured at startup (flags, keys file or the store)."""
    if args.api_key or args.keys_file:
        return True
    store = Store(args.data_dir / "tinker.sqlite3")
    try:
        return store.has_active_keys()
    finally:
        store.close()


if __name__ == "__main__":
    main()
