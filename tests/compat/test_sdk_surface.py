"""Every public method of the official SDK's four clients, called once against our server.

``SURFACE`` says what each one does here: ``works`` (it returned, and the light check next to
the call held) or the error it ends in (an HTTP status the SDK raised, or the exception type of
a client-side failure). The test fails if any method's outcome differs, if the SDK has a public
method ``SURFACE`` does not list, or if docs/compat.md does not show this exact table; so the
table in the docs is always what the SDK meets. ``*_async`` twins send the same requests as
their plain method and are listed with it.
"""

from __future__ import annotations

import datetime
import inspect
from collections.abc import Callable
from typing import Any

import pytest

import tinker
from tinker import types
from tinker.lib.api_future_impl import QueueState

from .conftest import REPO, TINY

CLIENTS = (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient)

# "Class.method" -> (outcome here, note for the docs).
SURFACE: dict[str, tuple[str, str]] = {
    "ServiceClient.close": ("works", "ends the session (later heartbeats answer 410)"),
    "ServiceClient.copy_weights": ("404", "not served (with a project id; without one the SDK refuses first)"),
    "ServiceClient.create_custom_loss": ("works", "client-side: the server announces no server-side custom losses, so the handle runs through forward_backward_custom"),
    "ServiceClient.create_lora_training_client": ("works", ""),
    "ServiceClient.create_rest_client": ("works", ""),
    "ServiceClient.create_sampling_client": ("works", "model_path or base_model; record_stability_info"),
    "ServiceClient.create_training_client_from_state": ("works", ""),
    "ServiceClient.create_training_client_from_state_with_optimizer": ("works", ""),
    "ServiceClient.get_console_url": ("works", "client-side (a URL of the hosted console)"),
    "ServiceClient.get_server_capabilities": ("works", ""),
    "ServiceClient.get_telemetry": ("works", "client-side"),
    "TrainingClient.create_sampling_client": ("works", ""),
    "TrainingClient.forward": ("works", ""),
    "TrainingClient.forward_backward": ("works", "every loss, stable_reinforce included"),
    "TrainingClient.forward_backward_custom": ("works", "client-side loss over forward + forward_backward"),
    "TrainingClient.get_console_url": ("works", "client-side"),
    "TrainingClient.get_info": ("works", ""),
    "TrainingClient.get_telemetry": ("works", "client-side"),
    "TrainingClient.get_tokenizer": ("works", "from the local folder get_info names (loopback clients)"),
    "TrainingClient.load_state": ("works", ""),
    "TrainingClient.load_state_with_optimizer": ("works", ""),
    "TrainingClient.optim_step": ("works", "AdamW"),
    "TrainingClient.save_state": ("works", ""),
    "TrainingClient.save_weights_and_get_sampling_client": ("works", "record_stability_info; kind='inflight' served as a snapshot"),
    "TrainingClient.save_weights_external": ("works", "PEFT adapter; age_encryption_recipients is a 400"),
    "TrainingClient.save_weights_for_sampler": ("works", ""),
    "SamplingClient.compute_logprobs": ("works", ""),
    "SamplingClient.create": ("works", ""),
    "SamplingClient.from_sampler_handle": ("works", "client-side"),
    "SamplingClient.get_base_model": ("works", ""),
    "SamplingClient.get_sampler_handle": ("works", "client-side"),
    "SamplingClient.get_telemetry": ("works", "client-side"),
    "SamplingClient.get_tokenizer": ("OSError", "loads the tokenizer by model name from the Hub; tiny-llama is not there"),
    "SamplingClient.on_queue_state_change": ("works", "client-side callback"),
    "SamplingClient.sample": ("works", "see the sample request table"),
    "RestClient.assign_session_project": ("404", "no projects here"),
    "RestClient.copy_weights": ("404", "not served"),
    "RestClient.delete_checkpoint": ("works", ""),
    "RestClient.delete_checkpoint_from_tinker_path": ("works", ""),
    "RestClient.export_session_trace": ("404", "no traces here"),
    "RestClient.get_audit_log": ("404", "no audit log here"),
    "RestClient.get_billing_usage": ("404", "no billing here"),
    "RestClient.get_current_checkpoint_storage_usage": ("404", "not served (per-key limits: --max-storage-per-key)"),
    "RestClient.get_external_weights_urls": ("works", "signed URLs, 1 h"),
    "RestClient.get_sampler": ("works", ""),
    "RestClient.get_server_capabilities": ("works", ""),
    "RestClient.get_session": ("works", ""),
    "RestClient.get_telemetry": ("works", "client-side"),
    "RestClient.get_training_run": ("works", ""),
    "RestClient.get_training_run_by_tinker_path": ("works", ""),
    "RestClient.get_weights_info_by_tinker_path": ("works", ""),
    "RestClient.list_checkpoints": ("works", ""),
    "RestClient.list_sessions": ("works", ""),
    "RestClient.list_training_runs": ("works", ""),
    "RestClient.list_user_checkpoints": ("works", ""),
    "RestClient.publish_checkpoint_from_tinker_path": ("works", ""),
    "RestClient.search_sessions": ("404", "not served"),
    "RestClient.set_checkpoint_ttl_from_tinker_path": ("works", ""),
    "RestClient.unpublish_checkpoint_from_tinker_path": ("works", ""),
    "RestClient.whoami": ("RuntimeError", "the SDK needs JWT auth for it; this server takes API keys"),
}


