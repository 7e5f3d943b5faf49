"""``RestClient``: runs and checkpoints (listing, inspecting, deleting)."""

from __future__ import annotations

import os

from tinker import wire
from tinker._holder import Holder
from tinker.futures import APIFuture
from tinker.types import (
    CheckpointsListResponse,
    GetServerCapabilitiesResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)


class RestClient:
    """Read and manage runs and checkpoints. Needs no session; every method returns an ``APIFuture``."""

    def __init__(
        self,
        _holder: Holder | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._holder = _holder or Holder(base_url=base_url, api_key=api_key, data_dir=data_dir)

    def _call(self, request: object) -> APIFuture:
        return self._holder.submit(self._holder.call(request))

    def get_server_capabilities(self) -> APIFuture[GetServerCapabilitiesResponse]:
        return self._call(wire.GetServerCapabilities())

    def list_training_runs(self, limit: int = 20, offset: int = 0) -> APIFuture[TrainingRunsResponse]:
        return self._call(wire.ListTrainingRuns(limit=limit, offset=offset))

    def get_training_run(self, training_run_id: str) -> APIFuture[TrainingRun]:
        return self._call(wire.GetTrainingRun(training_run_id=training_run_id))

    def get_training_run_by_tinker_path(self, tinker_path: str) -> APIFuture[TrainingRun]:
        run_id = tinker_path.removeprefix("tinker://").split("/", 1)[0]
        return self.get_training_run(run_id)

    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        return self._call(wire.ListCheckpoints(training_run_id=training_run_id))

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[CheckpointsListResponse]:
        return self._call(wire.ListUserCheckpoints(limit=limit, offset=offset))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._call(wire.DeleteCheckpoint(tinker_path=tinker_path)).map(lambda _: None)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        return self.delete_checkpoint_from_tinker_path(f"tinker://{training_run_id}/{checkpoint_id}")

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        return self._call(wire.GetWeightsInfo(tinker_path=tinker_path))
