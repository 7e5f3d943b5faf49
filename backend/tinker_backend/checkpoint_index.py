"""Checkpoint housekeeping: saves, lookups by ``tinker://`` path, TTLs, deletion, recovery.

Rows live in the store; files under ``<data_dir>/checkpoints/<run>/<kind>/<name>.<nonce>``
(rows hold paths relative to the data dir; older ones absolute). Each save writes a new
directory and then points the row at it, so a save that dies half-way leaves the previous
checkpoint of that name intact, and an orphan directory that :meth:`CheckpointIndex.recover`
removes at the next start. Expired checkpoints are invisible from their expiry on; the sweep
(:meth:`delete_expired`) only reclaims the disk.

Who may do what: a checkpoint is its owner's. A *published* one may also be read (loaded into a
run, sampled, downloaded, its weights info) by any API key; only the owner may delete it,
publish or unpublish it, or set its TTL (:meth:`CheckpointIndex.lookup` with ``owned=True``).
Anyone else gets 404, as for a checkpoint that does not exist.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import msgspec

from tinker import wire
from tinker.types import (
    Checkpoint,
    ExternalWeightsUrlsResponse,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)
from tinker.validation import check_checkpoint_name, check_ttl, parse_tinker_path
from tinker_backend.engine.protocol import Engine
from tinker_backend.errors import ServiceError
from tinker_backend.files_api import URL_TTL_S, UrlSigner
from tinker_backend.store import CheckpointRecord, RunRecord, Store, iso_in, now_iso

logger = logging.getLogger("tinker_backend")

SaveResponse: TypeAlias = SaveWeightsResponse | SaveWeightsForSamplerResponse | SaveWeightsExternalResponse
_CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


class CheckpointIndex:
    """The checkpoints of one data dir: what each ``tinker://`` path names, and its files."""

    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        self._dir_lock = open(data_dir / ".lock", "a+b")  # held (shared) until close()
        self.signer = UrlSigner(data_dir)

    def directory(self, record: CheckpointRecord) -> Path:
        """A checkpoint's files."""
        return self.data_dir / record.directory

    def lookup(
        self, tinker_path: str, owner: str, kind: str | None = None, *, owned: bool = False
    ) -> CheckpointRecord:
        """The checkpoint at ``tinker_path`` if ``owner`` may read it: theirs, or published (only
        theirs with ``owned=True``). 400 for a malformed path, 404 if unknown to ``owner``."""
        run_id, path_kind, name = parse_tinker_path(tinker_path, kind)
        record = self.store.get_checkpoint(run_id, path_kind, name)
        if record is None or not (record.owner == owner or (record.published and not owned)):
            raise ServiceError(404, f"path: unknown checkpoint {tinker_path!r}")
        return record

    def base_model(self, record: CheckpointRecord) -> str:
        """The base model of the run that saved ``record``."""
        run = self.store.get_run(record.run_id)
        if run is None:
            raise ServiceError(404, f"path: the training run of {record.tinker_path!r} is gone")
        return run.base_model

    def check_still_readable(self, tinker_path: str, owner: str, what: str) -> None:
        """410 for ``what`` (``"sampling_session_id: sampler 'x'"``, say), loaded from a checkpoint
        that ``owner`` can no longer read: deleted, expired, or (someone else's) unpublished."""
        try:
            self.lookup(tinker_path, owner)
        except ServiceError as e:
            raise ServiceError(
                410, f"{what} was loaded from {tinker_path!r}, which was deleted, has expired or was unpublished"
            ) from e

    def files(self, record: CheckpointRecord) -> list[str]:
        """The checkpoint's file paths, relative to its folder (sorted)."""
        folder = self.directory(record)
        return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())

    def signed_urls(self, record: CheckpointRecord, base_url: str | None) -> ExternalWeightsUrlsResponse:
        """One signed URL per file, valid for ``files_api.URL_TTL_S``."""
        expires = int(time.time()) + URL_TTL_S
        urls = {f: self.signer.url(record.tinker_path, f, expires, base_url) for f in self.files(record)}
        return ExternalWeightsUrlsResponse(urls=urls, expires=dt.datetime.fromtimestamp(expires, dt.UTC).isoformat())

    def read_files(self, record: CheckpointRecord) -> dict[str, bytes]:
        folder = self.directory(record)
        return {f: (folder / f).read_bytes() for f in self.files(record)}

    def save_work(
        self, run: RunRecord, kind: str, name: str, ttl_seconds: int | None, seq_id: int
    ) -> Callable[[Engine], SaveResponse]:
        """The compute-thread work of ``save_state`` (``kind="weights"``, with the optimizer), a
        named ``save_weights_for_sampler`` (``"sampler_weights"``) or ``save_weights_external``
        (``"external_weights"``: PEFT files, as sampler weights), validated now."""
        check_checkpoint_name(name)
        check_ttl(ttl_seconds)
        relative = Path("checkpoints", run.run_id.replace(":", "_"), kind, f"{name}.{uuid.uuid4().hex[:12]}")
        directory = self.data_dir / relative
        path = f"tinker://{run.run_id}/{kind}/{name}"

        def work(engine: Engine) -> SaveResponse:
            if kind == "weights":
                engine.save_state(run.run_id, directory, include_optimizer=True)
            else:
                engine.save_sampler_weights(run.run_id, directory)
            size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
            expires_at = None if ttl_seconds is None else iso_in(ttl_seconds)
            previous = self.store.checkpoint_directory(run.run_id, kind, name)
            self.store.put_checkpoint(
                CheckpointRecord(run.run_id, kind, name, run.owner, str(relative), now_iso(), size, expires_at, seq_id)
            )
            if previous is not None:  # the name now points at the new directory
                shutil.rmtree(self.data_dir / previous, ignore_errors=True)
            if kind == "weights":
                return SaveWeightsResponse(path=path)
            if kind == "external_weights":
                return SaveWeightsExternalResponse(path=path, size_bytes=size)
            return SaveWeightsForSamplerResponse(path=path)

        return work

    async def delete(self, tinker_path: str, owner: str) -> None:
        record = self.lookup(tinker_path, owner, owned=True)
        self.store.delete_checkpoint(record.run_id, record.kind, record.name)
        await asyncio.to_thread(shutil.rmtree, self.directory(record), True)

    def set_ttl(self, tinker_path: str, owner: str, ttl_seconds: int | None) -> None:
        """Expire the checkpoint ``ttl_seconds`` from now (None: never)."""
        record = self.lookup(tinker_path, owner, owned=True)
        check_ttl(ttl_seconds)
        expires_at = (
            None if ttl_seconds is None else (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl_seconds)).isoformat()
        )
        self.store.put_checkpoint(msgspec.structs.replace(record, expires_at=expires_at))

    def set_published(self, tinker_path: str, owner: str, published: bool) -> None:
        record = self.lookup(tinker_path, owner, owned=True)
        self.store.put_checkpoint(msgspec.structs.replace(record, published=published))

    def delete_expired(self) -> int:
        expired = self.store.expired_checkpoints()
        for record in expired:
            if self.store.delete_checkpoint(record.run_id, record.kind, record.name, record.directory):
                shutil.rmtree(self.directory(record), ignore_errors=True)
        return len(expired)

    def recover(self) -> None:
        """At startup: futures that were in flight died with the last process; checkpoint
        directories that no row points at (saves that died half-way) are removed.

        Only when no other process has this data dir open (two embedded backends may share
        one): the lock file is held exclusively for the recovery, then shared until close.
        """
        try:
            fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._dir_lock, fcntl.LOCK_SH)
            return
        try:
            self._recover_alone()
        finally:
            fcntl.flock(self._dir_lock, fcntl.LOCK_SH)

    def _recover_alone(self) -> None:
        lost = self.store.mark_pending_futures_lost()
        referenced = {(self.data_dir / d).resolve() for d in self.store.checkpoint_directories()}
        orphans = [
            d for d in (self.data_dir / "checkpoints").glob("*/*/*") if d.is_dir() and d.resolve() not in referenced
        ]
        for directory in orphans:
            shutil.rmtree(directory, ignore_errors=True)
        self.delete_expired()
        if lost or orphans:
            logger.info(
                "recovered: %d futures marked lost, %d unfinished checkpoint directories removed", lost, len(orphans)
            )

    def close(self) -> None:
        self._dir_lock.close()


def as_checkpoint(record: CheckpointRecord) -> Checkpoint:
    """The public ``Checkpoint`` of a row."""
    return Checkpoint(
        checkpoint_id=f"{record.kind}/{record.name}",
        checkpoint_type=_CHECKPOINT_TYPES[record.kind],  # type: ignore[arg-type]
        time=record.created_at,
        tinker_path=record.tinker_path,
        size_bytes=record.size_bytes,
        public=record.published,
        expires_at=record.expires_at,
    )


def save_answer(record: CheckpointRecord, request: Any) -> Any:
    """The answer of a save that ran before a restart, rebuilt from its row (None if it cannot be)."""
    if isinstance(request, wire.SaveState) and record.kind == "weights":
        return SaveWeightsResponse(path=record.tinker_path)
    if isinstance(request, wire.SaveWeightsForSampler) and request.name is not None:
        return SaveWeightsForSamplerResponse(path=record.tinker_path)
    if isinstance(request, wire.SaveWeightsExternal) and record.kind == "external_weights":
        return SaveWeightsExternalResponse(path=record.tinker_path, size_bytes=record.size_bytes)
    return None
