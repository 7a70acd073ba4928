"""Which image score ranks defect images above good ones best, per trained DeSTSeg or TESD run.

Four scores: the run's own (the mean of the 100 largest pixels of the segmentation network's map), the same
statistic of the student-teacher product map, and two fusions of the two (sum and larger), each score first
standardised by its mean and spread on the run's good training images.

    .venv/bin/python benchmarks/image_score.py runs/bench/screw-destseg-s0 runs/bench/bottle-destseg-s0

Reads each run's test split (the dataset it trained on, as ``destseg test`` does) and training images, scores
them with PyTorch in fp32 on the CPU and prints one line of I-AUROC per run; writes nothing into the runs.
The training images are the ones the run learned from, so their spread is narrower than new good images' would
be: a fusion that wins here still needs held-out good images before it can become a default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from destseg.data.datasets import TestDataset, TestSample
from destseg.infer import load_inference, test_split
from destseg.metrics import image_metrics
from destseg.models.backbones import backbone_spec
from destseg.run import Run
from destseg.scoring import run_test_split


def scores(inf, samples: list[TestSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segmentation score, student-teacher score, label) per image."""
    dataset = TestDataset(samples, inf.config.image_size, backbone_spec(inf.config.teacher).normalize)
    out = run_test_split(inf.model, dataset, inf.device, inf.dtype, inf.map_outputs, 16, False, 0)
    if "dest_" not in out.extra:
        raise SystemExit(f"image_score: {inf.model_name} has no student-teacher map beside its anomaly map")
    return out.scores, out.extra["dest_"][1], out.labels.astype(bool)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of DeSTSeg or TESD (destseg train)")
    args = p.parse_args()
    print("run | I-AUROC: segmentation (the default) / student-teacher / sum of standardised / max of standardised")
    for path in args.runs:
        run = Run(path)
        index, _ = test_split(run, None)
        inf = load_inference(run.path, "cpu", "fp32", "torch")
        seg, st, labels = scores(inf, index.test)
        train_seg, train_st, _ = scores(inf, [TestSample(Path(f), 0, None, "good") for f in index.train])
        z_seg = (seg - train_seg.mean()) / max(train_seg.std(), 1e-12)
        z_st = (st - train_st.mean()) / max(train_st.std(), 1e-12)
        aurocs = [100 * image_metrics(s, labels)["i_auroc"] for s in (seg, st, z_seg + z_st, np.maximum(z_seg, z_st))]
        print(f"{path} | " + " / ".join(f"{a:.1f}" for a in aurocs), flush=True)


if __name__ == "__main__":
    main()
