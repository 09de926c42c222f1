"""``pyraflow serve`` in a real headless Chromium: a prompt gives the same picture as ``pyraflow sample`` with the
same seed and settings; bad input is refused on the page, which stays usable; requests are checked before any work.

The browser is Debian's chromium (`.ci/run` installs it) driven by the playwright client; where either is missing the
browser test is skipped with that reason."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pyraflow.cli import main
from pyraflow.config import load_config
from pyraflow.train import run_training

TINY = ["model.width=32", "model.depth=2", "model.num_heads=2", "batching.token_budget=400", "train.steps=4",
        "train.sample_every=0", "sample.steps=2", "sample.per_prompt=2", "sample.prompts=[a handwritten digit one]"]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    run_training(load_config(None, TINY), out, progress=False)
    return out


def chromium() -> str | None:
    return os.environ.get("PYRAFLOW_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_requests_are_checked_before_any_work(run):
    from pyraflow.sample import load_pipeline
    from pyraflow.serve import Generator

    generator = Generator(load_pipeline(run, "cpu"), run / "serve")
    good = dict(prompts_text="a handwritten digit two", per_prompt=2, steps=2, guidance=3.0, seed=1, frames=None,
                image_path=None)
    for change, message in [({"prompts_text": "  \n "}, "Enter a prompt"), ({"steps": 0}, "Euler steps per stage"),
                            ({"steps": 2.5}, "Euler steps per stage"), ({"per_prompt": 99}, "samples per prompt"),
                            ({"guidance": -1}, "guidance"), ({"seed": -3}, "seed"),
                            ({"image_path": "x.png"}, "only applies to video runs")]:
        with pytest.raises(ValueError, match=message):
            generator.check(**{**good, **change})
    result = generator(**good)
    assert Image.open(result["picture"]).size == (2 + 2 * 34, 2 + 34)  # one row of two 32-pixel samples


def test_the_page_in_a_real_browser(run, tmp_path):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium found: install Debian's chromium (apt-get install chromium) or set PYRAFLOW_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python client is not installed (pip install playwright)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pyraflow", "serve", "--checkpoint", str(run), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        else:
            pytest.fail("pyraflow serve did not answer within 120 s")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(url, wait_until="networkidle")
            page.locator("#prompts textarea").fill("a handwritten digit seven")
            page.locator("#seed input").fill("5")
            page.locator("#generate").click()
            picture = page.locator("#result img")
            picture.wait_for(timeout=60000)
            served = page.request.get(picture.get_attribute("src")).body()
            assert "stage 2" in page.locator("#summary").inner_text()  # the time per stage is shown
            # an empty prompt is refused with the reason, and the page still generates afterwards
            page.locator("#prompts textarea").fill("")
            page.locator("#generate").click()
            page.get_by_text("Enter a prompt").first.wait_for(timeout=30000)
            page.locator("#prompts textarea").fill("a handwritten digit one\na handwritten digit two")
            page.locator("#generate").click()
            page.locator("#summary").get_by_text("8 sample(s)").wait_for(timeout=60000)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    image = Image.open(io.BytesIO(served))
    assert image.size == (2 + 4 * 34, 2 + 34)  # the page's default: 4 samples of one prompt, in one row
    reference = tmp_path / "sample.png"
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a handwritten digit seven", "--num", "4", "--seed", "5",
                 "--device", "cpu", "--out", str(reference)]) == 0
    assert np.array_equal(np.asarray(image.convert("L")), np.asarray(Image.open(reference).convert("L")))


def test_serve_refuses_a_port_in_use_and_binds_to_this_machine_by_default(run, capsys):
    from pyraflow.cli import build_parser

    assert build_parser().parse_args(["serve", "--checkpoint", "x"]).host == "127.0.0.1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(run), "--port", str(port)]) == 2
    assert "pass another --port" in capsys.readouterr().err


def test_a_video_run_serves_a_gif_and_refuses_frames_it_cannot_make(tmp_path):
    from pyraflow.sample import load_pipeline
    from pyraflow.serve import Generator
    from test_video import TINY_VIDEO

    run = tmp_path / "video-run"
    run_training(load_config(None, TINY_VIDEO), run, max_steps=1, progress=False)
    generator = Generator(load_pipeline(run, "cpu"), tmp_path / "serve")
    progress = []
    result = generator("a cartoon rabbit", 1, 1, 2.0, 0, frames=5, on_stage=lambda done, k: progress.append(done))
    assert Image.open(result["video"]).n_frames == 5 and result["picture"].endswith("contact-sheet.png")
    assert progress == list(range(1, 3 * 3 + 1))  # 3 units (first frame + 2 units of 2) x 3 stages
    with pytest.raises(ValueError, match="this run makes 1 to 5 frames"):
        generator.check("a cartoon rabbit", 1, 1, 2.0, 0, 9, None)


def test_a_released_folder_is_served(tmp_path):
    """The tiny released miniflux folder's page comes up and its generator makes a picture."""
    from pathlib import Path

    from pyraflow.serve import serve

    folder = Path(__file__).parent / "fixtures" / "pyramid-flow-pipeline" / "released" / "pyramid-flow-miniflux-tiny"
    port = free_port()
    page = serve(folder, port=port, device="cpu", block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200 and b"pyramid-flow-miniflux-tiny" in response.read()
    finally:
        page.close()
