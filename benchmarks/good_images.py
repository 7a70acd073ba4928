"""How many good images a user needs: the default trained on N good images of a category (a seeded draw from its
training images, as a plain folder, the way a user's own images train) and tested on the category's full test
split, for each N and seed; a table of the six metrics against N.

    .venv/bin/python benchmarks/good_images.py --data ../shared/data/mvtec --category bottle \
        --counts 10,25,50,100,all --seeds 2 --texture-dir ../shared/data/textures --out runs/good-bottle

Each (N, seed) trains in OUT/n<N>-s<seed>/ with ``destseg train --data OUT/images/n<N>-s<seed> --seed S
--rotation R --threshold-holdout 0`` (R: the paper's rotation for the category, as a run on the category's folder
gets it) and is tested with ``destseg test --run ... --data ROOT --category C``. Seed S draws the images and seeds
the training. Runs already tested are kept; an interrupted training resumes. OUT/results.md holds the table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

from destseg.benchmark import METRIC_LABELS, METRICS, hardware, mean_sd
from destseg.checkpoint import atomic_write_text, load_checkpoint
from destseg.data.datasets import default_rotation
from destseg.data.images import list_images


def draw(images: list[Path], count: int, seed: int, folder: Path) -> None:
    """``folder`` holding links to ``count`` of ``images`` drawn with ``seed`` (all of them for count 0)."""
    chosen = images if count == 0 else random.Random(seed).sample(images, count)
    folder.mkdir(parents=True, exist_ok=True)
    for path in chosen:
        link = folder / path.name
        if not link.is_symlink():
            link.symlink_to(path.resolve())


def one(args, images: list[Path], count: int, seed: int) -> dict:
    name = f"n{count or 'all'}-s{seed}"
    run, log = args.out / name, args.out / f"{name}.log"
    py = [sys.executable, "-m", "destseg"]
    if not (run / "metrics.json").is_file():
        ckpt = run / "checkpoint.pt"
        if ckpt.is_file() and load_checkpoint(ckpt).get("finished"):
            cmd = None
        elif ckpt.is_file():
            cmd = py + ["train", "--out", str(run), "--resume", "--no-progress"]
        else:
            subset = args.out / "images" / name
            draw(images, count, seed, subset)
            cmd = py + ["train", "--data", str(subset), "--out", str(run), "--seed", str(seed), "--rotation",
                        default_rotation(args.category), "--threshold-holdout", "0", "--no-progress",
                        *(["--texture-dir", str(args.texture_dir)] if args.texture_dir else []), *args.train_args]
        with open(log, "a") as out:
            for step in ([cmd] if cmd else []) + [py + ["test", "--run", str(run), "--data", str(args.data),
                                                        "--category", args.category, "--json", "--no-progress"]]:
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode:
                    sys.exit(f"good_images: {name} failed; see {log}")
    metrics = json.loads((run / "metrics.json").read_text())
    minutes = load_checkpoint(run / "checkpoint.pt").get("elapsed_s", 0) / 60
    return {"count": count or len(images), "seed": seed, **{k: metrics[k] for k in METRICS},
            "train_minutes": minutes, "precision": metrics.get("precision")}


def table(rows: list[dict], meta: str) -> str:
    lines = [meta, "", "| good images | seeds | " + " / ".join(METRIC_LABELS) + " | worst seed (I-AUROC) | train min |",
             "|---|---|---|---|---|"]
    for count in sorted({r["count"] for r in rows}):
        group = [r for r in rows if r["count"] == count]
        worst = min(group, key=lambda r: r["i_auroc"])
        lines.append(f"| {count} | {', '.join(str(r['seed']) for r in group)} | "
                     + " / ".join(mean_sd([100 * r[k] for r in group]) for k in METRICS)
                     + f" | seed {worst['seed']}: {100 * worst['i_auroc']:.1f} | "
                     + f"{statistics.fmean(r['train_minutes'] for r in group):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="dataset root in the MVTec AD layout")
    p.add_argument("--category", required=True)
    p.add_argument("--counts", default="10,25,50,100,all", help="comma-separated numbers of good images, or all")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per count")
    p.add_argument("--texture-dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="train options for every run, after --")
    args = p.parse_args()
    args.train_args = [a for a in args.train_args if a != "--"]
    images = sorted(list_images(args.data / args.category / "train" / "good"))
    counts = [0 if c.strip() == "all" else int(c) for c in args.counts.split(",")]
    if any(c > len(images) for c in counts):
        sys.exit(f"good_images: --counts asks for more than the {len(images)} training images of {args.category}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in counts:
        for seed in range(args.seeds):
            rows.append(one(args, images, count, seed))
            atomic_write_text(args.out / "results.json", json.dumps(rows, indent=2))
    precisions = ", ".join(sorted({str(r["precision"]) for r in rows}))
    meta = (f"{args.category}: the default trained on N good images, tested on the full test split; "
            f"{hardware()}; test engine {precisions}")
    atomic_write_text(args.out / "results.md", table(rows, meta))
    print(table(rows, meta))


if __name__ == "__main__":
    main()
