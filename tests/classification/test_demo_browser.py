"""`rmt demo` end to end in a real browser: the command serves the page, headless Chromium (the system's
/usr/bin/chromium, driven by Playwright) opens it, runs an example, clicks a point and uploads a bad file.

Run with ``python -m pytest -m browser``. Needs ``apt-get install chromium`` and ``pip install playwright``
(Playwright's own browser download is not used). The same steps take the README's screenshot::

    python tests/classification/test_demo_browser.py --checkpoint runs/digits/model.safetensors \\
        --output docs/images/demo.png
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(checkpoint: str | os.PathLike, workdir: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start ``rmt demo`` on a free port of 127.0.0.1 and wait for the line that gives its address."""
    env = dict(os.environ, RMT_CACHE_DIR=str(workdir / "cache"), GRADIO_TEMP_DIR=str(workdir / "gradio"),
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "rmt", "demo", "--checkpoint", str(checkpoint), "--device", "cpu",
               "--amp", "none", "--port", str(_free_port())]
    log = open(workdir / "demo.log", "w+")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.seek(0)
        for line in log.read().splitlines():
            if line.startswith("rmt demo: ") and " at http://127.0.0.1:" in line:
                return proc, line.split(" at ")[1].split()[0]
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    stop_demo(proc)
    log.seek(0)
    raise RuntimeError(f"rmt demo did not start:\n{log.read()[-3000:]}")


def stop_demo(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch_chromium(playwright, profile: Path):
    """The system's Chromium, headless, with a fresh profile and no background network traffic."""
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1400, "height": 1000})


def run_example(page, url: str, index: int = 0) -> None:
    """Open the page and click example ``index``; returns once its predictions and maps are shown."""
    page.goto(url)
    page.locator("#rmt-examples img").nth(index).click(timeout=STEP_TIMEOUT_MS)
    page.locator("#rmt-caption", has_text="predicted").wait_for(timeout=STEP_TIMEOUT_MS)
    for element in ("#rmt-picture img", "#rmt-overview img", "#rmt-heads img"):
        page.locator(element).wait_for(timeout=STEP_TIMEOUT_MS)


def _loaded_size(page, selector: str) -> tuple[int, int]:
    return page.eval_on_selector(selector, "img => [img.complete ? img.naturalWidth : 0, img.naturalHeight]")


# ------------------------------------------------------------------------------------------- test
def _requirements():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """A ``model.safetensors`` of rmt_t (random weights) as a digits run writes it: 10 classes, grey 32x32."""
    import timm

    import rmt  # noqa: F401  registers the models
    from conftest import write_weights

    config = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
              "crop_pct": 1.0, "grayscale": True}
    meta = dict(task="classification", model="rmt_t", class_names=[str(i) for i in range(10)], num_classes=10,
                token_label=False, data_config=config)
    return write_weights(tmp_path_factory.mktemp("run") / "model.safetensors",
                         timm.create_model("rmt_t", num_classes=10), meta)


