"""End to end on whatever device is present: train, test and predict one category, with the utilisation
that explains each figure (GPU busy % and memory from nvidia-smi where there is one, CPU busy % always).

    python benchmarks/end_to_end.py --data ../shared/data/mvtec --category bottle --model destseg \
        --schedule paper --pngs 3000 --out runs/e2e [-- extra train flags, e.g. --precision fp32]

Training: images/s of each stage from train.log (the time between its first and last log lines), wall
time, peak GPU memory. Test: `destseg test`'s end-to-end and model-only images/s and the metric time.
Predict: `destseg predict` on ``--pngs`` PNG files (the test images copied round-robin), images/s with
reading and writing included. Writes OUT/summary.json and OUT/summary.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from destseg.benchmark import hardware
from destseg.checkpoint import load_checkpoint


class Utilisation:
    """Samples GPU busy %, GPU memory (nvidia-smi) and CPU busy % (/proc/stat) every ``period`` s."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.smi = shutil.which("nvidia-smi")
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu_times():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    def _gpu(self):
        if not self.smi:
            return None, None
        try:
            out = subprocess.run([self.smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=5).stdout
            util, mem = (float(v) for v in out.strip().split(","))
            return util, mem
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None, None

    def _run(self):
        last = self._cpu_times()
        while not self._stop.wait(self.period):
            now = self._cpu_times()
            cpu = None
            if last and now and now[0] > last[0]:
                cpu = 100.0 * (1 - (now[1] - last[1]) / (now[0] - last[0]))
            last = now
            self.samples.append((cpu, *self._gpu()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        def mean(i):
            vals = [s[i] for s in self.samples if s[i] is not None]
            return round(float(np.mean(vals)), 1) if vals else None

        gpu_mem = [s[2] for s in self.samples if s[2] is not None]
        return {"cpu_busy_pct": mean(0), "gpu_busy_pct": mean(1),
                "gpu_mem_max_mib": max(gpu_mem) if gpu_mem else None}


def run(cmd: list[str], log: Path) -> tuple[str, float, dict]:
    """Run a destseg command; (stdout, wall seconds, utilisation). Exits with the log's tail on failure."""
    t0 = time.perf_counter()
    with Utilisation() as util, open(log, "a") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
                 f"{log.read_text()[-3000:]}")
    return proc.stdout, wall, util.summary()


def stage_speeds(run_dir: Path) -> dict:
    """Images/s of each training stage from train.log (between the stage's first and last log lines)."""
    batch = json.loads((run_dir / "config.json").read_text())["config"]["batch_size"]
    stages: dict[str, list] = {}
    for line in (run_dir / "train.log").read_text().splitlines():
        rec = json.loads(line)
        if "stage" in rec and "time_s" in rec:
            stages.setdefault(rec["stage"], []).append((rec["step"], rec["time_s"]))
    out = {}
    for name, pts in stages.items():
        if len(pts) >= 2 and pts[-1][1] > pts[0][1]:
            out[name] = round((pts[-1][0] - pts[0][0]) * batch / (pts[-1][1] - pts[0][1]), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--model", default="destseg")
    p.add_argument("--teacher", default="efficientnet_lite0")
    p.add_argument("--schedule", default="paper")
    p.add_argument("--texture-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pngs", type=int, default=3000, help="images for the predict measurement (0: skip)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more `destseg train` flags")
    args = p.parse_args()
    extra = [a for a in args.train_args if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    py = [sys.executable, "-m", "destseg"]
    run_dir = args.out / "run"
    summary: dict = {"command": " ".join(sys.argv), "device": hardware()}

    cmd = py + ["train", "--data", args.data, "--category", args.category, "--model", args.model,
                "--teacher", args.teacher, "--schedule", args.schedule, "--seed", str(args.seed),
                "--out", str(run_dir), "--overwrite", "--no-progress"]
    cmd += (["--texture-dir", args.texture_dir] if args.texture_dir else []) + extra
    _, wall, util = run(cmd, log)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    summary["train"] = {"wall_s": round(wall, 1), "train_s": round(ckpt.get("elapsed_s", 0), 1),
                        "steps": ckpt["step"], "images_per_s_by_stage": stage_speeds(run_dir),
                        "peak_gpu_mib": ckpt.get("peak_gpu_mib"), **util}

    out, wall, util = run(py + ["test", "--run", str(run_dir), "--json", "--no-progress", "--no-report"], log)
    metrics = json.loads(out)
    summary["test"] = {"wall_s": round(wall, 1), "n": metrics["n_test"], "precision": metrics["precision"],
                       **{k: metrics.get(k) for k in ("images_per_s", "model_images_per_s", "metrics_s", "i_auroc",
                                                      "p_auroc", "p_ap", "pro", "iap", "iap90")}, **util}

    if args.pngs:
        src = sorted(Path(args.data, args.category, "test").rglob("*.png"))
        pngs = args.out / "pngs"
        shutil.rmtree(pngs, ignore_errors=True)
        pngs.mkdir()
        for i in range(args.pngs):
            shutil.copyfile(src[i % len(src)], pngs / f"{i:06d}.png")
        out, wall, util = run(py + ["predict", "--run", str(run_dir), "--input", str(pngs), "--out",
                                    str(args.out / "predict"), "--overwrite", "--no-progress"], log)
        rate = re.search(r"\(([\d.]+) images/s", out)
        summary["predict"] = {"wall_s": round(wall, 1), "n": args.pngs,
                              "images_per_s": float(rate.group(1)) if rate else None, **util}
        shutil.rmtree(pngs, ignore_errors=True)
        shutil.rmtree(args.out / "predict", ignore_errors=True)

    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary)
    (args.out / "summary.md").write_text(md)
    print(md)


def markdown(s: dict) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    t, e = s["train"], s["test"]
    lines = [f"Device: {s['device']}. Command: `{s['command']}`", "",
             "| phase | wall s | images/s | CPU busy % | GPU busy % | GPU memory max MiB |", "|---|---|---|---|---|---|"]
    speeds = ", ".join(f"{k} {v}" for k, v in t["images_per_s_by_stage"].items()) or "-"
    lines.append(f"| train ({t['steps']} steps, {t['train_s']} s in the loop) | {t['wall_s']} | {speeds} | "
                 f"{f(t['cpu_busy_pct'])} | {f(t['gpu_busy_pct'])} | {f(t['gpu_mem_max_mib'], '{:.0f}')} |")
    lines.append(f"| test ({e['n']} images, {e['precision']}; metrics {f(e['metrics_s'], '{:.2f}')} s) | {e['wall_s']} | "
                 f"{f(e['images_per_s'])} end to end, {f(e['model_images_per_s'])} model | {f(e['cpu_busy_pct'])} | "
                 f"{f(e['gpu_busy_pct'])} | {f(e['gpu_mem_max_mib'], '{:.0f}')} |")
    if "predict" in s:
        r = s["predict"]
        lines.append(f"| predict ({r['n']} PNGs) | {r['wall_s']} | {f(r['images_per_s'])} | {f(r['cpu_busy_pct'])} | "
                     f"{f(r['gpu_busy_pct'])} | {f(r['gpu_mem_max_mib'], '{:.0f}')} |")
    m = [e.get(k) for k in ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90")]
    if all(v is not None for v in m):
        lines += ["", "Metrics (I-AUROC, P-AUROC, P-AP, PRO, IAP, IAP@90): " + " / ".join(f"{100 * v:.1f}" for v in m)]
    lines.append(f"Peak GPU memory allocated in training: {f(t['peak_gpu_mib'], '{:.0f}')} MiB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
