"""The model registry: the tiny model builds deterministically and atomically, names resolve
offline, and (marked ``smollm2``) the real SmolLM2 weights convert from the packaged GGUF.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tinker_backend import model_registry
from tinker_backend.model_registry import SMOLLM2, TINY_MODEL, UnknownModelError

TEXTS = [
    "The capital of France is Paris.",
    "Hello, world!  Two spaces, a tab\there, and a new line\n\nthen 12345 numbers (and brackets).",
    "Unicode survives too: café, naïve, 東京, 🙂 — and \"quotes\" or 'single' ones.",
    " leading and trailing spaces ",
    "",
]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One cache dir, with the tiny model built once, shared by the tests below."""
    cache = tmp_path_factory.mktemp("tinker-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_CACHE_DIR", str(cache))
        model_registry.resolve_model(TINY_MODEL)
    return cache


@pytest.fixture
def tiny_path(tiny_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("TINKER_CACHE_DIR", str(tiny_cache))
    return model_registry.resolve_model(TINY_MODEL)


@pytest.fixture
def fresh_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("TINKER_CACHE_DIR", str(tmp_path))
    return tmp_path


def _folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("TINKER_CACHE_DIR", str(tmp_path))
    assert model_registry.cache_dir() == tmp_path
    monkeypatch.delenv("TINKER_CACHE_DIR")
    assert model_registry.cache_dir() == pathlib.Path.home() / ".cache" / "tinker"


def test_tiny_builds_and_reloads(tiny_path: pathlib.Path, tiny_cache: pathlib.Path) -> None:
    assert tiny_path == tiny_cache / "models" / "tiny-llama"
    names = {p.name for p in tiny_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not list(tiny_path.parent.glob(".tmp-*"))

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 2, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.max_position_embeddings) == (2, 512, 2048)
    assert cfg.tie_word_embeddings is False
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 1024 <= cfg.vocab_size <= 2048 and len(tok) <= cfg.vocab_size
    eos, bos, pad = (tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|endoftext|>", "<|pad|>"))
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) == (eos, bos, pad)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert model.generation_config.eos_token_id == eos

    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    assert model_registry.max_context_length(tiny_path) == 2048


def test_tiny_is_deterministic(tiny_path: pathlib.Path, fresh_cache: pathlib.Path) -> None:
    """A second build elsewhere is byte-identical (weights, tokenizer, configs), so logits match too."""
    rng_before = torch.random.get_rng_state()
    again = model_registry.resolve_model(TINY_MODEL)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "the build must not move the global RNG"
    assert again == fresh_cache / "models" / "tiny-llama" != tiny_path
    assert _folder_bytes(again) == _folder_bytes(tiny_path)

    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tiny_path)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(again)(ids).logits
    assert torch.equal(a, b)


def test_tokenizer_round_trips_and_chat_template(tiny_path: pathlib.Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # Ordinary English compresses (the BPE learnt words), and special tokens are single ids.
    assert len(tok.encode("the people of the world")) <= 6
    for special in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(special)) == 1

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.decode(ids) == text


def wait_until_blocked_on(lock_file: pathlib.Path, pids: set[int], timeout: float = 60) -> None:
    """Wait until every process in ``pids`` waits for the flock on ``lock_file`` (Linux's
    /proc/locks lists a waiter as ``-> FLOCK ... <pid> <dev>:<inode> ...``); elsewhere, half
    a second."""
    locks = pathlib.Path("/proc/locks")
    if not locks.exists():
        time.sleep(0.5)
        return
    inode = f":{os.stat(lock_file).st_ino}"
    deadline = time.monotonic() + timeout
    while True:
        waiting = {
            int(fields[5])
            for fields in map(str.split, locks.read_text().splitlines())
            if fields[1:3] == ["->", "FLOCK"] and fields[6].endswith(inode)
        }
        if pids <= waiting:
            return
        assert time.monotonic() < deadline, f"processes {pids - waiting} never waited on {lock_file}"
        time.sleep(0.01)


