"""Renderers against the tokenizers' own chat templates, and round trips through parse_response.

ChatML is checked against the templates the tiny model and SmolLM2 ship. Llama 3 and Qwen3
tokenizers are not available offline, so their official templates (the non-tool parts,
transcribed below) are rendered by ``apply_chat_template(chat_template=...)`` on the tiny
tokenizer extended with those models' special tokens.
"""

from __future__ import annotations

import copy

import pytest

from tinker_cookbook.exceptions import ConfigurationError, RendererError
from tinker_cookbook.renderers import TrainOnWhat, get_recommended_renderer_name, get_renderer

from .conftest import SMOLLM2

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

QWEN3_TEMPLATE = """
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
  {%- if message.role == 'user' %}{%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}{%- break %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
  {%- set content = message.content %}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
  {%- elif message.role == 'assistant' %}
    {%- set reasoning_content = '' %}
    {%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}
    {%- elif '</think>' in content %}
      {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
    {%- else %}
      {{- '<|im_start|>assistant\\n' + content }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour,\nplease."},
        {"role": "assistant", "content": " Blue, of course. "},
    ],
]


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def drop_trailing_newline(tokenizer, ids: list[int]) -> list[int]:
    """Templates end a conversation with '<|im_end|>\\n'; renderers put that newline on the next header."""
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert ids[-len(newline):] == newline
    return ids[: -len(newline)]


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tok.bos_token = "<|begin_of_text|>"
    return tok


@pytest.fixture(scope="module")
def qwen3_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens(["<think>", "</think>"])
    return tok


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_matches_tiny_template(tiny_tokenizer, messages):
    renderer = get_renderer("chatml", tiny_tokenizer)
    model_input, weights = renderer.build_supervised_example(messages)
    assert model_input.to_ints() == drop_trailing_newline(tiny_tokenizer, template_ids(tiny_tokenizer, messages))
    prompt = renderer.build_generation_prompt(messages[:-1])
    assert prompt.to_ints() == template_ids(tiny_tokenizer, messages[:-1], add_generation_prompt=True)
    # The trained tokens are exactly the last reply and its end marker.
    trained = [t for t, w in zip(model_input.to_ints(), weights, strict=True) if w == 1.0]
    assert tiny_tokenizer.decode(trained) == messages[-1]["content"] + "<|im_end|>"


@pytest.mark.smollm2
@pytest.mark.parametrize("messages", [CONVERSATIONS[0], CONVERSATIONS[1]])
def test_smollm2_matches_its_template(messages):
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    tokenizer = get_tokenizer(SMOLLM2)
    renderer = get_renderer(get_recommended_renderer_name(SMOLLM2), tokenizer)
    model_input, _ = renderer.build_supervised_example(messages)
    # Without a system message SmolLM2's template inserts its default one; so does the renderer.
    assert model_input.to_ints() == drop_trailing_newline(tokenizer, template_ids(tokenizer, messages))
    prompt = renderer.build_generation_prompt(messages[:-1])
    assert prompt.to_ints() == template_ids(tokenizer, messages[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_llama3_matches_official_template(llama3_tokenizer, messages):
    renderer = get_renderer("llama3", llama3_tokenizer)
    model_input, weights = renderer.build_supervised_example(messages)
    expected = llama3_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=LLAMA3_TEMPLATE)
    assert llama3_tokenizer.decode(model_input.to_ints()) == expected
    prompt = renderer.build_generation_prompt(messages[:-1])
    expected_prompt = llama3_tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=LLAMA3_TEMPLATE
    )
    assert llama3_tokenizer.decode(prompt.to_ints()) == expected_prompt
    trained = [t for t, w in zip(model_input.to_ints(), weights, strict=True) if w == 1.0]
    assert llama3_tokenizer.decode(trained) == messages[-1]["content"].strip() + "<|eot_id|>"


QWEN3_CONVERSATIONS = [
    *CONVERSATIONS,
    [  # reasoning before the last user message is dropped; after it, kept
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n2"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n4"},
    ],
]


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("messages", QWEN3_CONVERSATIONS)
def test_qwen3_matches_official_template(qwen3_tokenizer, messages, enable_thinking):
    name = "qwen3" if enable_thinking else "qwen3_disable_thinking"
    renderer = get_renderer(name, qwen3_tokenizer)
    kwargs = {"chat_template": QWEN3_TEMPLATE, "enable_thinking": enable_thinking}
    model_input, _ = renderer.build_supervised_example(messages)
    expected = qwen3_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert qwen3_tokenizer.decode(model_input.to_ints()) + "\n" == expected
    if enable_thinking:
        # With thinking disabled the renderer ends the header with "\n\n" and encodes the reply
        # apart; Qwen's pre-tokenizer splits newline runs from the text after them, so the ids
        # match there too, but the tiny (GPT-2 style) tokenizer merges differently.
        assert model_input.to_ints() + qwen3_tokenizer.encode("\n") == template_ids(qwen3_tokenizer, messages, **kwargs)
    prompt = renderer.build_generation_prompt(messages[:-1])
    expected_prompt = qwen3_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **kwargs)
    assert qwen3_tokenizer.decode(prompt.to_ints()) == expected_prompt


def test_qwen3_thinking_weights_and_parse(qwen3_tokenizer):
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "thinking": "easy"}]
    thinking = get_renderer("qwen3", qwen3_tokenizer)
    model_input, weights = thinking.build_supervised_example(messages)
    trained = [t for t, w in zip(model_input.to_ints(), weights, strict=True) if w]
    assert qwen3_tokenizer.decode(trained) == "<think>\neasy\n</think>\n\n2<|im_end|>"
    reply, ok = thinking.parse_response(trained)
    assert ok and reply == {"role": "assistant", "content": "2", "thinking": "easy"}
    # With thinking disabled the (empty) block is prefilled and not trained on.
    direct = get_renderer("qwen3_disable_thinking", qwen3_tokenizer)
    model_input, weights = direct.build_supervised_example([messages[0], {"role": "assistant", "content": "2"}])
    trained = [t for t, w in zip(model_input.to_ints(), weights, strict=True) if w]
    assert qwen3_tokenizer.decode(trained) == "2<|im_end|>"
    assert qwen3_tokenizer.decode(direct.build_generation_prompt(messages[:1]).to_ints()).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_train_on_what(tiny_tokenizer):
    renderer = get_renderer("chatml", tiny_tokenizer)
    messages = CONVERSATIONS[1]

    def trained_text(what, msgs=messages):
        model_input, weights = renderer.build_supervised_example(msgs, what)
        runs, current = [], []
        for token, w in zip(model_input.to_ints(), weights, strict=True):
            if w:
                current.append(token)
            elif current:
                runs.append(tiny_tokenizer.decode(current))
                current = []
        return runs + ([tiny_tokenizer.decode(current)] if current else [])

    assert trained_text(TrainOnWhat.ALL_ASSISTANT_MESSAGES) == ["Hello!<|im_end|>", " Blue, of course. <|im_end|>"]
    assert trained_text(TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES) == [
        "Be brief.<|im_end|>", "Hi there<|im_end|>", "Name a colour,\nplease.<|im_end|>"
    ]
    assert len(trained_text(TrainOnWhat.ALL_MESSAGES)) == 5
    custom = [dict(m, trainable=(i == 2)) for i, m in enumerate(messages)]
    assert trained_text(TrainOnWhat.CUSTOMIZED, custom) == ["Hello!<|im_end|>"]
    model_input, weights = renderer.build_supervised_example(messages, TrainOnWhat.ALL_TOKENS)
    assert all(weights) and len(weights) == model_input.length
    with pytest.raises(RendererError, match="assistant message last"):
        renderer.build_supervised_example(messages[:-1])


def test_chatml_sampled_reply_extends_into_next_prompt(tiny_tokenizer):
    """A reply that stops at <|im_end|> is a prefix of the next turn's prompt (multi-turn RL merges them)."""
    renderer = get_renderer("chatml", tiny_tokenizer)
    history = [{"role": "user", "content": "Hi"}]
    prompt = renderer.build_generation_prompt(history).to_ints()
    sampled = tiny_tokenizer.encode("Hello, friend.", add_special_tokens=False) + renderer.get_stop_sequences()
    reply, ok = renderer.parse_response(sampled)
    assert ok and reply == {"role": "assistant", "content": "Hello, friend."}
    following = renderer.build_generation_prompt([*history, reply, {"role": "user", "content": "Bye"}]).to_ints()
    assert following[: len(prompt) + len(sampled)] == prompt + sampled
    # Out of tokens before the stop token: not a clean stop.
    assert renderer.parse_response(sampled[:-1]) == (reply, False)


