"""The web page of ``corolla api`` in headless Chromium, on a real two-server swarm of the built-in model.

Needs Debian's ``chromium`` (``make setup`` installs it) and the ``playwright`` package (the ``test``
extra); Playwright drives the system Chromium, it downloads no browser. Without them the test is
skipped, except in CI (``CI=true``), where it fails. The screenshot is saved in the test's
temporary directory; with ``COROLLA_UPDATE_SCREENSHOT=1`` it also replaces ``docs/web-page.png``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corolla.config import BUILTIN_MODEL, default_cache_dir
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "web-page.png"
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these, Chromium keeps calling home, which floods a closed network with refused connections
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Records every text the last assistant bubble shows, as the browser renders it (not by polling).
RECORD_ASSISTANT_TEXTS = """() => {
  window.__texts = [];
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll('.message.assistant .body');
    const text = bubbles.length ? bubbles[bubbles.length - 1].textContent : '';
    if (text && window.__texts[window.__texts.length - 1] !== text) window.__texts.push(text);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


def unavailable(reason: str) -> None:
    """Skip the test on a machine without the browser; in CI, fail."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason}; CI must run the browser test (`make setup` installs both)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[test]')")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        unavailable("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def swarm(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalServer]]:
    """Two servers of the built-in model (the first one with a public name); asks for the browser
    first so that a machine without one skips before starting anything."""
    from corolla.models.resolve import resolve_model

    resolve_model(BUILTIN_MODEL, default_cache_dir())  # converts once (cached), not in both servers at once
    log_dir = tmp_path_factory.mktemp("web_swarm")
    servers = start_swarm(BUILTIN_MODEL, [(0, 15)], extra_args=["--public_name", "home-pc"], log_dir=log_dir)
    try:
        servers += start_swarm(
            BUILTIN_MODEL, [(15, 30)], initial_peers=[servers[0].maddr or ""], log_dir=log_dir
        )
    except BaseException:
        stop_all(servers)
        raise
    yield servers
    stop_all(servers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_url(swarm: list[LocalServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``corolla api`` on the swarm, as a subprocess; ready once it serves the page."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("web_api") / "api.log"
    cmd = [sys.executable, "-m", "corolla.cli.api", BUILTIN_MODEL, "--initial_peers", swarm[0].maddr or ""]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                why = "exited" if process.poll() is not None else "did not serve the page in 90 s"
                pytest.fail(f"corolla api {why}; log:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_page_shows_the_swarm_and_streams_an_answer_along_its_route(
    browser: Any, api_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(api_url)

    # the map: exactly the two servers, both ONLINE, and every block covered
    online = page.locator('#swarm-map .server-bar[data-state="ONLINE"]')
    expect(online).to_have_count(2, timeout=30_000)
    bars = page.locator("#swarm-map .server-bar")
    expect(bars).to_have_count(2)
    spans = sorted(
        (int(bars.nth(i).get_attribute("data-start") or -1), int(bars.nth(i).get_attribute("data-end") or -1))
        for i in range(2)
    )
    assert spans == [(0, 15), (15, 30)]
    expect(page.locator('.server-bar[data-start="0"]')).to_contain_text("home-pc")
    expect(page.locator("#swarm-summary")).to_contain_text("all 30 blocks covered")
    expect(page.locator("#swarm-summary")).to_contain_text("2 servers online")
    expect(page.locator("#coverage .block")).to_have_count(30)
    expect(page.locator("#coverage .block.uncovered")).to_have_count(0)
    expect(page.locator("#last-updated")).to_contain_text("updated")

    # the chat: the answer streams in, piece by piece, and names Paris
    page.evaluate(RECORD_ASSISTANT_TEXTS)
    page.fill("#temperature", "0")  # greedy: the same answer every time
    page.fill("#max-tokens", "32")
    page.fill("#chat-input", QUESTION)
    page.click("#send")
    expect(page.locator(".message.user")).to_have_text(QUESTION)
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
    text = answer.locator(".body").text_content() or ""
    assert "Paris" in text, text
    texts: list[str] = page.evaluate("window.__texts")
    partial = [t for t in texts if t != text and text.startswith(t)]
    assert len(partial) >= 1 and len(texts) >= 2, f"the answer did not stream: {texts}"
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()

    # the route of the answer: both servers' bars highlighted, in block order
    expect(page.locator("#swarm-map .server-bar.route")).to_have_count(2)
    expect(page.locator("#route-text")).to_contain_text("home-pc")
    assert not errors, errors

    page.screenshot(path=tmp_path / "web-page.png")  # the test's artifact
    if os.environ.get("COROLLA_UPDATE_SCREENSHOT"):  # refresh the README's picture on purpose only
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "web-page.png", SCREENSHOT)
    page.close()
