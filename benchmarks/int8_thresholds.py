"""Do int8 scores shift against thresholds set in fp32? For each run (trained with ``--threshold-holdout 0``,
so that its good-image thresholds are those of its training images), OpenVINO fp32 and int8 score every
training image and every good test image; printed per run: the split-conformal 1% image threshold of each
precision, the mean and sd of the int8 - fp32 score change, the pixel thresholds, and the share of good test
images each threshold flags in each precision.

    .venv/bin/python benchmarks/int8_thresholds.py RUN...   (e.g. the copies benchmarks/int8_seeds.py makes)
"""

import sys

import numpy as np

from destseg.data.datasets import TestDataset, TestSample
from destseg.infer import load_inference
from destseg.models.backbones import backbone_spec
from destseg.scoring import score_images
from destseg.thresholds import conformal_threshold, map_peaks


def main() -> None:
    for run in sys.argv[1:]:
        res = {}
        for prec in ("fp32", "int8"):
            inf = load_inference(run, precision=prec, backend="openvino")
            idx = inf.run.data.scan()
            norm = backbone_spec(inf.config.teacher).normalize
            train = TestDataset([TestSample(p, 0, None, "good") for p in idx.train], inf.config.image_size, norm)
            good = TestDataset([s for s in idx.test if s.label == 0], inf.config.image_size, norm)
            ts, tm = score_images(inf.model, train, inf.device, None, 16)
            gs, gm = score_images(inf.model, good, inf.device, None, 16)
            res[prec] = (ts, map_peaks(tm), gs, map_peaks(gm))
        f, q = res["fp32"], res["int8"]
        thr_f, thr_q = conformal_threshold(f[0], 0.01), conformal_threshold(q[0], 0.01)
        pthr_f, pthr_q = conformal_threshold(f[1], 0.01), conformal_threshold(q[1], 0.01)
        d = q[0] - f[0]
        print(f"{run}: image threshold fp32 {thr_f:.4f} int8 {thr_q:.4f} ({thr_q / thr_f - 1:+.2%}); int8 - fp32 "
              f"training scores mean {d.mean():+.4f} sd {d.std():.4f} (fp32 score sd {f[0].std():.4f}); pixel "
              f"threshold {pthr_f:.4f} / {pthr_q:.4f}; good test images flagged at the fp32 threshold: fp32 "
              f"{np.mean(f[2] >= thr_f):.2f}, int8 {np.mean(q[2] >= thr_f):.2f}, int8 at its own "
              f"{np.mean(q[2] >= thr_q):.2f}; pixel: {np.mean(f[3] >= pthr_f):.2f} / {np.mean(q[3] >= pthr_f):.2f}"
              f" / {np.mean(q[3] >= pthr_q):.2f}; training images above the fp32 threshold in int8 "
              f"{np.mean(q[0] >= thr_f):.3f}", flush=True)


if __name__ == "__main__":
    main()