def test_role_colon(tiny_tokenizer):
    renderer = get_renderer("role_colon", tiny_tokenizer)
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "Hi"}])
    assert tiny_tokenizer.decode(prompt.to_ints()) == "<|endoftext|>User: Hi\n\nAssistant:"
    reply, ok = renderer.parse_response(tiny_tokenizer.encode(" Hello there\n\nUser:", add_special_tokens=False))
    assert ok and reply["content"] == "Hello there"
    assert renderer.get_stop_sequences() == ["\n\nUser:"]


def test_registry_errors_name_the_field(tiny_tokenizer):
    with pytest.raises(ConfigurationError, match="renderer_name: unknown renderer 'nope'"):
        get_renderer("nope", tiny_tokenizer)
    with pytest.raises(ConfigurationError, match="renderer_name: no recommended renderer"):
        get_recommended_renderer_name("some/unknown-model")
    assert get_recommended_renderer_name("Qwen/Qwen3-8B") == "qwen3"
    assert get_recommended_renderer_name("meta-llama/Llama-3.1-8B-Instruct") == "llama3"
    assert get_recommended_renderer_name("Qwen/Qwen3.5-9B-Base") == "role_colon"
    with pytest.raises(RendererError, match="one special token"):
        get_renderer("llama3", tiny_tokenizer)  # the tiny tokenizer has no <|eot_id|>
