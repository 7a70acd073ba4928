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


def camera_images(n: int, seed: int) -> list[np.ndarray]:
    """``n`` good images of the tiny product, each a content of its own."""
    from conftest import normal_image

    rng = np.random.default_rng(seed)
    base = [normal_image(rng) for _ in range(8)]
    images = []
    for i in range(n):
        img = base[i % len(base)].copy()
        img[0, 0] = (i % 256, i // 256, seed % 256)
        images.append(img)
    return images


def save_png(img: np.ndarray, path: Path) -> bytes:
    """Write ``img`` as a camera would (a hidden name, then a rename); its bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return buf.getvalue()


def journal_rows(out: Path) -> list[dict]:
    """The journal's scored rows, read as another program would; the CSV export must hold the same rows."""
    import csv
    import sqlite3

    db = sqlite3.connect(f"file:{out / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        cols = [c[1] for c in db.execute("PRAGMA table_info(scored)")]
        rows = [dict(zip(cols, r)) for r in db.execute("SELECT * FROM scored ORDER BY id")]
    finally:
        db.close()
    with open(out / "results.csv", newline="") as f:
        exported = list(csv.DictReader(f))
    assert [(r["file"], r["sha256"]) for r in exported] == [(r["file"], r["sha256"]) for r in rows]
    return rows


def scored_count(out: Path) -> int:
    import sqlite3

    if not (out / "journal.sqlite").exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{out / 'journal.sqlite'}?mode=ro", uri=True)
        try:
            return db.execute("SELECT count(*) FROM scored").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:  # created but its tables not yet committed
        return 0


def watch_args(run_dir, inp, out, *extra):
    return ["watch", "--run", str(run_dir), "--input", str(inp), "--out", str(out), "--backend", "torch",
            "--precision", "fp32", "--device", "cpu", "--settle", "0", *extra]


def test_a_full_disk_while_watch_writes_stops_it_clearly_and_a_restart_scores_each_file_once(run, tmp_path,
                                                                                            monkeypatch, capsys):
    """ENOSPC on a PNG, then SQLite's own 'database or disk is full' on a commit: each stops watch with one
    `destseg: error:` line; the journal keeps the batches before, and the next start scores the rest, once."""
    import hashlib
    import sqlite3

    import destseg.journal as journal
    import destseg.watch as watch

    run_dir, _ = run
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shas = {hashlib.sha256(save_png(img, inp / f"{i:03d}.png")).hexdigest()
            for i, img in enumerate(camera_images(12, seed=1))}
    real_pngs, calls = watch.write_pngs, []

    def full_on_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            full_disk()
        return real_pngs(*args)

    monkeypatch.setattr(watch, "write_pngs", full_on_fifth)
    args = watch_args(run_dir, inp, out, "--once", "--batch-size", "2", "--workers", "0")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert len(journal_rows(out)) == 4  # the two batches before the fault
    monkeypatch.setattr(watch, "write_pngs", real_pngs)

    real_connect = journal.sqlite3.connect

    class FullAtCommit:  # the disk fills up as the batch commits: SQLite's error, as SQLite words it
        def __init__(self, *a, **k):
            self.db = real_connect(*a, **k)

        def execute(self, sql, *a):
            if sql == "COMMIT" and self.db.execute("SELECT count(*) FROM scored").fetchone()[0] > 4:
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *a)

        def __getattr__(self, name):
            return getattr(self.db, name)

    monkeypatch.setattr(journal.sqlite3, "connect", FullAtCommit)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "database or disk is full" in err and "not recorded" in err and "Traceback" not in err
    monkeypatch.setattr(journal.sqlite3, "connect", real_connect)
    assert len(journal_rows(out)) == 4  # the failed commit left nothing behind
    assert main(args) == 0
    rows = journal_rows(out)
    assert sorted(r["file"] for r in rows) == [f"{i:03d}.png" for i in range(12)]
    assert {r["sha256"] for r in rows} == shas
    assert all((out / r["overlay"]).is_file() and (out / r["mask"]).is_file() for r in rows)


def test_a_watcher_killed_at_random_points_scores_every_content_exactly_once(run, tmp_path):
    """A camera stream of 300 files, a few rewritten in place, renamed over a scored name or copied under a new
    name; the watcher killed (SIGKILL) at random points 6 times, then run to the end with --once: every content
    still on disk is in the journal exactly once, under the name it was first met by, with its overlay; nothing
    else is; results.csv holds the journal's rows."""
    import hashlib
    import shutil
    import threading

    from PIL import Image

    run_dir, _ = run
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "cam").mkdir(parents=True)
    images = camera_images(330, seed=2)
    rng = np.random.default_rng(3)
    written: dict[str, str] = {}  # file -> sha256 of what it holds now
    ever: set[str] = set()  # every content written
    lock = threading.Lock()

    def camera():
        for i in range(300):
            name = f"cam/{i:04d}.png"
            kind = rng.random()
            with lock:
                done = sorted(written)
            if done and kind < 0.04:  # a scored or pending name rewritten in place with a new image
                target = done[int(rng.integers(len(done)))]
                data = save_png(images[300 + i % 30], inp / "tmp.bin")
                with open(inp / target, "r+b") as f:
                    f.truncate(0)
                    f.write(data)
                os.remove(inp / "tmp.bin")
                name = target
            elif done and kind < 0.08:  # a new image renamed over an earlier name
                name = done[int(rng.integers(len(done)))]
                data = save_png(images[i], inp / name)
            elif done and kind < 0.12:  # a copy of an earlier image under a new name: not scored again
                src = done[int(rng.integers(len(done)))]
                shutil.copyfile(inp / src, inp / f"cam/.{i}.tmp")
                os.replace(inp / f"cam/.{i}.tmp", inp / name)
                data = (inp / name).read_bytes()
            else:
                data = save_png(images[i], inp / name)
            with lock:
                written[name] = hashlib.sha256(data).hexdigest()
                ever.add(written[name])
            time.sleep(0.03)

    cmd = [sys.executable, "-m", "destseg", *watch_args(run_dir, inp, out, "--batch-size", "4", "--interval",
                                                       "0.05")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cam = threading.Thread(target=camera)
    cam.start()
    counts = []
    try:
        for _ in range(6):
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert "images already scored" in proc.stdout.readline()  # started: the model is loaded
            before, deadline = counts[-1] if counts else 0, time.time() + 120
            while scored_count(out) <= before and time.time() < deadline:  # it is scoring (on a loaded machine
                time.sleep(0.02)                                             # that may take a while)
            time.sleep(float(rng.uniform(0, 0.3)))  # then a random point of the batches that follow
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            counts.append(len(journal_rows(out)))  # readable after each kill, its export matching
    finally:
        cam.join()
    done = subprocess.run(cmd + ["--once"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = journal_rows(out)
    by_sha = {r["sha256"]: r for r in rows}
    assert len(by_sha) == len(rows)  # one row per content
    now = {name: hashlib.sha256((inp / name).read_bytes()).hexdigest() for name in written}
    assert now == written
    assert set(now.values()) <= set(by_sha)  # every content on disk scored
    assert set(by_sha) <= ever  # and nothing else (no half-written file)
    assert len({r["overlay"] for r in rows}) == len(rows)  # each content its own overlay, there and a PNG
    for r in rows:
        Image.open(out / r["overlay"]).verify()
    assert len(set(counts)) == 6 and counts[-1] < len(rows), counts  # each kill fell in the middle of the stream
