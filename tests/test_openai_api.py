"""The OpenAI-compatible door of ``tinker-server``, driven by the official ``openai`` package.

One real server on loopback with two API keys; a LoRA run of key A memorises a phrase and
saves a sampler checkpoint, which then answers on ``/v1/completions`` (and key B gets 404).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import TINY, ServerProcess

import tinker
from tinker import AdamParams, Datum, ModelInput

KEY_A = "tml-openai-a-" + "a" * 20
KEY_B = "tml-openai-b-" + "b" * 20
PHRASE = "the quick brown fox jumps over the lazy dog"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("openai-server") / "data", "--api-key", KEY_A, "--api-key", KEY_B)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def service(server: ServerProcess) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A)
    yield client
    client.close().result(timeout=30)


@pytest.fixture(scope="module")
def tokenizer(service: tinker.ServiceClient) -> Any:
    return service.get_tokenizer(TINY)


@pytest.fixture(scope="module")
def memorised(service: tinker.ServiceClient, tokenizer: Any) -> str:
    """The ``tinker://`` sampler path of a run of key A trained to say ``PHRASE`` after BOS."""
    tc = service.create_lora_training_client(TINY, rank=8, seed=0)
    full = [tokenizer.bos_token_id, *tokenizer.encode(PHRASE, add_special_tokens=False)]
    datum = Datum(
        model_input=ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
    )
    for _ in range(40):
        fb = tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(AdamParams(learning_rate=5e-3)).result()
        fb.result()
    return str(tc.save_weights_for_sampler("memo").result().path)


