"""torchrun with 2 processes (gloo, CPU) against a single process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from destseg.checkpoint import load_checkpoint

ARGS = ["--category", "widget", "--teacher", "efficientnet_lite0", "--image-size", "64", "--steps", "6",
        "--student-steps", "3", "--batch-size", "4", "--no-progress", "--precision", "fp32", "--device", "cpu",
        "--checkpoint-every", "1000", "--log-every", "1"]


def losses(run):
    lines = [json.loads(line) for line in (run / "train.log").read_text().splitlines()]
    return [d["loss"] for d in lines if "loss" in d]


def test_two_process_gloo_matches_single_process(tmp_path, tiny_mvtec):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "destseg", "train", "--data", str(tiny_mvtec), "--out", str(single),
                    *ARGS, "--checkpoint-every", "1"], check=True, env=env, capture_output=True)
    ddp = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "destseg", "train", "--data", str(tiny_mvtec), "--out", str(ddp), *ARGS],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoint.pt", "config.json", "thresholds.json", "train.log"]
    ckpt = load_checkpoint(ddp / "checkpoint.pt")
    assert ckpt["finished"] and ckpt["step"] == 6
    a, b = losses(single), losses(ddp)
    assert len(a) == len(b) == 6
    # Same samples, same synthesis, same initial weights; only BatchNorm batch statistics differ (each
    # process normalises over its half of the batch), so the curves agree to within a few percent.
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=0.05)
