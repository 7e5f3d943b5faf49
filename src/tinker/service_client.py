"""``ServiceClient``: the entry point. Creates training and sampling clients."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from tinker import wire
from tinker._holder import Holder, wrap
from tinker.futures import APIFuture
from tinker.sampling_client import SamplingClient
from tinker.training_client import TrainingClient
from tinker.types import GetServerCapabilitiesResponse, LoraConfig


class ServiceClient:
    """Connects to a backend: a ``tinker-server`` at ``base_url`` (or ``$TINKER_BASE_URL``), or,
    when neither is set, a backend embedded in this process. Same code, same results.

    Construction does no I/O; the session is created by the first call that needs it.

    >>> service = ServiceClient()                                   # doctest: +SKIP
    >>> tc = service.create_lora_training_client("tiny-llama", rank=8)  # doctest: +SKIP
    """

    def __init__(
        self,
        user_metadata: dict[str, str] | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"ServiceClient: unexpected keyword arguments {sorted(kwargs)}")
        self.holder = Holder(base_url=base_url, api_key=api_key, data_dir=data_dir, user_metadata=user_metadata)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """A new LoRA run on ``base_model``. The returned client is usable at once and awaitable."""
        if not isinstance(base_model, str) or not base_model:
            raise ValueError(f"base_model: expected a model name, got {base_model!r}")
        config = LoraConfig(
            rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed
        )
        model_seq = self.holder.next_model_seq()

        async def run() -> wire.ModelCreated:
            session_id = await wrap(self.holder.session_id())
            return await self.holder.call(
                wire.CreateModel(
                    session_id=session_id,
                    model_seq_id=model_seq,
                    base_model=base_model,
                    lora_config=config,
                    user_metadata=dict(user_metadata or {}),
                )
            )

        return TrainingClient(self.holder, self.holder.submit(run()))

    def create_training_client_from_state(self, path: str) -> TrainingClient:
        """A new run initialised from a ``weights`` checkpoint (adapter only, fresh optimizer)."""
        return self._from_state(path, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient:
        """A new run initialised from a ``weights`` checkpoint, adapter and optimizer state."""
        return self._from_state(path, with_optimizer=True)

    def _from_state(self, path: str, with_optimizer: bool) -> TrainingClient:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise ValueError(f"path: expected 'tinker://<run_id>/weights/<name>', got {path!r}")
        model_seq = self.holder.next_model_seq()

        async def run() -> wire.ModelCreated:
            session_id = await wrap(self.holder.session_id())
            return await self.holder.call(
                wire.CreateModelFromState(
                    session_id=session_id, model_seq_id=model_seq, path=path, with_optimizer=with_optimizer
                )
            )

        return TrainingClient(self.holder, self.holder.submit(run()))

    def create_training_client_from_adapter(
        self, base_model: str, adapter_dir: str | os.PathLike[str], user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        """A new run on ``base_model`` starting from a PEFT LoRA adapter made elsewhere (peft, TRL).

        ``adapter_dir`` is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
        on the backend's machine (a relative path is taken from this process's directory): the
        embedded backend, or a server that allows local models (``--allow-local-models``; others
        answer 403). The rank comes from the adapter; the run trains every linear of the kinds it
        targets (attention, MLP, ``lm_head``). An adapter that does not fit the model is refused
        (400) with what does not fit. Fresh optimizer; the run reloads after a server restart.
        """
        if not isinstance(base_model, str) or not base_model:
            raise ValueError(f"base_model: expected a model name, got {base_model!r}")
        if not isinstance(adapter_dir, str | os.PathLike) or not str(adapter_dir):
            raise ValueError(f"adapter_dir: expected a folder path, got {adapter_dir!r}")
        folder = os.path.abspath(os.path.expanduser(adapter_dir))
        model_seq = self.holder.next_model_seq()

        async def run() -> wire.ModelCreated:
            session_id = await wrap(self.holder.session_id())
            return await self.holder.call(
                wire.CreateModelFromAdapter(
                    session_id=session_id,
                    model_seq_id=model_seq,
                    base_model=base_model,
                    adapter_dir=folder,
                    user_metadata=dict(user_metadata or {}),
                )
            )

        return TrainingClient(self.holder, self.holder.submit(run()))

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """A sampler for a ``sampler_weights`` checkpoint, or for the plain ``base_model``;
        ``record_stability_info`` records its samples for ``stable_reinforce``."""
        return SamplingClient.create(
            self.holder, model_path=model_path, base_model=base_model, record_stability_info=record_stability_info
        )

    def get_server_capabilities(self) -> APIFuture[GetServerCapabilitiesResponse]:
        """The models this backend can train and sample."""
        return self.holder.submit(self.holder.call(wire.GetServerCapabilities()))

    def get_tokenizer(self, base_model: str) -> Any:
        """``base_model``'s tokenizer (a ``transformers`` tokenizer), from the files its backend
        sends, so that it works offline for any model the backend serves (blocks)."""
        return self.holder.get_tokenizer(base_model)

    def get_base_model_files(self, base_model: str) -> APIFuture[dict[str, bytes]]:
        """``base_model``'s tokenizer files and ``config.json``, by file name, from its backend."""

        async def run() -> dict[str, bytes]:
            reply = await self.holder.call(wire.GetTokenizer(base_model=base_model))
            return dict(reply.files)

        return self.holder.submit(run())

    def create_rest_client(self) -> Any:
        from tinker.rest_client import RestClient

        return RestClient(_holder=self.holder)

    def close(self) -> APIFuture[None]:
        return self.holder.submit(self.holder.aclose())

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close().result()

    # Deprecated *_async twins of the Tinker SDK.
    async def create_lora_training_client_async(self, *args: Any, **kwargs: Any) -> TrainingClient:
        return await self.create_lora_training_client(*args, **kwargs)

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any) -> SamplingClient:
        return await self.create_sampling_client(*args, **kwargs)
