import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))

# OpenVINO's model converter sends usage telemetry unless it runs in CI, from a forked process that the test
# process waits for at exit: on a machine without network its DNS lookup can hold `make test` for minutes after
# the last test. The suite runs as CI runs it, which also picks hypothesis's CI profile (derandomised).
os.environ.setdefault("CI", "true")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def normal_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A good image of the tiny product: smooth noise (8x8 noise resized bilinearly)."""
    img = rng.normal(120, 10, (size // 8, size // 8, 3)).clip(0, 255).astype(np.uint8)
    return np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def make_mvtec(root: Path, category="widget", n_train=6, n_good=2, n_defect=2, size=64, seed=0) -> Path:
    """A tiny MVTec-layout dataset: smooth noise images; defects are bright squares with exact masks."""
    rng = np.random.default_rng(seed)
    base = root / category

    (base / "train" / "good").mkdir(parents=True)
    (base / "test" / "good").mkdir(parents=True)
    (base / "test" / "spot").mkdir(parents=True)
    (base / "ground_truth" / "spot").mkdir(parents=True)
    for i in range(n_train):
        Image.fromarray(normal_image(rng, size)).save(base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(normal_image(rng, size)).save(base / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defect):
        img, mask = normal_image(rng, size), np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 20, 2)
        img[y:y + 12, x:x + 12] = 250
        mask[y:y + 12, x:x + 12] = 255
        Image.fromarray(img).save(base / "test" / "spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def tiny_mvtec(tmp_path):
    return make_mvtec(tmp_path / "data")


@pytest.fixture
def shared_bottle():
    root = SHARED / "mvtec"
    if not (root / "bottle" / "train").is_dir():
        pytest.skip(f"shared MVTec bottle data not found at {root} (only on the project machines)")
    return root


def chromium_paths():
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


needs_chromium = pytest.mark.skipif(not all(chromium_paths()), reason="headless Chromium and chromedriver not "
                                    "installed (Debian: apt-get install chromium chromium-driver)")


@contextlib.contextmanager
def served_page(run_dir, *serve_args, window="1100,900"):
    """``destseg serve`` on a free port and a headless Chromium on its page: yields the selenium driver."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen([sys.executable, "-m", "destseg", "serve", "--run", str(run_dir), "--port", str(port),
                               *serve_args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        browser, driver_path = chromium_paths()
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={window}"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            yield driver
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(10)
