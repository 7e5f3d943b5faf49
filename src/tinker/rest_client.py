"""``RestClient``: training runs, checkpoints and sessions as records (list, inspect, share, delete).

The Tinker SDK 0.38 ``RestClient``'s methods, names and semantics, on the native protocol, plus
``download_checkpoint`` (ours). Every method returns an ``APIFuture`` at once::

    rest = service_client.create_rest_client()
    runs = rest.list_training_runs(limit=10).result()          # sync
    ckpts = await rest.list_checkpoints(run_id)                 # async
    rest.publish_checkpoint_from_tinker_path(path).result()     # any API key may now load it
    rest.download_checkpoint(path, "out/").result()             # the files, in out/

Sharing: a published checkpoint can be loaded (sampled, or used to start a training run) by any
API key; only its owner may delete, publish, unpublish it or set its TTL. ``access_scope`` is
accepted; this server has no shared runs, so ``"accessible"`` lists what ``"owned"`` does.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
from typing import Literal

from tinker import wire
from tinker._holder import Holder
from tinker.futures import APIFuture
from tinker.types import (
    CheckpointsListResponse,
    ExternalWeightsUrlsResponse,
    GetServerCapabilitiesResponse,
    GetSessionResponse,
    ListSessionsResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from tinker.validation import InvalidInput, check_ttl, parse_tinker_path

AccessScope = Literal["owned", "accessible"]


class RestClient:
    """Read and manage runs, checkpoints and sessions. Needs no session."""

    def __init__(
        self,
        _holder: Holder | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._owns_holder = _holder is None  # one from ServiceClient.create_rest_client is the service's
        self._holder = _holder or Holder(base_url=base_url, api_key=api_key, data_dir=data_dir)

    def close(self) -> APIFuture[None]:
        """Close its connection; one it shares with a ``ServiceClient`` stays open for it."""

        async def close() -> None:
            if self._owns_holder:
                await self._holder.aclose()

        return self._holder.submit(close())

    def _call(self, request: object) -> APIFuture:
        return self._holder.submit(self._holder.call(request))

    def _empty(self, request: object) -> APIFuture[None]:
        return self._call(request).map(lambda _: None)

    # --- runs ---

    def get_server_capabilities(self) -> APIFuture[GetServerCapabilitiesResponse]:
        return self._call(wire.GetServerCapabilities())

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned", project_id: str | None = None
    ) -> APIFuture[TrainingRunsResponse]:
        """The caller's runs, newest first, ``limit`` from ``offset`` (``cursor.total_count``: all)."""
        _check_scope(access_scope)
        if project_id is not None:
            raise InvalidInput("project_id", "None (this server has no projects)", project_id)
        return self._call(wire.ListTrainingRuns(limit=limit, offset=offset))

    def get_training_run(self, training_run_id: str, access_scope: AccessScope = "owned") -> APIFuture[TrainingRun]:
        _check_scope(access_scope)
        return self._call(wire.GetTrainingRun(training_run_id=training_run_id))

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: AccessScope = "owned"
    ) -> APIFuture[TrainingRun]:
        run_id, _, _ = parse_tinker_path(tinker_path, field="tinker_path")
        return self.get_training_run(run_id, access_scope)

    # --- checkpoints ---

    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        """Every live checkpoint of one of the caller's runs, oldest first."""
        return self._call(wire.ListCheckpoints(training_run_id=training_run_id))

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[CheckpointsListResponse]:
        """The caller's checkpoints across all runs, newest first, ``limit`` from ``offset``."""
        return self._call(wire.ListUserCheckpoints(limit=limit, offset=offset))

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        return self._call(wire.GetWeightsInfo(tinker_path=tinker_path))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Delete it (owner only); a sampler loaded from it answers 410 from then on."""
        return self._empty(wire.DeleteCheckpoint(tinker_path=tinker_path))

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """``checkpoint_id`` is ``<kind>/<name>``, e.g. ``weights/final``."""
        return self.delete_checkpoint_from_tinker_path(f"tinker://{training_run_id}/{checkpoint_id}")

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Let any API key load, sample or download it (owner only)."""
        return self._empty(wire.PublishCheckpoint(tinker_path=tinker_path, published=True))

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Make it the owner's alone again; other keys' samplers of it answer 410 from then on."""
        return self._empty(wire.PublishCheckpoint(tinker_path=tinker_path, published=False))

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> APIFuture[None]:
        """Expire it ``ttl_seconds`` (3600 s to 10 years) from now; ``None`` keeps it forever."""
        check_ttl(ttl_seconds)
        return self._empty(wire.SetCheckpointTtl(tinker_path=tinker_path, ttl_seconds=ttl_seconds))

    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[ExternalWeightsUrlsResponse]:
        """Signed URLs, one per file of an ``external_weights`` checkpoint (from
        ``TrainingClient.save_weights_external``), valid until ``expires``; fetching them needs
        no API key. An embedded backend has no HTTP server: use ``download_checkpoint``."""
        parse_tinker_path(tinker_path, kind="external_weights", field="tinker_path")
        base_url = self._holder.base_url
        if base_url is not None:  # the URLs are plain HTTP(S), whatever scheme reached the server
            base_url = base_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
        return self._call(wire.GetExternalWeightsUrls(tinker_path=tinker_path, base_url=base_url))

    def download_checkpoint(self, tinker_path: str, out_dir: str | os.PathLike[str]) -> APIFuture[pathlib.Path]:
        """Write the files of any checkpoint the caller may read (its own, or a published one)
        into ``out_dir`` (made if missing); the future's value is ``out_dir``."""
        parse_tinker_path(tinker_path, field="tinker_path")
        target = pathlib.Path(out_dir)

        async def download() -> pathlib.Path:
            answer: wire.CheckpointFiles = await self._holder.call(wire.DownloadCheckpoint(tinker_path=tinker_path))
            await asyncio.to_thread(_write_files, target, answer.files)
            return target

        return self._holder.submit(download())

    # --- sessions ---

    def list_sessions(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
    ) -> APIFuture[ListSessionsResponse]:
        """The caller's session ids, newest first."""
        _check_scope(access_scope)
        return self._call(wire.ListSessions(limit=limit, offset=offset))

    def get_session(self, session_id: str, access_scope: AccessScope = "owned") -> APIFuture[GetSessionResponse]:
        """The session's training run ids and sampler ids, and its metadata."""
        _check_scope(access_scope)
        return self._call(wire.GetSession(session_id=session_id))


def _check_scope(access_scope: str) -> None:
    if access_scope not in ("owned", "accessible"):
        raise InvalidInput("access_scope", "'owned' or 'accessible'", access_scope)


def _write_files(target: pathlib.Path, files: dict[str, bytes]) -> None:
    root = target.resolve()
    for name, data in files.items():
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise InvalidInput("files", "paths inside the checkpoint's folder", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    target.mkdir(parents=True, exist_ok=True)