@pytest.mark.slow
@pytest.mark.browser
def test_demo_page_in_chromium(digits_checkpoint, tmp_path):
    sync_api = _requirements()
    started = time.monotonic()
    proc, url = start_demo(digits_checkpoint, tmp_path)
    try:
        with sync_api.sync_playwright() as playwright:
            context = launch_chromium(playwright, tmp_path / "profile")
            hosts = set()
            context.on("request", lambda request: hosts.add(request.url.split("/")[2]))
            page = context.new_page()
            run_example(page, url, index=1)  # digit_3.png

            info = page.inner_text("#rmt-info")
            assert "rmt_t" in info and "device cpu" in info and "predictions in float32" in info
            caption = page.inner_text("#rmt-caption")
            assert caption.startswith("digit_3.png: predicted ")
            assert "Query point at (0.50, 0.50)" in caption and "stage 1: token (4, 4) of 8x8" in caption
            labels = page.locator("#rmt-top dt").all_inner_texts()  # the top-5, one bar each
            assert len(labels) == 5 and set(labels) <= {str(i) for i in range(10)}
            assert page.locator("#rmt-top dd").all_inner_texts()[0].endswith("%")
            width, height = _loaded_size(page, "#rmt-picture img")
            assert (width, height) == (512, 512)
            assert _loaded_size(page, "#rmt-overview img")[0] > 1000
            overview = page.get_attribute("#rmt-overview img", "src")

            # a click near the picture's top-left corner moves the query point: new maps
            box = page.locator("#rmt-picture img").bounding_box()
            page.mouse.click(box["x"] + 0.1 * box["width"], box["y"] + 0.15 * box["height"])
            page.locator("#rmt-caption", has_text="Query point at (0.15, 0.10)").wait_for(timeout=STEP_TIMEOUT_MS)
            assert "stage 1: token (1, 0) of 8x8" in page.inner_text("#rmt-caption")
            page.wait_for_function("src => document.querySelector('#rmt-overview img').src !== src", arg=overview,
                                   timeout=STEP_TIMEOUT_MS)

            # the heads of another stage, for the same point
            heads = page.get_attribute("#rmt-heads img", "src")
            page.locator("#rmt-stage label", has_text="stage 3").click()
            page.wait_for_function("src => document.querySelector('#rmt-heads img').src !== src", arg=heads,
                                   timeout=STEP_TIMEOUT_MS)
            assert "Query point at (0.15, 0.10)" in page.inner_text("#rmt-caption")
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

            # files it cannot show: a message on the page each time, and the page still works
            bad = {"holiday.png": "holiday.png is not an image this demo can read",
                   "notes.txt": "notes.txt is not an image this demo can read",
                   "huge.png": "huge.png is 9000x5000 pixels (45 MP); the demo reads images up to 40 MP"}
            (tmp_path / "holiday.png").write_text("this is not a picture\n")
            (tmp_path / "notes.txt").write_text("nor is this\n")
            Image.new("1", (9000, 5000)).save(tmp_path / "huge.png")  # 45 MP in a few kB
            for name, text in bad.items():
                clear = page.locator("#rmt-upload button[aria-label='Clear']")
                if clear.count():  # the last file is still shown: take it away, as a visitor would
                    clear.click()
                    page.locator("#rmt-upload input[type=file]").wait_for(state="attached", timeout=STEP_TIMEOUT_MS)
                page.set_input_files("#rmt-upload input[type=file]", str(tmp_path / name))
                page.locator("#rmt-message", has_text=text).wait_for(timeout=STEP_TIMEOUT_MS)
                assert page.inner_text("#rmt-message").startswith("Cannot show this file: ")
                assert page.locator("#rmt-picture img").count() == 0  # the last picture's results are cleared
                assert page.locator("#rmt-top dt").count() == 0
            page.locator("#rmt-examples img").nth(0).click()
            page.locator("#rmt-caption", has_text="digit_0.png: predicted").wait_for(timeout=STEP_TIMEOUT_MS)
            assert page.inner_text("#rmt-message").strip() == ""
            context.close()
        assert hosts == {url.split("/")[2]}, f"the page fetched from other hosts: {hosts}"
    finally:
        stop_demo(proc)
    assert proc.returncode is not None
    print(f"browser test: {time.monotonic() - started:.1f} s")


# ------------------------------------------------------------------------------------- screenshot
def screenshot(checkpoint: str, output: str, example: int, click: tuple[float, float] | None, stage: int) -> None:
    """Serve ``checkpoint``, run an example (and click a point, pick a stage) and save the page."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        proc, url = start_demo(checkpoint, workdir)
        try:
            with sync_playwright() as playwright:
                context = launch_chromium(playwright, workdir / "profile")
                page = context.new_page()
                run_example(page, url, example)
                if click is not None:
                    box = page.locator("#rmt-picture img").bounding_box()
                    page.mouse.click(box["x"] + click[1] * box["width"], box["y"] + click[0] * box["height"])
                    page.locator("#rmt-caption", has_text=f"Query point at ({click[0]:.1f}").wait_for(
                        timeout=STEP_TIMEOUT_MS)
                if stage != 1:
                    heads = page.get_attribute("#rmt-heads img", "src")
                    page.locator("#rmt-stage label", has_text=f"stage {stage}").click()
                    page.wait_for_function("src => document.querySelector('#rmt-heads img').src !== src", arg=heads,
                                           timeout=STEP_TIMEOUT_MS)
                page.wait_for_timeout(1000)
                page.screenshot(path=output, full_page=True)
                context.close()
        finally:
            stop_demo(proc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="screenshot of the rmt demo page after an example ran")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--example", type=int, default=1)
    parser.add_argument("--click", type=float, nargs=2, default=None, metavar=("ROW", "COL"))
    parser.add_argument("--stage", type=int, default=1)
    a = parser.parse_args()
    screenshot(a.checkpoint, a.output, a.example, a.click, a.stage)
