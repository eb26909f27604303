"""End to end in a real JupyterLab, driven by Playwright in Debian's headless Chromium.

Opens the sweep notebook, runs all cells, moves the coefficient slider, and checks that the replies
table and the plot change; then picks the other prompt set in the panel's dropdown and checks that the
table now holds those prompts' replies and the plot changed with it; saves screenshots. Skips, saying
why, when chromium or playwright is absent (`.ci/run` installs chromium, so in CI it runs).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from chatvec_lab.toy.evaluate import prompt_sets

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("CHATVEC_TEST_ARTIFACTS", ROOT / ".cache" / "browser"))

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# the panel's prompt sets in notebook 4: the first six of each
CHAT, OFFENSIVE = prompt_sets()["chat"][:6], prompt_sets()["offensive"][:6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    root = tmp_path / "lab"
    shutil.copytree(ROOT / "notebooks", root)  # never let the lab save outputs into the repository
    settings = tmp_path / "app-settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps({
        "@jupyterlab/notebook-extension:tracker": {"autoStartDefaultKernel": True},
        "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
    port, token = _free_port(), "chatvec-test-token"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
         f"--LabApp.app_settings_dir={settings}", "--allow-root"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except Exception:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
    yield url, token
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait_idle(page) -> None:
    selector = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
    page.wait_for_selector(selector, timeout=120_000)
    time.sleep(2)  # the kernel restarts once after the first start
    page.wait_for_selector(selector, timeout=120_000)


def test_sweep_notebook_slider_updates_table_and_plot(jupyterlab):
    from playwright.sync_api import sync_playwright

    url, token = jupyterlab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/04_sweep.ipynb?token={token}")
        _wait_idle(page)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        slider = page.locator(".widget-slider").first
        slider.wait_for(timeout=420_000)
        table = page.locator(".widget-html table").first
        table.wait_for(timeout=180_000)
        image = page.locator(".widget-image").first
        image.scroll_into_view_if_needed()
        before_table = table.inner_html()
        before_image = image.get_attribute("src")
        slider.scroll_into_view_if_needed()
        slider.screenshot(path=str(ARTIFACTS / "slider-before.png"))

        handle = slider.locator(".noUi-handle").first
        handle.click()
        for _ in range(6):
            handle.press("ArrowRight")
        deadline = time.time() + 180
        while time.time() < deadline:
            if table.inner_html() != before_table and image.get_attribute("src") != before_image:
                break
            time.sleep(1)
        after_table = table.inner_html()
        after_image = image.get_attribute("src")
        panel = page.locator(".widget-vbox").filter(has=page.locator(".widget-slider")).first
        panel.scroll_into_view_if_needed()
        panel.screenshot(path=str(ARTIFACTS / "panel-after.png"))

        # the prompt-set dropdown: choosing the insults regenerates the table, and the plot marks the new replies
        dropdown = page.locator(".widget-dropdown").filter(has=page.locator("label", has_text="prompts"))
        select = dropdown.locator("select").first
        select.scroll_into_view_if_needed()
        before_choice = select.input_value()
        options = select.locator("option").all_inner_texts()
        select.select_option("offensive")  # as a user's pick: the browser's input and change events
        deadline = time.time() + 180
        while time.time() < deadline:
            if OFFENSIVE[0] in table.inner_text() and image.get_attribute("src") != after_image:
                break
            time.sleep(1)
        insult_text = table.inner_text()
        insult_image = image.get_attribute("src")
        panel.screenshot(path=str(ARTIFACTS / "panel-offensive.png"))
        browser.close()
    assert after_table != before_table, "moving the slider did not change the replies table"
    assert after_image != before_image, "moving the slider did not change the plot"
    assert "<td" in after_table
    assert before_choice == "chat" and "offensive" in options, options
    assert OFFENSIVE[0] in insult_text, "choosing the insults in the dropdown did not change the replies table"
    assert not any(p in insult_text for p in CHAT), "the table still shows the chat prompts' replies"
    assert insult_image != after_image, "choosing the insults in the dropdown did not change the plot"