def client(server: ServerProcess, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def async_client(server: ServerProcess, key: str = KEY_A) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def raw_post(url: str, body: dict[str, Any], key: str | None = KEY_A) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON without the ``openai`` client: the status and the JSON answer."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat_prompt_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- completions ---------------------------------------------------------------------------------


def test_completions_n_seed_usage_and_length(server: ServerProcess, tokenizer: Any) -> None:
    oai = client(server)
    kwargs: dict[str, Any] = {"model": TINY, "prompt": "the quick brown", "max_tokens": 8, "n": 2, "seed": 7}
    first = oai.completions.create(**kwargs, logprobs=0)
    again = oai.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # the n choices are distinct samples
    assert [c.finish_reason for c in first.choices] == ["length", "length"]
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage is not None
    assert first.usage.prompt_tokens == len(tokenizer("the quick brown")["input_ids"])
    assert first.usage.completion_tokens == 16
    assert first.usage.total_tokens == first.usage.prompt_tokens + 16
    logprobs = first.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert len(logprobs.token_logprobs) == 8 and all(lp < 0 for lp in logprobs.token_logprobs)
    assert "".join(logprobs.tokens or []) == first.choices[0].text


def test_completions_stop_string_cuts_the_text(server: ServerProcess) -> None:
    oai = client(server)
    kwargs: dict[str, Any] = {"model": TINY, "prompt": [1, 2, 3], "max_tokens": 40, "seed": 3}
    free = oai.completions.create(**kwargs).choices[0].text
    found = re.search(r"[a-z]{3}", free[4:])
    assert found is not None, free
    stop = found.group(0)
    stopped = oai.completions.create(**kwargs, stop=[stop, "never-seen"]).choices[0]
    assert stopped.text == free[: free.index(stop)]
    assert stopped.finish_reason == "stop"


def test_completions_list_of_prompts(server: ServerProcess, tokenizer: Any) -> None:
    out = client(server).completions.create(model=TINY, prompt=["one", "two three"], max_tokens=3, n=2, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(tokenizer("one")["input_ids"]) + len(tokenizer("two three")["input_ids"])
    assert out.usage.completion_tokens == 12


def test_completions_stream_equals_the_plain_answer(server: ServerProcess) -> None:
    oai = client(server)
    kwargs: dict[str, Any] = {"model": TINY, "prompt": "over the", "max_tokens": 12, "n": 2, "seed": 11}
    plain = oai.completions.create(**kwargs)
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason or finish[choice.index]
        usage = chunk.usage or usage
    assert texts == [c.text for c in plain.choices]
    assert finish == ["length", "length"]
    assert usage == plain.usage


# --- chat ----------------------------------------------------------------------------------------


async def test_chat_async_matches_sync_and_shares_the_sampler(server: ServerProcess, tokenizer: Any) -> None:
    kwargs: dict[str, Any] = {"model": TINY, "messages": CHAT, "max_tokens": 10, "n": 2, "seed": 5, "logprobs": True}
    aoai = async_client(server)
    answers = await asyncio.gather(*(aoai.chat.completions.create(**kwargs) for _ in range(4)))  # batched together
    await aoai.close()
    sync = client(server).chat.completions.create(**kwargs)
    texts = [c.message.content for c in sync.choices]
    assert all([c.message.content for c in a.choices] == texts for a in answers)
    assert sync.choices[0].message.role == "assistant"
    assert sync.usage is not None
    assert sync.usage.prompt_tokens == chat_prompt_length(tokenizer, CHAT)
    # Every generated token counts: the content's, plus the end-of-turn token of a reply that stopped.
    generated = [len(c.logprobs.content or []) + (c.finish_reason == "stop") for c in sync.choices]  # type: ignore[union-attr]
    assert sync.usage.completion_tokens == sum(generated)
    assert sync.usage.total_tokens == sync.usage.prompt_tokens + sync.usage.completion_tokens


async def test_chat_stream_sync_and_async(server: ServerProcess) -> None:
    kwargs: dict[str, Any] = {"model": TINY, "messages": CHAT, "max_tokens": 9, "seed": 21}
    plain = client(server).chat.completions.create(**kwargs)
    pieces, finish, usage = [], None, None
    for chunk in client(server).chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage == plain.usage
    aoai = async_client(server)
    stream = await aoai.chat.completions.create(**kwargs, stream=True)
    async_text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await aoai.close()
    assert async_text == plain.choices[0].message.content


def test_chat_logprobs_with_alternatives(server: ServerProcess) -> None:
    out = client(server).chat.completions.create(
        model=TINY, messages=CHAT, max_tokens=6, seed=2, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for entry in content:
        alternatives = [a.logprob for a in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob <= alternatives[0] + 1e-4  # the best alternative is at least as likely
        for a in entry.top_logprobs:
            if a.token == entry.token:
                assert a.logprob == pytest.approx(entry.logprob, abs=1e-4)


# --- trained checkpoints, models, ownership ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_trained_checkpoint_answers_with_what_it_learnt(server: ServerProcess, memorised: str, tokenizer: Any) -> None:
    oai = client(server)
    length = len(tokenizer.encode(PHRASE, add_special_tokens=False))
    kwargs: dict[str, Any] = {"prompt": "<|endoftext|>", "max_tokens": length, "temperature": 0}
    trained = oai.completions.create(model=memorised, **kwargs).choices[0].text
    base = oai.completions.create(model=TINY, **kwargs).choices[0].text
    assert trained == PHRASE
    assert base != PHRASE
    chat = oai.chat.completions.create(model=memorised, messages=CHAT, max_tokens=4)
    assert chat.model == memorised and chat.choices[0].message.content is not None

    ids = [m.id for m in oai.models.list()]
    assert TINY in ids and memorised in ids
    assert oai.models.retrieve(memorised).owned_by == "key-" + tinker_key_id(KEY_A)
    other = client(server, KEY_B)
    assert memorised not in [m.id for m in other.models.list()]
    with pytest.raises(openai.NotFoundError) as caught:
        other.completions.create(model=memorised, **kwargs)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"  # type: ignore[index]
    weights = memorised.replace("/sampler_weights/", "/weights/")
    with pytest.raises(openai.BadRequestError, match="sampler_weights"):
        oai.completions.create(model=weights, **kwargs)

    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY_A)
    rest.publish_checkpoint_from_tinker_path(memorised).result()  # now any key may sample it
    assert other.completions.create(model=memorised, **kwargs).choices[0].text == PHRASE
    rest.unpublish_checkpoint_from_tinker_path(memorised).result()
    with pytest.raises(openai.APIStatusError) as gone:  # its loaded sampler answers 410, a new one 404
        other.completions.create(model=memorised, **kwargs)
    assert gone.value.status_code in (404, 410)
    rest.close().result(timeout=30)


def tinker_key_id(key: str) -> str:
    from tinker_backend.auth import key_id

    return key_id(key)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 0}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 9}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": ""}, "prompt"),
        ({"n": "two"}, "n"),
    ],
)
def test_bad_completion_input_is_a_400_naming_the_field(server: ServerProcess, change: dict[str, Any], param: str) -> None:
    body = {"model": TINY, "prompt": "hi", "max_tokens": 2, **change}
    status, answer = raw_post(f"{server.base_url}/v1/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param), error


def test_bad_chat_input_through_the_client(server: ServerProcess) -> None:
    oai = client(server)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        oai.chat.completions.create(model=TINY, messages=CHAT, logprobs=True, top_logprobs=50)
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai.chat.completions.create(model=TINY, messages=[])
    with pytest.raises(openai.NotFoundError, match="model: unknown model"):
        oai.chat.completions.create(model="no-such-model", messages=CHAT)


def test_unknown_model_and_missing_key(server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(server).completions.create(model="no-such-model", prompt="hi")
    assert caught.value.status_code == 404 and caught.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        client(server, "tml-wrong").models.list()
    status, answer = raw_post(f"{server.base_url}/v1/chat/completions", {"model": TINY, "messages": CHAT}, None)
    assert status == 401
    assert answer["error"]["code"] == "invalid_api_key" and answer["error"]["message"].startswith("Authorization")
