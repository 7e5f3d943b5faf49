"""The web console in a real browser: playwright drives headless Chromium against a real server
while the real client trains. Run by ``nox -s console``; skipped where playwright is missing.

Set ``CONSOLE_SCREENSHOTS=docs/console`` to (re)write the screenshots of the docs.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess

import tinker
from tinker import AdamParams, Datum, ModelInput

sync_api = pytest.importorskip("playwright.sync_api", reason="the console's browser tests need playwright (nox -s console)")

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
KEYS = {"alice": "tml-alice-console-key-000000000000", "bob": "tml-bob-console-key-0000000000000", "root": "tml-root-console-key-000000000000"}
TINY = "tiny-llama"
DATA = [
    Datum(
        model_input=ModelInput.from_ints([5, 17, 99, 3, 42, 7, 250]),
        loss_fn_inputs={"target_tokens": [17, 99, 3, 42, 7, 250, 11], "weights": [1.0] * 7},
    )
]
SHOTS = os.environ.get("CONSOLE_SCREENSHOTS")
# Whichever test trains first loads the model (and -k may pick any of them).
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with three keys; ``root`` is an admin owner."""
    root = tmp_path_factory.mktemp("console")
    keys_file = root / "keys"
    keys_file.write_text("".join(f"{key} {owner}\n" for owner, key in KEYS.items()))
    proc = ServerProcess(root / "data", "--keys-file", str(keys_file), "--admin-owner", "root")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (nox -s console does) or set CHROMIUM")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run the client's blocking calls on a thread of their own: playwright's sync API keeps an
    event loop running on the test's thread, where ``APIFuture.result()`` must not block."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


@pytest.fixture(scope="module")
def alice(console_server: ServerProcess) -> Iterator[tinker.ServiceClient]:
    service = tinker.ServiceClient(base_url=console_server.base_url, api_key=KEYS["alice"])
    yield service
    blocking(lambda: service.close().result(timeout=30))


def new_run(service: tinker.ServiceClient, seed: int, steps: int) -> tinker.TrainingClient:
    tc = blocking(lambda: service.create_lora_training_client(TINY, rank=4, seed=seed))
    train(tc, steps)
    return tc


def train(tc: tinker.TrainingClient, steps: int) -> None:
    def run() -> None:
        for _ in range(steps):
            tc.forward_backward(DATA, "cross_entropy")
            tc.optim_step(AdamParams(learning_rate=1e-2)).result(timeout=60)

    blocking(run)


def sign_in(page: sync_api.Page, server: ServerProcess, key: str) -> None:
    page.goto(server.base_url + "/console")
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")  # the keyboard alone signs in


