"""docs/line-page.png: the serve page with recent decisions and feedback, on a copy of a real run.

    .venv/bin/python benchmarks/line_page_screenshot.py --run RUN --images IMG ... [--false-alarm N] \
        [--out docs/line-page.png]

Needs headless Chromium and chromedriver (Debian: apt-get install chromium chromium-driver) and selenium.
The run is copied to a temporary folder (the feedback is written there, not into RUN); a run trained before
RUN/calibration.json existed gets one from its training images (as training with --threshold-holdout 0
would write it), so that the drift line has a reference.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def ensure_calibration(run_dir: Path) -> None:
    from destseg.data.images import read_rgb
    from destseg.infer import Detector
    from destseg.run import Run

    run = Run(run_dir)
    if run.calibration() is not None:
        return
    files = sorted(run.data.scan().train)
    det = Detector.load(run_dir, backend="torch")
    scores, peaks = [], []
    for i in range(0, len(files), 16):
        for p in det.predict_batch([read_rgb(f) for f in files[i:i + 16]]):
            scores.append(p.score)
            peaks.append(float(p.map.max()))
    run.write_calibration(files, scores, peaks, "training images (seen in training)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--images", nargs="+", required=True, type=Path)
    ap.add_argument("--false-alarm", type=int, default=1, help="which of the recent rows to mark (1 = newest)")
    ap.add_argument("--out", type=Path, default=Path("docs/line-page.png"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    run = tmp / args.run.name
    shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("openvino", "feedback", "thresholds-history"))
    ensure_calibration(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "destseg", "serve", "--run", str(run), "--port", str(port)],
                              cwd=tmp)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1300"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 120)
            for n, image in enumerate(args.images, 1):
                driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
                wait.until(lambda d, n=n: len(d.find_elements(By.CSS_SELECTOR, "#recent-rows tr")) == n)
            row = driver.find_elements(By.CSS_SELECTOR, "#recent-rows tr")[args.false_alarm - 1]
            row.find_element(By.CSS_SELECTOR, "button.false_alarm").click()
            wait.until(lambda d: "1 false alarm" in d.find_element(By.ID, "fb-counts").text)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"wrote {args.out}")
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
