"""Do two source trees train and test the same? Records, for tiny deterministic runs of every built-in model
(and, where ../shared/data is present, a short bottle run), the digest of the trained weights and the
metrics; run it once per tree and compare the two reports (a refactoring should change neither).

    cd TREE_A && python benchmarks/same_results.py /tmp/a      # cwd first on sys.path: this tree's destseg
    cd TREE_B && python benchmarks/same_results.py /tmp/b
    python benchmarks/same_results.py --compare /tmp/a /tmp/b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METRICS = ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90", "dest_i_auroc", "dest_p_ap")


def runs(data: Path) -> dict[str, list[str]]:
    tiny = ["--data", str(data), "--category", "widget", "--image-size", "64", "--batch-size", "2"]
    out = {"destseg": tiny + ["--model", "destseg", "--steps", "6", "--student-steps", "3"],
           "tesd": tiny + ["--model", "tesd", "--steps", "6", "--student-steps", "3"],
           "stfpm": tiny + ["--model", "stfpm", "--epochs", "2"]}
    if (SHARED / "mvtec" / "bottle").is_dir():
        out["bottle"] = ["--data", str(SHARED / "mvtec"), "--category", "bottle", "--model", "destseg", "--steps", "6",
                         "--student-steps", "3", "--batch-size", "4", "--texture-dir", str(SHARED / "textures"),
                         "--precision", "fp32"]
    return out


def record(out: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_mvtec

    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not data.exists():
        make_mvtec(data, n_train=12, n_good=3, n_defect=3, size=64)
    py, report = [sys.executable, "-m", "destseg"], {}
    for name, args in runs(data).items():
        run = out / f"run-{name}"
        subprocess.run(py + ["train", "--out", str(run), "--teacher", "efficientnet_lite0", "--no-progress",
                             "--overwrite", "--schedule", "paper", *args], check=True)
        precision = ["--precision", "fp32"] if "--precision" in args else []
        result = subprocess.run(py + ["test", "--run", str(run), "--json", "--no-progress", "--no-report",
                                      "--workers", "0", "--backend", "torch", *precision],
                                check=True, capture_output=True, text=True)
        metrics = json.loads(result.stdout)
        state = torch.load(run / "checkpoint.pt", weights_only=True)["model_state"]
        digest = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(state.items()))).hexdigest()
        report[name] = {"weights": digest, "metrics": {k: metrics.get(k) for k in METRICS}}
        print(name, digest[:16], report[name]["metrics"]["i_auroc"], flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))


def compare(a: Path, b: Path) -> int:
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    same = True
    for name in sorted(set(ra) | set(rb)):
        x, y = ra.get(name), rb.get(name)
        ok = x is not None and x == y
        same &= ok
        print(f"{name}: {'same weights and metrics' if ok else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path, help="where to write this tree's report")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two reports")
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if args.out is None:
        p.error("give OUT, or --compare A B")
    record(args.out)
