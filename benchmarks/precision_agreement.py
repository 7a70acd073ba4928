"""bf16 vs fp32 agreement of a trained run on its test split: Spearman rank correlation of the image
scores, max map difference, and both metric sets.

    .venv/bin/python benchmarks/precision_agreement.py --run runs/bottle_destseg_cpu
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import spearmanr

from destseg.infer import evaluate_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    args = p.parse_args()
    results = {}
    for precision in ("fp32", "bf16"):
        results[precision] = evaluate_run(args.run, device="cpu", precision=precision, progress=False)
    out32, out16 = results["fp32"].pop("_outputs"), results["bf16"].pop("_outputs")
    rho = spearmanr(out32.scores, out16.scores).statistic
    summary = {
        "spearman_image_scores": float(rho),
        "max_abs_map_diff": float(np.abs(out32.maps - out16.maps).max()),
        "map_range_fp32": [float(out32.maps.min()), float(out32.maps.max())],
        **{f"{k}_{prec}": results[prec][k] for prec in results for k in
           ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90", "images_per_s")},
    }
    print(json.dumps(summary, indent=2))
    # metrics.json/thresholds.json of the run now hold the last (bf16) evaluation, as `destseg test`.


if __name__ == "__main__":
    main()
