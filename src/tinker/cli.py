"""The ``tinker`` command line: runs, checkpoints, exports and a quick sample, from a shell.

Mirrors the official SDK's ``tinker`` CLI where they overlap (``run list|info``,
``checkpoint list|info|publish|unpublish|set-ttl|delete|download``, ``model list``,
``version``, the global ``--format table|json``), and adds ``export adapter|merged`` and
``sample``. ``show`` is accepted for ``info``, ``--json`` for ``--format json``.

The backend is the one a ``ServiceClient`` would use: ``$TINKER_BASE_URL`` with
``$TINKER_API_KEY``, else the embedded backend (``$TINKER_DATA_DIR``).

Exit codes: 0 done; 1 the service refused or failed (the message names why); 2 bad usage.

    tinker run list
    tinker --json checkpoint list --run-id <run>
    tinker checkpoint download tinker://<run>/sampler_weights/final -o ./adapter
    tinker export merged tinker://<run>/sampler_weights/final ./merged --dtype bfloat16
    tinker sample tiny-llama "The quick brown" --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (``tinker`` calls ``sys.exit`` with it)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from tinker.errors import TinkerError
    from tinker.validation import parse_tinker_path

    try:
        if getattr(args, "path", None) is not None:
            parse_tinker_path(args.path)  # a bad path is a usage error, found before any request
        result = args.run(args)
    except TinkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as e:  # a bad argument the client refused before sending (tinker.validation)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        _close_clients()
    if result is not None:
        _print(result, args.format)
    return EXIT_OK


# --- output -------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready builtins with every field, defaults included (scripts can rely on the keys)."""
    if isinstance(value, msgspec.Struct):
        return {name: _plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return msgspec.to_builtins(value)


def _print(result: Any, fmt: str) -> None:
    """``result`` is a record, a list of records (``Table``), or a message string."""
    if isinstance(result, str):
        print(result if fmt == "table" else json.dumps({"message": result}))
        return
    if fmt == "json":
        rows = result.rows if isinstance(result, Table) else _plain(result)
        print(json.dumps(rows, indent=2, default=str))
        return
    if isinstance(result, Table):
        print(result.render())
    else:
        for key, value in _plain(result).items():
            print(f"{key:<24} {value if not isinstance(value, dict | list) else json.dumps(value)}")


class Table:
    """Rows of records with chosen columns; renders as aligned text."""

    def __init__(self, rows: list[dict[str, Any]], columns: list[str]) -> None:
        self.rows, self.columns = rows, columns

    def render(self) -> str:
        cells = [[_cell(row.get(column)) for column in self.columns] for row in self.rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.upper().ljust(w) for c, w in zip(self.columns, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(line.rstrip() for line in lines) if self.rows else lines[0] + "\n(none)"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


# --- clients ------------------------------------------------------------------------------------


_opened: list[Any] = []  # the clients a command opened, closed when it ends (no unclosed sockets)


def _rest() -> Any:
    from tinker.rest_client import RestClient

    client = RestClient()
    _opened.append(client)
    return client


def _service() -> Any:
    from tinker.service_client import ServiceClient

    client = ServiceClient()
    _opened.append(client)
    return client


def _close_clients() -> None:
    while _opened:
        _opened.pop().close().result(timeout=10)


# --- commands -----------------------------------------------------------------------------------


def _run_list(args: argparse.Namespace) -> Table:
    response = _rest().list_training_runs(limit=args.limit, offset=args.offset).result()
    rows = [_plain(run) for run in response.training_runs]
    for row in rows:
        row["last_checkpoint"] = (row.get("last_checkpoint") or {}).get("tinker_path")
        row["last_sampler_checkpoint"] = (row.get("last_sampler_checkpoint") or {}).get("tinker_path")
    return Table(rows, ["training_run_id", "base_model", "lora_rank", "last_request_time", "last_sampler_checkpoint"])


def _run_info(args: argparse.Namespace) -> Any:
    rest = _rest()
    if args.run_ref.startswith("tinker://"):
        return rest.get_training_run_by_tinker_path(args.run_ref).result()
    return rest.get_training_run(args.run_ref).result()


def _checkpoint_list(args: argparse.Namespace) -> Table:
    rest = _rest()
    if args.run_id:
        response = rest.list_checkpoints(args.run_id).result()
    else:
        response = rest.list_user_checkpoints(limit=args.limit, offset=args.offset).result()
    rows = [_plain(c) for c in response.checkpoints]
    return Table(rows, ["tinker_path", "checkpoint_type", "size_bytes", "time", "expires_at", "public"])


def _checkpoint_info(args: argparse.Namespace) -> dict[str, Any]:
    rest = _rest()
    info = _plain(rest.get_weights_info_by_tinker_path(args.path).result())
    run_id = args.path.removeprefix("tinker://").split("/", 1)[0]
    for checkpoint in rest.list_checkpoints(run_id).result().checkpoints:
        if checkpoint.tinker_path == args.path:
            info.update(_plain(checkpoint))
    return info


def _checkpoint_action(verb: str) -> Callable[[argparse.Namespace], str]:
    def run(args: argparse.Namespace) -> str:
        rest = _rest()
        if verb == "delete":
            rest.delete_checkpoint_from_tinker_path(args.path).result()
        elif verb == "publish":
            rest.publish_checkpoint_from_tinker_path(args.path).result()
        elif verb == "unpublish":
            rest.unpublish_checkpoint_from_tinker_path(args.path).result()
        else:
            ttl = None if args.ttl in ("none", "never") else int(args.ttl)
            rest.set_checkpoint_ttl_from_tinker_path(args.path, ttl).result()
        return f"{verb}: {args.path}"

    return run


def _checkpoint_download(args: argparse.Namespace) -> str:
    out = Path(args.output or args.path.removeprefix("tinker://").replace("/", "_"))
    with _Progress(f"downloading {args.path}"):
        folder = _rest().download_checkpoint(args.path, out).result()
    return f"downloaded {args.path} to {folder}"


def _export(args: argparse.Namespace) -> str:
    import tempfile

    from tinker_cookbook import weights

    with tempfile.TemporaryDirectory() as tmp, _Progress(f"exporting {args.path}"):
        checkpoint = weights.download(args.path, Path(tmp) / "checkpoint", rest_client=_rest())
        if args.kind == "adapter":
            out = weights.build_lora_adapter(checkpoint, args.output)
        else:
            base_model = _base_model_folder(args.base_model or _base_model_of(args.path))
            out = weights.build_hf_model(base_model, checkpoint, args.output, dtype=args.dtype)
    return f"exported {args.path} ({args.kind}) to {out}"


def _base_model_folder(name: str) -> str | Path:
    """A local folder of the base model's weights: ``name`` itself, its HF-cache snapshot, or, on
    a machine with the backend installed, the backend's copy (built-in models such as
    ``tiny-llama`` and the offline SmolLM2 exist only there)."""
    from tinker_cookbook import weights
    from tinker_cookbook.exceptions import ConfigurationError

    try:
        return weights.base_model_folder(name)
    except ConfigurationError:
        try:
            from tinker_backend import model_registry
        except ImportError:
            raise
        return model_registry.resolve_model(name)


def _base_model_of(path: str) -> str:
    return str(_rest().get_weights_info_by_tinker_path(path).result().base_model)


def _sample(args: argparse.Namespace) -> Any:
    from tinker.types import ModelInput, SamplingParams

    service = _service()
    if args.model.startswith("tinker://"):
        sampler = service.create_sampling_client(model_path=args.model)
    else:
        sampler = service.create_sampling_client(base_model=args.model)
    tokenizer = sampler.get_tokenizer()
    prompt = ModelInput.from_ints(tokenizer.encode(args.prompt))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    response = sampler.sample(prompt, args.n, params).result()
    rows = [
        {"index": i, "stop_reason": s.stop_reason, "tokens": len(s.tokens), "text": tokenizer.decode(s.tokens)}
        for i, s in enumerate(response.sequences)
    ]
    return Table(rows, ["index", "stop_reason", "tokens", "text"])


def _model_list(args: argparse.Namespace) -> Table:
    models = _service().get_server_capabilities().result().supported_models
    return Table([_plain(m) for m in models], ["model_name"])


def _version(args: argparse.Namespace) -> dict[str, str]:
    from importlib.metadata import version

    return {"open-tinker": version("open-tinker")}


class _Progress:
    """A spinner-free progress line on stderr for the duration of a long call (a terminal only)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> _Progress:
        if sys.stderr.isatty():
            print(f"{self.what} ...", file=sys.stderr, end="", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if sys.stderr.isatty():
            print(" done" if exc[0] is None else " failed", file=sys.stderr)


# --- the parser ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    parser.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    groups = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_run_commands(groups)
    _add_checkpoint_commands(groups)
    _add_export_commands(groups)
    sample = groups.add_parser("sample", help="sample from a base model or a tinker:// sampler checkpoint")
    sample.add_argument("model", help="a base model name or tinker://<run>/sampler_weights/<name>")
    sample.add_argument("prompt")
    sample.add_argument("--max-tokens", type=int, default=32)
    sample.add_argument("--temperature", type=float, default=0.0)
    sample.add_argument("--n", type=int, default=1, help="number of samples")
    sample.add_argument("--seed", type=int, default=None)
    sample.set_defaults(run=_sample)
    model = groups.add_parser("model", help="base models").add_subparsers(metavar="ACTION", required=True)
    model.add_parser("list", help="base models this backend serves").set_defaults(run=_model_list)
    groups.add_parser("version", help="the installed version").set_defaults(run=_version)
    return parser


def _add_run_commands(groups: Any) -> None:
    run = groups.add_parser("run", help="training runs").add_subparsers(metavar="ACTION", required=True)
    listing = run.add_parser("list", help="your training runs")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--offset", type=int, default=0)
    listing.set_defaults(run=_run_list)
    for name in ("info", "show"):
        info = run.add_parser(name, help="one training run (by id or tinker:// path)")
        info.add_argument("run_ref", metavar="RUN", help="a run id or a tinker:// path in it")
        info.set_defaults(run=_run_info)


def _add_checkpoint_commands(groups: Any) -> None:
    checkpoint = groups.add_parser("checkpoint", help="checkpoints").add_subparsers(metavar="ACTION", required=True)
    listing = checkpoint.add_parser("list", help="your checkpoints, or one run's (--run-id)")
    listing.add_argument("--run-id", default=None)
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--offset", type=int, default=0)
    listing.set_defaults(run=_checkpoint_list)
    actions: list[tuple[str, str, Callable[[argparse.Namespace], Any]]] = [
        ("info", "a checkpoint's base model, rank and record", _checkpoint_info),
        ("show", "same as info", _checkpoint_info),
        ("publish", "let every API key load it", _checkpoint_action("publish")),
        ("unpublish", "make it private again", _checkpoint_action("unpublish")),
        ("delete", "delete it (its files too)", _checkpoint_action("delete")),
        ("set-ttl", "expire it TTL seconds from now ('none': never)", _checkpoint_action("set-ttl")),
        ("download", "download its files into a folder", _checkpoint_download),
    ]
    for name, help_text, run in actions:
        command = checkpoint.add_parser(name, help=help_text)
        command.add_argument("path", metavar="TINKER_PATH")
        if name == "set-ttl":
            command.add_argument("ttl", metavar="TTL")
        if name == "download":
            command.add_argument("-o", "--output", default=None, help="folder (default: named after the path)")
        command.set_defaults(run=run)


def _add_export_commands(groups: Any) -> None:
    export = groups.add_parser("export", help="weights out of the service").add_subparsers(metavar="KIND", required=True)
    for kind, help_text in (
        ("adapter", "a PEFT adapter folder that peft and vLLM load as is"),
        ("merged", "the adapter merged into a full Hugging Face model (safetensors)"),
    ):
        command = export.add_parser(kind, help=help_text)
        command.add_argument("path", metavar="TINKER_PATH")
        command.add_argument("output", metavar="OUT_DIR")
        if kind == "merged":
            command.add_argument("--base-model", default=None, help="default: the checkpoint's base model")
            command.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
        command.set_defaults(run=_export, kind=kind)


def cli() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
