"""OpenVINO int8 against OpenVINO fp32 on trained runs (e.g. the seeds of a `destseg benchmark`): each run is
copied to a work folder (its metrics and thresholds stay as they are), evaluated on its test split in both
precisions, and the per-run metrics and the mean ± sd over the runs are printed for each precision.

    .venv/bin/python benchmarks/int8_seeds.py --work /tmp/int8 runs/acc-b-64-128/bottle-destseg-s*

Run under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 to time an AVX2 CPU (the metrics do not change:
the quantised model is the same, see benchmarks/int8_recipes.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from destseg.infer import evaluate_run
from destseg.metrics import METRIC_NAMES
from destseg.run import RUN_FILES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--work", type=Path, required=True, help="folder for the copies (and their IRs)")
    p.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    args = p.parse_args()
    table: dict[str, dict[str, dict]] = {}
    for run in args.runs:
        copy = args.work / run.parent.name / run.name
        copy.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if (run / name).is_file() and not (copy / name).exists():
                shutil.copy2(run / name, copy / name)
        for precision in args.precision:
            saved = copy / f"metrics-{precision}.json"
            if not saved.is_file():
                r = evaluate_run(copy, precision=precision, backend="openvino", progress=False)
                r.pop("_outputs")
                saved.write_text(json.dumps(r, indent=2))
            r = json.loads(saved.read_text())
            table.setdefault(precision, {})[str(run)] = r
            print(f"{run} {precision}: " + " / ".join(f"{100 * r[k]:.1f}" for k in METRIC_NAMES)
                  + f"  model {r['model_images_per_s']:.1f} img/s", flush=True)
    print("\n| precision | runs | " + " | ".join(METRIC_NAMES) + " |")
    print("|---|---|" + "---|" * len(METRIC_NAMES))
    for precision, rows in table.items():
        cells = []
        for k in METRIC_NAMES:
            v = 100 * np.array([r[k] for r in rows.values()])
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}")
        print(f"| {precision} | {len(rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