def shot(page: sync_api.Page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def test_a_wrong_key_is_refused(browser, console_server):
    page = browser.new_page()
    sign_in(page, console_server, "tml-not-a-key-of-this-server-00000")
    sync_api.expect(page.locator("#signin-error")).to_contain_text("refused")
    assert page.locator("#nav").is_hidden()
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept
    page.close()


def test_see_a_run_train_and_its_curve_gain_points(browser, console_server, alice):
    tc = new_run(alice, seed=1, steps=2)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    sign_in(page, console_server, KEYS["alice"])
    row = page.locator(f'#runs tr[data-run="{tc.model_id}"]')
    sync_api.expect(row).to_contain_text(TINY)
    sync_api.expect(row.locator("td").nth(4)).to_have_text("2")  # steps
    assert page.evaluate("sessionStorage.getItem('tinker-console-key')") == KEYS["alice"]
    shot(page, "runs")

    row.get_by_role("link").click()
    loss = page.locator('figure[data-chart="loss"] svg')
    sync_api.expect(loss).to_have_attribute("data-points", "2")
    for chart in ("lr", "grad_norm", "tokens_per_s"):
        sync_api.expect(page.locator(f'figure[data-chart="{chart}"] svg')).to_have_attribute("data-points", "2")
    train(tc, 3)  # the open page polls: its curves gain the new steps without a reload
    sync_api.expect(loss).to_have_attribute("data-points", "5", timeout=15_000)
    sync_api.expect(page.locator("#run-facts")).to_contain_text("loaded")
    shot(page, "run")
    page.close()


def test_download_publish_and_delete_a_checkpoint(browser, console_server, alice):
    tc = new_run(alice, seed=2, steps=1)
    path = blocking(lambda: tc.save_state("console-ckpt").result(timeout=60).path)
    page = browser.new_page(viewport={"width": 1280, "height": 700})
    sign_in(page, console_server, KEYS["alice"])
    page.get_by_role("link", name="Checkpoints").click()
    row = page.locator(f'tr[data-path="{path}"]')
    sync_api.expect(row).to_contain_text("weights")
    shot(page, "checkpoints")

    with page.expect_download() as download:
        row.get_by_role("button", name="Download").click()
    archive = Path(download.value.path()).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = set(tar.getnames())
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names, names

    row.get_by_role("button", name="Publish").click()
    sync_api.expect(row.locator("td").nth(6)).to_have_text("yes")
    rest = alice.create_rest_client()

    def listed() -> list[Any]:
        return blocking(lambda: rest.list_checkpoints(tc.model_id).result().checkpoints)

    assert [c.public for c in listed()] == [True]

    dialogs: list[str] = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    row.get_by_role("button", name="Delete").click()  # dismissed: nothing happens
    assert dialogs and path in dialogs[0]
    sync_api.expect(row).to_be_visible()
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Delete").click()
    sync_api.expect(row).to_have_count(0)
    assert listed() == []
    page.close()


def test_another_keys_runs_are_invisible_and_only_admins_see_the_server(browser, console_server, alice):
    tc = new_run(alice, seed=3, steps=1)
    page = browser.new_page()
    sign_in(page, console_server, KEYS["bob"])
    sync_api.expect(page.locator("#whoami")).to_have_text("signed in as bob")
    sync_api.expect(page.locator("#run-count")).to_have_text("0 of 0")
    assert page.locator("#nav-server").is_hidden()
    page.goto(f"{console_server.base_url}/console#/run/{tc.model_id}")  # even by its id
    sync_api.expect(page.locator("#view .error")).to_contain_text("unknown training run")
    page.get_by_role("link", name="Checkpoints").click()
    sync_api.expect(page.locator("#checkpoints")).to_contain_text("No checkpoints.")
    page.close()

    admin = browser.new_page(viewport={"width": 1280, "height": 600})
    sign_in(admin, console_server, KEYS["root"])
    sync_api.expect(admin.locator("#whoami")).to_have_text("signed in as root (admin)")
    admin.get_by_role("link", name="Server").click()
    model = admin.locator("#models tr", has_text=TINY)
    sync_api.expect(model).to_contain_text("yes")
    sync_api.expect(admin.locator("#server-facts")).to_contain_text("Memory (resident)")
    shot(admin, "server")
    admin.close()


def test_sampler_sessions_are_listed(browser, console_server, alice):
    tc = new_run(alice, seed=4, steps=1)
    sampler = blocking(tc.save_weights_and_get_sampling_client)
    session_id = blocking(lambda: sampler.sampling_session_id)
    page = browser.new_page(viewport={"width": 1280, "height": 500})
    sign_in(page, console_server, KEYS["alice"])
    page.get_by_role("link", name="Samplers").click()
    sync_api.expect(page.locator("#samplers")).to_contain_text(session_id)
    shot(page, "samplers")
    page.close()


def test_runs_filter_and_sort_from_the_keyboard(browser, console_server, alice):
    short, long = new_run(alice, seed=5, steps=1), new_run(alice, seed=6, steps=3)
    page = browser.new_page()
    sign_in(page, console_server, KEYS["alice"])
    sync_api.expect(page.locator(f'#runs tr[data-run="{long.model_id}"]')).to_be_visible()
    total = page.locator("#runs tbody tr").count()

    page.get_by_label("Filter").fill(short.model_id)
    sync_api.expect(page.locator("#run-count")).to_have_text(f"1 of {total}")
    page.get_by_label("Filter").fill("")
    steps = page.get_by_role("button", name="Steps")
    steps.focus()
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("th", has=steps)).to_have_attribute("aria-sort", "ascending")
    shown = [int(t) for t in page.locator("#runs tbody tr td:nth-child(5)").all_inner_texts()]
    assert shown == sorted(shown) and len(shown) == total
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("th", has=steps)).to_have_attribute("aria-sort", "descending")
    assert page.locator("#runs tbody tr").first.get_attribute("data-run") is not None
    shown = [int(t) for t in page.locator("#runs tbody tr td:nth-child(5)").all_inner_texts()]
    assert shown == sorted(shown, reverse=True) and shown[0] >= 3
    page.close()