def test_concurrent_builds_yield_one_folder(tiny_path: pathlib.Path, fresh_cache: pathlib.Path) -> None:
    """Two processes build at once: both wait on the lock, one builds, both get the same folder."""
    child = (
        "import torch, transformers, tokenizers\n"  # import first, so the race is on the build
        "from tinker_backend import model_registry\n"
        "print('ready', flush=True)\n"
        "print(model_registry.resolve_model(model_registry.TINY_MODEL), flush=True)\n"
    )
    parent = fresh_cache / "models"
    parent.mkdir()
    env = {**os.environ, "TINKER_CACHE_DIR": str(fresh_cache)}
    with open(parent / ".tiny-llama.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # hold the builders at the gate until both are ready
        procs = [
            subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        wait_until_blocked_on(parent / ".tiny-llama.lock", {p.pid for p in procs})
        fcntl.flock(lock, fcntl.LOCK_UN)
    outs = [p.communicate(timeout=240)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    target = parent / "tiny-llama"
    assert outs == [str(target), str(target)]
    assert sorted(p.name for p in parent.iterdir()) == [".tiny-llama.lock", "tiny-llama"]
    # Built in another process (another hash seed, too): still byte-identical.
    assert _folder_bytes(target) == _folder_bytes(tiny_path)


def test_failed_build_leaves_nothing_behind(
    fresh_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(out: pathlib.Path) -> None:
        (out / "config.json").write_text("{}")  # half a model ...
        raise RuntimeError("disk full")  # ... then the build dies

    monkeypatch.setattr(model_registry, "_build_tiny", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        model_registry.resolve_model(TINY_MODEL)
    assert not (fresh_cache / "models" / "tiny-llama").exists()
    assert not list((fresh_cache / "models").glob(".tmp-*"))

    # A leftover from a process that was killed mid-build is cleared by the next build.
    (fresh_cache / "models" / ".tmp-tiny-llama-killed").mkdir()
    monkeypatch.undo()
    monkeypatch.setenv("TINKER_CACHE_DIR", str(fresh_cache))
    path = model_registry.resolve_model(TINY_MODEL)
    assert (path / "model.safetensors").is_file()
    assert not list((fresh_cache / "models").glob(".tmp-*"))


def test_unknown_model_is_named(fresh_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("no-such-org/no-such-model-3141", "not a valid id!", str(fresh_cache / "missing")):
        with pytest.raises(UnknownModelError) as info:
            model_registry.resolve_model(name)
        assert isinstance(info.value, ValueError)
        assert repr(name) in str(info.value) and TINY_MODEL in str(info.value)
    assert not (fresh_cache / "models").exists(), "an unknown name must not build anything"


def test_local_folder_is_returned_as_is(tiny_path: pathlib.Path) -> None:
    assert model_registry.resolve_model(str(tiny_path)) == tiny_path


def test_tokenizer_files_rebuild_the_tokenizer(tiny_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    files = model_registry.tokenizer_files(TINY_MODEL)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(files)
    assert "model.safetensors" not in files
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    remote = AutoTokenizer.from_pretrained(tmp_path)
    local = AutoTokenizer.from_pretrained(tiny_path)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    assert remote.encode(TEXTS[1]) == local.encode(TEXTS[1])
    assert remote.apply_chat_template(messages, tokenize=False) == local.apply_chat_template(
        messages, tokenize=False
    )
    # transformers 4.x cannot load the 5.x class name "TokenizersBackend".
    assert json.loads(files["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_list_models(fresh_cache: pathlib.Path) -> None:
    listed = {m.model_name: m for m in model_registry.list_models()}
    assert TINY_MODEL in listed
    assert listed[TINY_MODEL].max_context_length == 2048
    assert listed[TINY_MODEL].trainable and listed[TINY_MODEL].sampleable
    assert (SMOLLM2 in listed) == (model_registry._smollm2_gguf() is not None)
    if SMOLLM2 in listed:
        assert listed[SMOLLM2].max_context_length == 8192
    assert not (fresh_cache / "models").exists(), "listing must not build or convert anything"


def test_smollm2_without_the_extra(fresh_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_registry, "_smollm2_gguf", lambda: None)
    monkeypatch.setattr(model_registry, "_local_hub_snapshot", lambda repo_id: None)
    assert SMOLLM2 not in {m.model_name for m in model_registry.list_models()}
    with pytest.raises(UnknownModelError, match=r"open-tinker\[smollm2\]"):
        model_registry.resolve_model(SMOLLM2)


def test_max_context_length_reads_config(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 1024}))
    assert model_registry.max_context_length(tmp_path) == 1024
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    assert model_registry.max_context_length(tmp_path) == 4096


@pytest.mark.smollm2
def test_smollm2_converts_and_answers() -> None:
    """Converted once into the default cache (``$TINKER_CACHE_DIR`` or ~/.cache/tinker) and reused."""
    if model_registry._smollm2_gguf() is None:
        pytest.skip("needs the smollm2 extra: pip install 'open-tinker[smollm2]'")
    path = model_registry.resolve_model(SMOLLM2)
    assert path == model_registry.cache_dir() / "models" / "SmolLM2-135M-Instruct"
    assert model_registry.resolve_model(SMOLLM2) == path  # second call: no rebuild
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert (path / "generation_config.json").is_file()
    assert model_registry.max_context_length(path) == 8192

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.vocab_size == 49152 == len(tok)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    files = model_registry.tokenizer_files(SMOLLM2)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"} <= set(files)
