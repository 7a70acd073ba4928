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
    assert sorted(p.name for p in ddp.iterdir()) == ["calibration.json", "checkpoint.pt", "config.json",
                                                     "thresholds.json", "train.log"]
    ckpt = load_checkpoint(ddp / "checkpoint.pt")
    assert ckpt["finished"] and ckpt["step"] == 6
    a, b = losses(single), losses(ddp)
    assert len(a) == len(b) == 6
    # Same samples, same synthesis, same initial weights; only BatchNorm batch statistics differ (each
    # process normalises over its half of the batch), so the curves agree to within a few percent.
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=0.05)


def test_predict_under_torchrun_shards_the_inputs_and_merges_the_same_results(tmp_path, tiny_mvtec):
    """Two gloo processes score half of the inputs each; rank 0 merges the rows in input order: the same
    files, names, decisions and (to float noise) scores as one process, and every overlay and mask."""
    import csv
    import shutil

    from PIL import Image

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "destseg", "train", "--data", str(tiny_mvtec), "--out", str(run),
                    *ARGS], check=True, env=env, capture_output=True)
    inputs = tmp_path / "in"
    shutil.copytree(tiny_mvtec / "widget" / "test", inputs / "test")
    shutil.copytree(tiny_mvtec / "widget" / "train", inputs / "train")
    Image.open(inputs / "test" / "good" / "000.png").save(inputs / "test" / "good" / "000.jpg")  # a name clash
    (inputs / "broken.png").write_bytes(b"not an image")
    args = ["predict", "--run-dir", str(run), "--input", str(inputs), "--backend", "torch", "--device", "cpu",
            "--precision", "fp32", "--batch-size", "3", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "destseg", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "destseg", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True)
    assert one.returncode == 1 and "broken.png" in one.stderr  # a skipped file: exit code 1, in both
    assert "broken.png" in two.stderr, two.stderr[-3000:]

    def table(name):
        with open(tmp_path / name / "results.csv", newline="") as f:
            return list(csv.DictReader(f))

    a, b = table("one"), table("two")
    assert len(a) == len(b) == 6 + 2 + 2 + 1
    for x, y in zip(a, b):
        assert (x["file"], x["decision"], x["overlay"], x["mask"]) == (y["file"], y["decision"], y["overlay"], y["mask"])
        assert float(y["score"]) == pytest.approx(float(x["score"]), rel=1e-5)
        assert (tmp_path / "two" / y["overlay"]).is_file() and (tmp_path / "two" / y["mask"]).is_file()
    ja, jb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert ja["skipped"] == jb["skipped"] and len(jb["results"]) == len(a)
    assert not list((tmp_path / "two").glob(".results*"))  # the per-rank rows merged and removed
