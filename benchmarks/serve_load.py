"""Load test of `destseg serve` on localhost: throughput, latency percentiles, errors and server memory
for several numbers of concurrent clients, bounded in requests and time.

    .venv/bin/python benchmarks/serve_load.py --run runs/destseg-bottle-s0 \
        --images ../shared/data/mvtec/bottle/test --clients 8,32 --requests 400 [--screenshot docs/img/serve.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, bodies: list[bytes], clients: int, requests: int, max_s: float) -> dict:
    latencies, errors, batch_sizes = [], [], []
    next_i = 0
    deadline = time.perf_counter() + max_s

    async def client(c: httpx.AsyncClient):
        nonlocal next_i
        while next_i < requests and time.perf_counter() < deadline:
            i = next_i
            next_i += 1
            t = time.perf_counter()
            r = await c.post(url, content=bodies[i % len(bodies)], headers={"content-type": "image/png"})
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors.append(r.text)
            else:
                batch_sizes.append(r.json()["batch_size"])

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
            "images_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "mean_batch": float(np.mean(batch_sizes or [0])),
            "first_error": errors[0][:200] if errors else None}


def screenshot(port: int, image: Path, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,760"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "threshold-value").get_attribute("value"))
        driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "decision").text in ("ok", "defect"))
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--images", required=True, help="folder of PNG images (searched recursively)")
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--requests", type=int, default=400, help="requests per client setting")
    ap.add_argument("--max-seconds", type=float, default=300, help="time bound per client setting")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--screenshot", type=Path, help="also save a screenshot of the page after one upload")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    paths = sorted(Path(args.images).rglob("*.png"))
    bodies = [p.read_bytes() for p in paths]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "destseg", "serve", "--run", args.run, "--port", str(port),
                               "--max-batch", str(args.max_batch)])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                health = httpx.get(url + "/health").json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit("server did not start")
        asyncio.run(load(url + "/predict", bodies[:4], 4, 16, 60))  # warm-up
        rows = []
        rss_before = rss_mib(server.pid)
        for clients in [int(c) for c in args.clients.split(",")]:
            row = asyncio.run(load(url + "/predict", bodies, clients, args.requests, args.max_seconds))
            row["server_rss_mib"] = rss_mib(server.pid)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.screenshot:
            defect = next((p for p in paths if "good" not in p.parts), paths[0])
            screenshot(port, defect, args.screenshot)
        result = {"run": args.run, "images": len(bodies), "health": health, "server_rss_mib_after_warmup": rss_before,
                  "rows": rows}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print(f"server RSS after warm-up {rss_before:.0f} MiB; after each setting: "
              + ", ".join(f"{r['server_rss_mib']:.0f}" for r in rows))
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