def public_methods() -> list[str]:
    """``Class.method`` for every public callable of the four clients, ``*_async`` twins folded."""
    names = set()
    for cls in CLIENTS:
        for name, value in inspect.getmembers(cls):
            if not name.startswith("_") and callable(value):
                names.add(f"{cls.__name__}.{name.removesuffix('_async')}")
    return sorted(names)


def outcome(call: Callable[[], Any]) -> str:
    """``works`` if ``call`` (and the future it may return) succeeds; else the HTTP status, or
    the exception type of a failure that never reached the server."""
    try:
        result = call()
        if hasattr(result, "result") and callable(result.result):
            result.result(timeout=120)
    except tinker.APIStatusError as e:
        return str(e.status_code)
    except tinker.RequestFailedError as e:
        return f"failed ({e.category})"
    except Exception as e:  # a client-side failure: named by its type
        return type(e).__name__
    return "works"


def calls(service: tinker.ServiceClient) -> dict[str, Callable[[], Any]]:
    """One call per ``SURFACE`` entry, in an order where each finds what it needs."""
    rest = service.create_rest_client()
    tc = service.create_lora_training_client(TINY, rank=4, seed=0).result()
    tokenizer = tc.get_tokenizer()
    tokens = tokenizer.encode("one two three four", add_special_tokens=False)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    prompt = types.ModelInput.from_ints(tokens)
    params = types.SamplingParams(max_tokens=3, seed=0)
    state = tc.save_state("surface").result().path
    sampler_path = tc.save_weights_for_sampler("surface").result().path
    external = tc.save_weights_external("surface-ext").result().path
    sampler = tc.create_sampling_client(sampler_path).result()
    run_id = tc.model_id
    deletable = [tc.save_state(f"delete-{i}").result().path for i in range(2)]

    def sample_has_sequence_ids() -> None:
        response = sampler.sample(prompt, 2, params).result()
        assert len({s.sequence_id for s in response.sequences}) == 2

    def weighted_nll(logprobs: Any, weights: Any) -> tuple[Any, dict[str, float]]:
        return -(logprobs * weights).sum(), {}

    def custom_loss() -> None:
        handle = service.create_custom_loss(weighted_nll, {"logprobs": 1, "weights": 1}).result()
        assert tc.forward_backward_custom([datum], handle).result().metrics

    def fb_custom() -> None:
        out = tc.forward_backward_custom([datum], lambda data, logprobs: (-logprobs[0].sum(), {})).result()
        assert out.metrics

    return {
        "ServiceClient.get_server_capabilities": lambda: service.get_server_capabilities(),
        "ServiceClient.create_rest_client": lambda: rest,
        "ServiceClient.create_lora_training_client": lambda: tc,
        "ServiceClient.create_sampling_client": lambda: service.create_sampling_client(base_model=TINY),
        "ServiceClient.create_training_client_from_state": lambda: service.create_training_client_from_state(state),
        "ServiceClient.create_training_client_from_state_with_optimizer": lambda: service.create_training_client_from_state_with_optimizer(state),
        "ServiceClient.copy_weights": lambda: service.copy_weights(state),
        "ServiceClient.create_custom_loss": custom_loss,
        "ServiceClient.get_console_url": lambda: service.get_console_url(),
        "ServiceClient.get_telemetry": lambda: service.get_telemetry(),
        "TrainingClient.get_info": lambda: tc.get_info(),
        "TrainingClient.get_tokenizer": lambda: tc.get_tokenizer(),
        "TrainingClient.forward": lambda: tc.forward([datum], "cross_entropy"),
        "TrainingClient.forward_backward": lambda: tc.forward_backward([datum], "cross_entropy"),
        "TrainingClient.forward_backward_custom": fb_custom,
        "TrainingClient.optim_step": lambda: tc.optim_step(types.AdamParams(learning_rate=1e-3)),
        "TrainingClient.save_state": lambda: tc.save_state("surface-2"),
        "TrainingClient.load_state": lambda: tc.load_state(state),
        "TrainingClient.load_state_with_optimizer": lambda: tc.load_state_with_optimizer(state),
        "TrainingClient.save_weights_for_sampler": lambda: tc.save_weights_for_sampler("surface-2"),
        "TrainingClient.save_weights_and_get_sampling_client": lambda: tc.save_weights_and_get_sampling_client(record_stability_info=True),
        "TrainingClient.create_sampling_client": lambda: tc.create_sampling_client(sampler_path),
        "TrainingClient.save_weights_external": lambda: tc.save_weights_external("surface-ext-2"),
        "TrainingClient.get_console_url": lambda: tc.get_console_url(),
        "TrainingClient.get_telemetry": lambda: tc.get_telemetry(),
        "SamplingClient.sample": sample_has_sequence_ids,
        "SamplingClient.compute_logprobs": lambda: sampler.compute_logprobs(prompt),
        "SamplingClient.create": lambda: tinker.SamplingClient.create(service.holder, base_model=TINY),
        "SamplingClient.get_base_model": lambda: sampler.get_base_model(),
        "SamplingClient.get_sampler_handle": lambda: sampler.get_sampler_handle(),
        "SamplingClient.from_sampler_handle": lambda: tinker.SamplingClient.from_sampler_handle(
            sampler.get_sampler_handle()
        ).sample(prompt, 1, params),
        "SamplingClient.get_tokenizer": lambda: sampler.get_tokenizer(),
        "SamplingClient.get_telemetry": lambda: sampler.get_telemetry(),
        "SamplingClient.on_queue_state_change": lambda: sampler.on_queue_state_change(QueueState.ACTIVE, None),
        "RestClient.get_server_capabilities": lambda: rest.get_server_capabilities(),
        "RestClient.list_training_runs": lambda: rest.list_training_runs(),
        "RestClient.get_training_run": lambda: rest.get_training_run(run_id),
        "RestClient.get_training_run_by_tinker_path": lambda: rest.get_training_run_by_tinker_path(state),
        "RestClient.list_checkpoints": lambda: rest.list_checkpoints(run_id),
        "RestClient.list_user_checkpoints": lambda: rest.list_user_checkpoints(),
        "RestClient.get_weights_info_by_tinker_path": lambda: rest.get_weights_info_by_tinker_path(sampler_path),
        "RestClient.get_external_weights_urls": lambda: rest.get_external_weights_urls(external),
        "RestClient.set_checkpoint_ttl_from_tinker_path": lambda: rest.set_checkpoint_ttl_from_tinker_path(state, 7200),
        "RestClient.publish_checkpoint_from_tinker_path": lambda: rest.publish_checkpoint_from_tinker_path(state),
        "RestClient.unpublish_checkpoint_from_tinker_path": lambda: rest.unpublish_checkpoint_from_tinker_path(state),
        "RestClient.get_sampler": lambda: rest.get_sampler(sampler._sampling_session_id),
        "RestClient.list_sessions": lambda: rest.list_sessions(),
        "RestClient.get_session": lambda: rest.get_session(service.holder.get_session_id()),
        "RestClient.delete_checkpoint": lambda: rest.delete_checkpoint(run_id, deletable[0].split("/", 3)[3]),
        "RestClient.delete_checkpoint_from_tinker_path": lambda: rest.delete_checkpoint_from_tinker_path(deletable[1]),
        "RestClient.get_telemetry": lambda: rest.get_telemetry(),
        "RestClient.copy_weights": lambda: rest.copy_weights(state, "a-project"),
        "RestClient.assign_session_project": lambda: rest.assign_session_project(service.holder.get_session_id(), "p"),
        "RestClient.export_session_trace": lambda: rest.export_session_trace(service.holder.get_session_id()),
        "RestClient.get_audit_log": lambda: rest.get_audit_log(),
        "RestClient.get_billing_usage": lambda: rest.get_billing_usage(
            datetime.datetime(2026, 1, 1), datetime.datetime(2026, 2, 1)
        ),
        "RestClient.get_current_checkpoint_storage_usage": lambda: rest.get_current_checkpoint_storage_usage(),
        "RestClient.search_sessions": lambda: rest.search_sessions(types.SessionSearchRequest()),
        "RestClient.whoami": lambda: rest.whoami(),
        "ServiceClient.close": lambda: tinker.ServiceClient().close("success"),
    }


def markdown_table() -> str:
    rows = ["| method | here | notes |", "|---|---|---|"]
    for name, (result, note) in SURFACE.items():
        rows.append(f"| `{name}` | {result} | {note} |")
    return "\n".join(rows)


def test_every_public_method_is_listed() -> None:
    assert public_methods() == sorted(SURFACE)


@pytest.mark.slow
@pytest.mark.timeout(300)  # 25 s on an idle 2-core machine
def test_every_method_does_what_the_table_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_PROJECT_ID", "a-project")  # copy_weights asks for one before sending
    with tinker.ServiceClient() as service:  # base URL and API key come from the environment
        todo = calls(service)
        got = {name: outcome(call) for name, call in todo.items()}
    assert sorted(todo) == sorted(SURFACE)
    assert {name: got[name] for name in SURFACE} == {name: want for name, (want, _) in SURFACE.items()}


def test_the_docs_show_this_table() -> None:
    assert markdown_table() in (REPO / "docs" / "compat.md").read_text()

