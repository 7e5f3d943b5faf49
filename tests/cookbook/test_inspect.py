"""The inspect-ai provider (``--model tinker/...``) and the evaluator wrapper, through the real
``inspect_ai.eval`` on the tiny model: embedded, against a server, from the ``inspect eval``
command line via the package's entry point, and inside the RL loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib

import pytest

inspect_ai = pytest.importorskip("inspect_ai")

from inspect_ai import Task  # noqa: E402
from inspect_ai.dataset import Sample  # noqa: E402
from inspect_ai.scorer import match  # noqa: E402
from inspect_ai.solver import generate  # noqa: E402

import tinker  # noqa: E402
import tinker_cookbook.eval.inspect_provider  # noqa: E402, F401 (registers tinker/)
from tinker_cookbook.eval.inspect_evaluator import InspectEvaluator  # noqa: E402
from tinker_cookbook.recipes.chat_sl.data import LibraryChatBuilder  # noqa: E402
from tinker_cookbook.recipes.math_rl.envs import MathDatasetBuilder  # noqa: E402
from tinker_cookbook.renderers import Message, get_recommended_renderer_name, get_renderer  # noqa: E402
from tinker_cookbook.rl import train  # noqa: E402
from tinker_cookbook.supervised import train as supervised_train  # noqa: E402
from tinker_cookbook.utils.plotting import read_metrics  # noqa: E402

from .conftest import TINY  # noqa: E402
from .test_recipes import REPO  # noqa: E402

QUESTIONS = [(2, 3), (4, 4), (1, 6)]
TASK_FILE = '''
from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import match
from inspect_ai.solver import generate


@task
def sums():
    return Task(dataset=[Sample(input=f"What is {{a}} + {{b}}?", target=str(a + b)) for a, b in {questions}],
                solver=generate(), scorer=match())
'''


def sums_task() -> Task:
    return Task(dataset=[Sample(input=f"What is {a} + {b}?", target=str(a + b)) for a, b in QUESTIONS],
                solver=generate(), scorer=match(), name="sums")


def greedy_replies(service: tinker.ServiceClient, max_tokens: int) -> list[str]:
    """The same questions sampled greedily straight from the sampler: what the provider must return."""
    sampler = service.create_sampling_client(base_model=TINY).result()
    renderer = get_renderer(get_recommended_renderer_name(TINY), sampler.get_tokenizer())
    replies = []
    for a, b in QUESTIONS:
        prompt = renderer.build_generation_prompt([Message(role="user", content=f"What is {a} + {b}?")])
        params = tinker.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.get_stop_sequences())
        tokens = sampler.sample(prompt, 1, params).result().sequences[0].tokens
        replies.append(renderer.parse_response(list(tokens))[0]["content"])
    return replies


def check_log(log, expected: list[str]) -> None:
    assert log.status == "success", log.error
    assert [s.output.completion for s in sorted(log.samples, key=lambda s: s.id)] == expected
    accuracy = log.results.scores[0].metrics["accuracy"].value
    assert accuracy == sum(s.scores["match"].value == "C" for s in log.samples) / len(QUESTIONS)
    assert all(s.output.usage.output_tokens > 0 for s in log.samples)


@pytest.mark.slow
@pytest.mark.timeout(240)  # imports inspect and starts a backend: 20-60 s loaded
def test_provider_embedded_answers_like_the_sampler(tmp_path, embedded):
    (log,) = inspect_ai.eval(sums_task(), model=f"tinker/{TINY}", log_dir=str(tmp_path), display="none",
                             max_tokens=8, temperature=0.0)
    check_log(log, greedy_replies(tinker.ServiceClient(), 8))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_provider_against_a_server_and_a_sampler_checkpoint(tmp_path, server):
    service = tinker.ServiceClient(base_url=server.base_url)
    trainer = service.create_lora_training_client(TINY, rank=4, seed=1)
    path = trainer.save_weights_for_sampler("inspect").result().path
    (log,) = inspect_ai.eval(sums_task(), model=f"tinker/{path}", model_base_url=server.base_url,
                             log_dir=str(tmp_path), display="none", max_tokens=6, temperature=0.0)
    assert log.status == "success", log.error
    # A fresh LoRA adapter is zero: the checkpoint answers exactly like the base model.
    check_log(log, greedy_replies(service, 6))


def test_provider_rejects_unknown_model_args():
    with pytest.raises(ValueError, match=r"model_args: unexpected \['temprature'\]"):
        inspect_ai.model.get_model(f"tinker/{TINY}", temprature=0.5, memoize=False)


def test_the_entry_point_is_declared():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["inspect_ai"]
    assert declared == {"tinker_cookbook": "tinker_cookbook.eval.inspect_provider"}


@pytest.mark.slow
@pytest.mark.timeout(300)  # a fresh `inspect eval` process: imports, backend start, 3 samples
def test_inspect_eval_command_line_finds_the_provider_by_its_entry_point(tmp_path):
    """The command line never imports our provider by name: only the declared entry point brings it in.
    A dist-info folder on PYTHONPATH carries pyproject's entry point (an editable install made
    before it was added would not have it)."""
    dist = tmp_path / "site" / "open_tinker_entry_points-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: open-tinker-entry-points\nVersion: 0\n")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["inspect_ai"]
    (dist / "entry_points.txt").write_text("[inspect_ai]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    (tmp_path / "sums.py").write_text(TASK_FILE.format(questions=QUESTIONS))
    env = {k: v for k, v in os.environ.items() if k != "TINKER_BASE_URL"}
    inherited = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]  # cwd changes
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), *inherited])
    result = subprocess.run(
        [sys.executable, "-m", "inspect_ai", "eval", "sums.py", "--model", f"tinker/{TINY}",
         "--log-dir", str(tmp_path / "logs"), "--max-tokens", "8", "--temperature", "0", "--display", "plain"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (log_file,) = (tmp_path / "logs").glob("*.eval")
    log = inspect_ai.log.read_eval_log(str(log_file))
    assert log.status == "success" and len(log.samples) == 3
    assert log.eval.model == f"tinker/{TINY}"


@pytest.mark.slow
@pytest.mark.timeout(300)  # 2 RL steps on the tiny model with an inspect run at 0, 1 and the end
def test_evaluator_runs_the_task_every_n_steps_of_the_rl_loop(tmp_path, embedded):
    evaluator = InspectEvaluator(sums_task(), log_dir=str(tmp_path / "inspect"), max_tokens=6)
    config = train.Config(
        log_path=str(tmp_path / "run"), model_name=TINY, dataset_builder=MathDatasetBuilder("arithmetic", 2, 2, 2),
        learning_rate=1e-3, max_tokens=4, lora_rank=4, seed=0, save_every=0, eval_every=1, evaluators=[evaluator],
    )
    asyncio.run(train.main(config))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    scored = [r["step"] for r in rows if "inspect/sums/match/accuracy" in r]
    assert scored == sorted(set(scored)) and len(scored) >= 2
    assert all(0.0 <= r["inspect/sums/match/accuracy"] <= 1.0 for r in rows if "inspect/sums/match/accuracy" in r)
    assert len(list((tmp_path / "inspect").glob("*.eval"))) == len(scored)


@pytest.mark.slow
@pytest.mark.timeout(240)  # 2 SFT steps on the tiny model with an inspect run at 0 and the end
def test_evaluator_in_a_supervised_loop(tmp_path, embedded):
    evaluator = InspectEvaluator(sums_task(), log_dir=str(tmp_path / "inspect"), max_tokens=6)
    config = supervised_train.Config(
        log_path=str(tmp_path / "run"), model_name=TINY, dataset_builder=LibraryChatBuilder(4, 8, 0),
        learning_rate=1e-3, max_steps=2, lora_rank=4, seed=0, save_every=0, eval_every=2,
        evaluators=[evaluator.on_training_client()],
    )
    asyncio.run(supervised_train.main(config))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "inspect/sums/match/accuracy" in r] == [0, 2]


def test_evaluator_wants_a_task(tmp_path):
    with pytest.raises(TypeError, match=r"task: expected inspect_ai\.Task, got str"):
        InspectEvaluator("sums", log_dir=str(tmp_path))
