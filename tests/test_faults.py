"""Faults injected on purpose: a full disk (ENOSPC) while predict writes and while a checkpoint is saved, and
kill -9 while thresholds.json and calibration.json are rewritten and while recalibrate runs. After each, the run
and its records read as before (or as after), never half-written."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_mvtec
from destseg.checkpoint import load_checkpoint, save_checkpoint
from destseg.cli import main
from destseg.models import model_config
from destseg.train import DataSource, TrainOptions, train

TINY = dict(teacher="efficientnet_lite0", image_size=64, batch_size=4, steps=6, student_steps=3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_mvtec(tmp_path_factory.mktemp("d"), n_train=24, n_good=4, n_defect=4)
    run = tmp_path_factory.mktemp("r") / "run"
    train(run, "destseg", model_config("destseg", **TINY), DataSource(str(data), "widget"),
          options=TrainOptions(progress=False, precision="fp32"))
    return run, data


def full_disk(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_predict_is_one_clear_error_and_leaves_no_partial_results(run, tmp_path, monkeypatch,
                                                                                     capsys):
    import destseg.predict as predict

    run_dir, data = run
    out = tmp_path / "out"
    calls = []

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            full_disk()
        return real(*args)

    real = predict.write_pngs
    monkeypatch.setattr(predict, "write_pngs", fail_on_third)
    code = main(["predict", "--run", str(run_dir), "--input", str(data / "widget" / "test"), "--out", str(out),
                 "--no-progress", "--backend", "torch", "--precision", "fp32", "--workers", "0"])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert not (out / "results.csv").exists() and not (out / "results.json").exists()
    assert not list(out.glob(".results*"))  # no temporary rows left behind


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_checkpoint(run, tmp_path, monkeypatch):
    import torch

    run_dir, _ = run
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": "destseg", "config": {}, "step": 1, "model_state": {}})
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"model": "destseg", "config": {}, "step": 2, "model_state": {}})
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


WRITER = """
import sys, numpy as np
from destseg.run import Run
from destseg.thresholds import good_image_thresholds
run = Run(sys.argv[1])
rng = np.random.default_rng(0)
i = 0
while True:
    i += 1
    n = 2000 + i  # each round's calibration.json and thresholds.json are large and differ
    t = run.calibrate([f"img{k}.png" for k in range(n)], rng.random(n), rng.random((n, 8, 8)), 0.01, f"round {i}")
    run.write_thresholds({**t, "round": i})
    print(i, flush=True)
"""


def test_kill_9_while_thresholds_and_calibration_are_rewritten_leaves_both_readable(tmp_path):
    import shutil

    from destseg.run import Run

    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline()  # at least one complete round
        time.sleep(float(rng.uniform(0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        thresholds, calibration = Run(run).thresholds(), Run(run).calibration()  # both parse
        assert thresholds["n_images"] == 2000 + thresholds["round"]
        assert len(calibration["scores"]) == len(calibration["files"]) == len(calibration["peaks"])
        for old in (run / "thresholds-history").glob("*.json"):
            json.loads(old.read_text())  # every kept one whole
    shutil.rmtree(run)


RECALIBRATOR = """
import sys
from destseg.infer import Detector
from destseg.feedback import recalibrate
det = Detector.load(sys.argv[1], backend="torch", precision="fp32")
print("loaded", flush=True)
while True:
    recalibrate(det)
    print("done", flush=True)
"""


def test_kill_9_during_recalibrate_leaves_the_run_usable(run, tmp_path):
    import shutil

    from destseg.infer import Detector
    from destseg.run import Run

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = np.random.default_rng(2)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", RECALIBRATOR, str(copy)], stdout=subprocess.PIPE, text=True,
                                env=env)
        assert proc.stdout.readline().strip() == "loaded"
        time.sleep(float(rng.uniform(0, 0.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        thresholds = Run(copy).thresholds()
        assert thresholds["image"] is not None and Run(copy).calibration()["scores"]
        det = Detector.load(copy, backend="torch", precision="fp32")
        assert det.predict(np.zeros((64, 64, 3), np.uint8)).is_defect is not None
