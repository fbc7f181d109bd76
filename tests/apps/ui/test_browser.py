"""End to end: `vigil ui` on a free port, driven by headless Debian Chromium through every page.

Each page must load, take one interaction, show no exception box, and leave a screenshot under
``test-artifacts/ui/``. Chromium comes from apt (``make sysdeps``), never from a download.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.broker import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "ui"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def ui_server(ui_home: Path, mlflow_store: str, tmp_path: Path) -> Iterator[str]:
    """`vigil ui` serving the test's $VIGIL_HOME (demo outputs + a store with champions)."""
    from tests.apps.ui.conftest import log_runs

    log_runs(mlflow_store, register_defect=False)
    port = free_port()
    log = (tmp_path / "ui.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        start_new_session=True,  # the CLI starts streamlit as a child: stop the whole group
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vigil ui exited: {(tmp_path / 'ui.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=1).status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vigil ui not up in 60 s: {(tmp_path / 'ui.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _settle(page, timeout_ms: int = 30_000) -> None:  # type: ignore[no-untyped-def]
    """Wait until Streamlit finished the current script run."""
    page.wait_for_selector(
        '[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms
    )
    page.wait_for_timeout(300)  # charts and tables paint after the run ends


def _nav(page, title: str) -> None:  # type: ignore[no-untyped-def]
    """Follow the sidebar link (same session: faster than loading the URL afresh)."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()


def _check(page, name: str) -> None:  # type: ignore[no-untyped-def]
    _settle(page)
    boxes = page.locator('[data-testid="stException"]')
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Streamlit scrolls inside its main block, so a tall viewport rather than full_page
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    assert boxes.count() == 0, f"{name}: {boxes.first.inner_text()[:1000]}"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium: run `make sysdeps`")
def test_every_page_in_a_real_browser(ui_server: str, tmp_path: Path) -> None:
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    upload = tmp_path / "part.png"
    Image.new("RGB", (64, 64), (120, 90, 60)).save(upload)
    expect.set_options(timeout=30_000)  # a cold page on 2 busy cores can take seconds
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.set_default_timeout(30_000)

            # Home: status cards and champions; interaction = follow the link to the Fraud page
            page.goto(ui_server)
            expect(page.get_by_role("heading", name="Vigil")).to_be_visible()
            expect(page.get_by_text("Champion models")).to_be_visible()
            _check(page, "home")
            page.get_by_role("link", name="Fraud: alerts").click()
            expect(page.get_by_role("heading", name="Fraud", exact=True)).to_be_visible()

            # Fraud: filter the alert table by card
            _settle(page)
            expect(page.get_by_text("Card drill-down")).to_be_visible()
            card = page.get_by_label("Card contains")
            card.fill("c-007")
            card.press("Enter")
            _settle(page)
            expect(page.get_by_text("rows match")).to_be_visible()
            _check(page, "fraud")

            # Medical: switch the window preset; the slice caption follows
            _nav(page, "Medical")
            expect(page.get_by_role("heading", name="Medical", exact=True)).to_be_visible()
            _settle(page)
            page.get_by_test_id("stRadioGroup").get_by_text("mediastinum", exact=True).click()
            expect(page.get_by_text("W 350 L 50", exact=False)).to_be_visible()
            _check(page, "medical")

            # Manufacturing: upload an image
            _nav(page, "Manufacturing")
            expect(page.get_by_role("heading", name="Manufacturing", exact=True)).to_be_visible()
            _settle(page)
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(upload))
            expect(page.get_by_text("1 image(s) accepted")).to_be_visible()
            _check(page, "manufacturing")

            # Runs: pick the finance app; its experiment is selected
            _nav(page, "Runs")
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
            _settle(page)
            page.get_by_test_id("stRadioGroup").get_by_text("finance", exact=True).click()
            _settle(page)
            experiment = page.get_by_role("combobox", name="Experiment")
            expect(experiment).to_have_value("vigil-finance")
            _check(page, "runs")
        finally:
            browser.close()
    pages = {"home", "fraud", "medical", "manufacturing", "runs"}
    assert pages <= {p.stem for p in ARTIFACTS.glob("*.png")}
