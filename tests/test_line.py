"""On the line: a watched folder scored exactly once (kill -9, slow writers, corrupt files), feedback and
recalibration, the drift check (its power and its false-alarm rate), and the service page in a browser."""

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from destseg.errors import DestsegError
from destseg.drift import DriftMonitor
from destseg.feedback import add_feedback, read_feedback, recalibrate
from destseg.infer import Detector
from destseg.models import model_config
from destseg.thresholds import threshold_history
from destseg.train import DataSource, TrainOptions, train
from destseg.journal import stat_key
from destseg.watch import COLUMNS as WATCH_COLUMNS, Watcher

from conftest import make_mvtec, needs_chromium, normal_image, served_page

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def line_run(tmp_path_factory):
    """A tiny DeSTSeg whose thresholds were set on 12 held-out good images (calibration.json)."""
    root = make_mvtec(tmp_path_factory.mktemp("data"), n_train=48, n_good=0, n_defect=0)
    run = tmp_path_factory.mktemp("runs") / "run"
    cfg = model_config("destseg", teacher="efficientnet_lite0", image_size=64, batch_size=4, steps=6,
                       student_steps=3, seg_width=16)
    train(run, "destseg", cfg, DataSource(str(root), "widget"),
          options=TrainOptions(progress=False, threshold_holdout=0.25, precision="fp32"))
    return run


@pytest.fixture(scope="module")
def stfpm_run(tmp_path_factory):
    """A tiny STFPM: its map (teacher-student feature distance) reacts to a change of the images from the
    start, where a DeSTSeg trained for a few steps answers the same for every image."""
    root = make_mvtec(tmp_path_factory.mktemp("data"), n_train=120, n_good=0, n_defect=0)
    run = tmp_path_factory.mktemp("runs") / "stfpm"
    cfg = model_config("stfpm", teacher="efficientnet_lite0", image_size=64, batch_size=8, epochs=2)
    train(run, "stfpm", cfg, DataSource(str(root), "widget"), options=TrainOptions(progress=False, precision="fp32"))
    return run


def good_images(n, seed):
    """Good images of the run's product (make_mvtec's generator)."""
    rng = np.random.default_rng(seed)
    return [normal_image(rng) for _ in range(n)]


def rows(out: Path, name="results.csv") -> list[dict]:
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def watch_cmd(run, inp, out, *extra):
    return [sys.executable, "-m", "destseg", "watch", "--run", str(run), "--input", str(inp), "--out", str(out),
            "--backend", "torch", "--device", "cpu", "--precision", "fp32", *extra]


def test_the_run_keeps_its_calibration_scores(line_run):
    cal = json.loads((line_run / "calibration.json").read_text())
    thr = json.loads((line_run / "thresholds.json").read_text())
    assert len(cal["files"]) == len(cal["scores"]) == len(cal["peaks"]) == thr["n_images"] == 12
    assert "held out" in cal["what"] and thr["since"].endswith("Z")
    assert thr["image"] > max(cal["scores"])  # 12 images at 1%: just above the largest


def test_watch_scores_every_file_exactly_once_across_a_kill_9(line_run, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "cam1").mkdir(parents=True)
    (inp / "cam2").mkdir()
    images = good_images(8, seed=3)
    names = [f"cam{1 + i % 2}/img{i:04d}.png" for i in range(300)]
    def camera():  # drops files in as a camera would, written to a hidden name and renamed
        for i, name in enumerate(names):
            tmp = inp / f".{i}.tmp"
            img = images[i % len(images)].copy()
            img[0, 0] = (i % 256, i // 256, 7)  # every file a content of its own
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, inp / name)
            time.sleep(0.002)

    cam = threading.Thread(target=camera)
    cam.start()
    proc = subprocess.Popen(watch_cmd(line_run, inp, out, "--settle", "0", "--batch-size", "4", "--interval", "0.1"),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not (out / "results.csv").exists() or len(rows(out)) < 40):
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # in the middle of the stream: no chance to tidy up
        proc.wait(10)
        cam.join()
    db = sqlite3.connect(f"file:{out / 'journal.sqlite'}?mode=ro", uri=True)
    n_before = db.execute("SELECT count(*) FROM scored").fetchone()[0]  # the export may lag by the cut batch
    db.close()
    assert 40 <= n_before < 300, n_before
    # the restart picks up where it stopped, and --once exits when the folder is done
    done = subprocess.run(watch_cmd(line_run, inp, out, "--once", "--settle", "0"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{n_before} images already scored" in done.stdout
    got = rows(out)
    assert sorted(r["file"] for r in got) == sorted(names)  # every file once: none lost, none repeated
    for r in got[:: 37]:
        assert (out / r["overlay"]).is_file() and (out / r["mask"]).is_file()
        assert r["decision"] in ("ok", "defect") and float(r["threshold"]) > 0 and r["time"].endswith("Z")
    assert rows(out, "skipped.csv") == []


def test_watch_waits_for_a_slow_writer_and_skips_a_corrupt_file(line_run, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    img = good_images(1, seed=4)[0]
    path = inp / "slow.png"
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=0)  # large enough to write in pieces
    data = buf.getvalue()
    (inp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    proc = subprocess.Popen(watch_cmd(line_run, inp, out, "--settle", "0.3", "--retry", "3", "--interval", "0.1"),
                            env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        with open(path, "wb") as f:  # in chunks, with a pause long enough for the watcher to try it half-written
            for i, chunk in enumerate(np.array_split(np.frombuffer(data, np.uint8), 6)):
                f.write(chunk.tobytes())
                f.flush()
                time.sleep(1.2 if i == 2 else 0.1)
        deadline = time.time() + 60
        while time.time() < deadline and not (
                (out / "results.csv").exists() and len(rows(out)) == 1 and (out / "skipped.csv").exists()
                and len(rows(out, "skipped.csv")) == 1):
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:  # e.g. a watcher that ignored SIGINT (started from a background job)
            proc.send_signal(signal.SIGABRT)  # with PYTHONFAULTHANDLER: every thread's stack on its stderr
            stdout, stderr = proc.communicate(timeout=30)
            pytest.fail(f"watch did not stop within 90 s of Ctrl-C; its threads then:\n{stderr}")
    assert proc.returncode == 0, stderr
    got, skipped = rows(out), rows(out, "skipped.csv")
    assert [r["file"] for r in got] == ["slow.png"], (got, skipped, stderr)
    expected = Detector.load(line_run, backend="torch", precision="fp32").predict(img).score
    assert float(got[0]["score"]) == pytest.approx(expected, rel=1e-4)  # the whole file, not a part of it
    assert [s["file"] for s in skipped] == ["corrupt.png"] and "corrupt.png" in skipped[0]["reason"]
    assert "skipped corrupt.png" in stderr


def test_watch_does_not_score_its_own_outputs_when_out_is_inside_input(line_run, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for i, x in enumerate(good_images(3, seed=8)):
        Image.fromarray(x).save(inp / f"{i}.png")
    for _ in range(2):
        r = subprocess.run(watch_cmd(line_run, inp, inp / "results", "--once", "--settle", "0"), env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert sorted(row["file"] for row in rows(inp / "results")) == ["0.png", "1.png", "2.png"]


def test_watch_refuses_a_second_watcher_and_bad_flags(line_run, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    r = subprocess.run(watch_cmd(line_run, tmp_path / "nope", tmp_path / "o", "--once"), env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--input" in r.stderr and "not a folder" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(watch_cmd(line_run, inp, tmp_path / "o", "--once", "--settle", "-1"), env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--settle" in r.stderr
    import fcntl

    (tmp_path / "o").mkdir(exist_ok=True)
    with open(tmp_path / "o" / ".watch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run(watch_cmd(line_run, inp, tmp_path / "o", "--once"), env=ENV, capture_output=True,
                           text=True)
    assert r.returncode == 2 and "another `destseg watch`" in r.stderr


def test_watch_scan_looks_only_at_new_names_and_notices_what_goes_and_comes(line_run, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "a" / "b").mkdir(parents=True)
    for rel in ("x.png", "a/y.png", "a/b/z.png", "a/notes.txt", "a/.hidden.png"):
        (inp / rel).write_bytes(b"")  # never decoded here: scoring is simulated by the journal
    out.mkdir()
    det = Detector.load(line_run, backend="torch", precision="fp32")
    w = Watcher(det, inp, out, 4, 0.0, 30.0, "input", 0, 10)
    w.full_check_s = float("inf")  # the periodic stat of the names done: checked at the end

    def score_all():  # scoring simulated: each file's journal entry under a content key of its own
        ready, waiting = w.scan()
        rows = [{c: "0" for c in WATCH_COLUMNS} | {"file": rel, "sha256": f"{rel}@{os.stat(inp / rel).st_mtime_ns}",
                                                   "score": 0.0} for rel in ready]
        w.journal.record(scored=rows, names=[(r["file"], r["sha256"], *stat_key(os.stat(inp / r["file"])))
                                             for r in rows])
        return sorted(ready), waiting

    for i in range(1000):
        (inp / "a" / f"many{i:04d}.png").write_bytes(b"")
    assert len(score_all()[0]) == 1003
    assert w.scan() == ([], 0)  # finds them scored (in the journal), once
    calls = []  # a scan of folders whose images are all done: the listings, no Python call per file

    def count(frame, event, arg):
        if event in ("call", "c_call"):
            calls.append(event)
    sys.setprofile(count)
    try:
        again = w.scan()
    finally:
        sys.setprofile(None)
    assert again == ([], 0) and len(calls) < 100, len(calls)
    (inp / "a" / "new.png").write_bytes(b"")  # a new image in a folder already done
    (inp / "x.png").unlink()  # removed, and later written again under the same name: read again
    shutil.rmtree(inp / "a" / "b")  # the same for a folder
    assert score_all() == (["a/new.png"], 0)
    (inp / "x.png").write_bytes(b"")
    (inp / "a" / "b").mkdir()
    (inp / "a" / "b" / "z.png").write_bytes(b"")
    assert score_all() == (["a/b/z.png", "x.png"], 0)
    shutil.rmtree(inp / "a" / "b")  # a folder replaced by an image of the same name
    (inp / "a" / "b").write_bytes(b"")
    assert w.scan() == ([], 0)  # 'b' is not an image name: nothing to score, and no error
    # a file rewritten in place, and another renamed over a done name, while watch runs: noticed by the next
    # periodic stat of the names done, not before
    (inp / "a" / "many0001.png").write_bytes(b"new")
    (inp / "a" / "other.tmp").write_bytes(b"")
    os.replace(inp / "a" / "other.tmp", inp / "a" / "many0002.png")
    assert w.scan() == ([], 0)
    w.full_check_s = 0.0
    assert score_all() == (["a/many0001.png", "a/many0002.png"], 0)
    w.close()
    # a restart: names unchanged are not read again; a file gone and written later under that name is
    (inp / "a" / "y.png").unlink()
    (inp / "a" / "many0003.png").write_bytes(b"rewritten while watch was stopped")
    w = Watcher(det, inp, out, 4, 0.0, 30.0, "input", 0, 10)
    assert w.scan() == (["a/many0003.png"], 0)
    (inp / "a" / "y.png").write_bytes(b"")
    assert w.scan() == (["a/many0003.png", "a/y.png"], 0)
    w.close()


def test_feedback_recalibrates_and_keeps_the_thresholds_it_replaces(line_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(line_run, run)
    det = Detector.load(run, backend="torch", precision="fp32")
    cal = json.loads((run / "calibration.json").read_text())
    # a good image that the stored threshold calls defect: a false alarm
    candidates = good_images(40, seed=11)
    scores = [p.score for p in det.predict_batch(candidates)]
    img = candidates[int(np.argmax(scores))]
    lowered = {**det.thresholds, "image": min(cal["scores"]) - 1e-3}
    (run / "thresholds.json").write_text(json.dumps(lowered))
    det = Detector.load(run, backend="torch", precision="fp32")
    assert det.predict(img).is_defect
    entry = add_feedback(run, img, "false_alarm", "cam/001.png", score=max(scores))
    assert entry["new"] and (run / "feedback" / entry["image"]).is_file()
    assert not add_feedback(run, img, "false_alarm", score=max(scores))["new"]  # marked twice: kept once
    with pytest.raises(DestsegError, match="not a false alarm: the thresholds in force call it OK"):
        add_feedback(run, img, "false_alarm", score=lowered["image"] - 0.5)  # an image called OK: refused
    with pytest.raises(DestsegError, match="needs the image's score"):
        add_feedback(run, img, "false_alarm")
    add_feedback(run, good_images(1, seed=99)[0], "missed_defect", "cam/002.png")
    assert [e["kind"] for e in read_feedback(run)] == ["false_alarm", "missed_defect"]
    result = recalibrate(det)
    after = json.loads((run / "thresholds.json").read_text())
    assert after["image"] == result["after"]["image"] and after["n_images"] == 13  # 12 good + 1 false alarm
    assert after["feedback"] == {"false_alarms": 1, "missed_defects": 1} and "false alarms" in after["method"]
    assert not det.predict(img).is_defect  # the marked image is OK now
    history = threshold_history(run)
    assert len(history) == 1 and json.loads(history[0].read_text())["image"] == lowered["image"]
    # the CLI says what changed
    r = subprocess.run([sys.executable, "-m", "destseg", "recalibrate", "--run", str(run), "--backend", "torch",
                        "--precision", "fp32"],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "image threshold" in r.stdout and "1 false alarms" in r.stdout, r.stderr
    assert len(threshold_history(run)) == 2


def test_feedback_cli_marks_files_and_refuses_missing_ones(line_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(line_run, run)
    f = tmp_path / "a.png"
    Image.fromarray(good_images(1, seed=5)[0]).save(f)
    cmd = [sys.executable, "-m", "destseg", "feedback", "--run", str(run), "--false-alarm", str(f), "--device", "cpu"]
    thresholds = json.loads((run / "thresholds.json").read_text())
    (run / "thresholds.json").write_text(json.dumps({**thresholds, "image": 1e9, "source": "manual"}))  # all OK
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "refused" in r.stderr and "not a false alarm" in r.stderr, r.stderr
    assert read_feedback(run) == []
    (run / "thresholds.json").write_text(json.dumps({**thresholds, "image": -1e9, "source": "manual"}))  # all defect
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "false alarm" in r.stdout, r.stderr
    assert read_feedback(run)[0]["threshold"] == -1e9
    r = subprocess.run([sys.executable, "-m", "destseg", "feedback", "--run", str(run), "--missed-defect",
                        str(tmp_path / "none.png")], env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "none.png: no such file" in r.stderr


def stream_rate(calibration_n: int, window: int, length: int, streams: int, shift: float, seed: int = 0) -> float:
    """Share of streams of ``length`` scores in which the running check ever warns: good scores are N(0, 1),
    the calibration set a fresh draw of ``calibration_n`` of them per stream; ``shift`` moves the stream."""
    rng = np.random.default_rng(seed)
    warned = 0
    for _ in range(streams):
        mon = DriftMonitor(rng.normal(size=calibration_n), window=window)
        for s in rng.normal(size=length) + shift:
            mon.add(s)
            if len(mon.recent) == window and mon.state()["state"] == "warning":
                warned += 1
                break
    return warned / streams


def test_drift_check_false_alarm_rate_and_power():
    # Unshifted streams of 1000 images, the check (default window 200, alpha 1e-3) evaluated after every
    # image: the share of streams that ever warn stays small (measured 0.3% with 20 calibration images,
    # 1% with 200), although the calibration set is itself a random draw.
    for n in (20, 200):
        assert stream_rate(n, window=200, length=1000, streams=300, shift=0.0) <= 0.03, n
    # A shift of one score sd (a brightness or blur change of the product) is caught within 400 images in
    # nearly every stream with 200 calibration images (with 20 the reference is too uncertain: about half).
    assert stream_rate(200, window=200, length=400, streams=100, shift=1.0, seed=1) >= 0.9
    mon = DriftMonitor(np.arange(5.0), window=10)
    assert mon.state()["state"] == "unavailable" and "needs 9" in mon.state()["reason"]
    mon = DriftMonitor(np.arange(100.0), window=10)  # reference: the 91st smallest, 90.0
    for s in [0.0] * 9 + [95.0] * 3:
        mon.add(s)
    assert mon.state()["above"] == 3 and mon.state()["seen"] == 10  # the oldest left the window


def test_drift_shows_in_watch_for_a_brightness_shift_and_not_without(stfpm_run, tmp_path):
    det = Detector.load(stfpm_run, backend="torch", precision="fp32")
    cal = np.asarray(json.loads((stfpm_run / "calibration.json").read_text())["scores"])
    assert len(cal) == 12  # half of STFPM's validation images (20% of 120; the other half picks its weights)
    normal = good_images(40, seed=21)
    dark = [np.clip(x.astype(int) - 50, 0, 255).astype(np.uint8) for x in normal]  # the light got dimmer
    assert np.mean([p.score > cal.max() for p in det.predict_batch(dark)]) > 0.5, \
        "the tiny model does not react to the shift: the test would prove nothing"
    for images, expected in ((normal, "ok"), (dark, "warning")):
        inp, out = tmp_path / expected / "in", tmp_path / expected / "out"
        inp.mkdir(parents=True)
        for i, x in enumerate(images):
            Image.fromarray(x).save(inp / f"{i:03d}.png")
        r = subprocess.run(watch_cmd(stfpm_run, inp, out, "--once", "--settle", "0", "--drift-window", "40"),
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        drift = json.loads((out / "drift.json").read_text())
        assert drift["state"] == expected, drift
        assert ("DRIFT WARNING" in r.stderr) == (expected == "warning")


@needs_chromium
def test_page_marks_a_false_alarm_and_recalibrates_in_a_browser(line_run, tmp_path):
    """Click "False alarm" on a recent decision, then "Recalibrate": the image's decision turns OK."""
    pytest.importorskip("fastapi")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = tmp_path / "run"
    shutil.copytree(line_run, run)
    thr = json.loads((run / "thresholds.json").read_text())
    cal = json.loads((run / "calibration.json").read_text())
    (run / "thresholds.json").write_text(json.dumps({**thr, "image": min(cal["scores"]) - 1e-3}))
    img = tmp_path / "part.png"
    Image.fromarray(good_images(1, seed=31)[0]).save(img)
    with served_page(run, "--backend", "torch", "--device", "cpu", "--precision", "fp32",
                     window="1100,1400") as driver:
        driver.find_element(By.ID, "file").send_keys(str(img))
        wait = WebDriverWait(driver, 30)
        row = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recent-rows tr"))[0]
        assert row.find_element(By.CSS_SELECTOR, ".now").text == "defect" and "part.png" in row.text
        row.find_element(By.CSS_SELECTOR, "button.false_alarm").click()
        wait.until(lambda d: "1 false alarm" in d.find_element(By.ID, "fb-counts").text)
        since_before = driver.find_element(By.ID, "thr-since").text
        driver.find_element(By.ID, "recalibrate").click()
        wait.until(lambda d: d.find_element(By.ID, "thr-since").text != since_before)
        row = driver.find_elements(By.CSS_SELECTOR, "#recent-rows tr")[0]
        assert row.find_element(By.CSS_SELECTOR, ".now").text == "ok"  # the marked image is OK now
        assert "false alarm" in row.text
        shot = tmp_path / "line-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
    assert len(threshold_history(run)) == 1 and len(read_feedback(run)) == 1


def test_service_feedback_and_recalibrate_endpoints(line_run, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import io

    from fastapi.testclient import TestClient

    from destseg.serve import create_app

    run = tmp_path / "run"
    shutil.copytree(line_run, run)
    buf = io.BytesIO()
    Image.fromarray(good_images(1, seed=41)[0]).save(buf, format="PNG")
    png = buf.getvalue()
    app = create_app(Detector.load(run, backend="torch", precision="fp32"), max_wait_ms=1, drift_window=10)
    with TestClient(app) as c:
        h = c.get("/health").json()
        assert h["drift"]["state"] == "warming up" and h["thresholds_since"] and h["feedback"]["false_alarm"] == 0
        ids = [c.post("/predict", content=png, headers={"content-type": "image/png"}).json()["id"] for _ in range(10)]
        assert c.get("/health").json()["drift"]["state"] in ("ok", "warning")  # the window is full
        recent = c.get("/recent").json()["recent"]
        assert [r["id"] for r in recent] == ids[::-1] and recent[0]["thumbnail_png"]
        r = c.post("/feedback", json={"id": "nope", "kind": "false_alarm"})
        assert r.status_code == 404 and "no recent decision" in r.json()["error"]
        r = c.post("/feedback", json={"id": ids[0], "kind": "bogus"})
        assert r.status_code == 400 and "kind must be one of" in r.json()["error"]
        assert c.post("/feedback", json={"id": ids[-1], "kind": "false_alarm"}).json()["new"]
        r = c.post("/feedback?kind=missed_defect", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["kind"] == "missed_defect"
        assert c.post("/feedback?kind=x", content=png, headers={"content-type": "image/png"}).status_code == 400
        assert c.get("/recent").json()["recent"][0]["feedback"] == "false_alarm"
        r = c.post("/recalibrate").json()
        assert r["n_false_alarms"] == 1 and r["n_missed_defects"] == 1
        h = c.get("/health").json()
        assert h["threshold"] == r["after"]["image"] and h["thresholds_since"] == r["after"]["since"]
        assert h["feedback"] == {"false_alarm": 1, "missed_defect": 1}


def test_service_answers_requests_while_it_recalibrates(line_run, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import io

    from fastapi.testclient import TestClient

    from destseg.serve import create_app

    run = tmp_path / "run"
    shutil.copytree(line_run, run)
    det = Detector.load(run, backend="torch", precision="fp32")
    fast = det.predict_batch
    per_image_s = 0.15  # a slow model: the 12 calibration images take 1.8 s to score again

    def slow(images, **kw):
        time.sleep(per_image_s * len(images))
        return fast(images, **kw)
    det.predict_batch = slow
    buf = io.BytesIO()
    Image.fromarray(good_images(1, seed=42)[0]).save(buf, format="PNG")
    app = create_app(det, max_wait_ms=1)
    with TestClient(app) as c:
        done = {}

        def recal():
            assert c.post("/recalibrate").status_code == 200
            done["recalibrate"] = time.perf_counter()
        t = threading.Thread(target=recal)
        t.start()
        time.sleep(0.3)  # the recalibration is under way
        t0 = time.perf_counter()
        r = c.post("/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
        done["predict"] = time.perf_counter()
        t.join()
    assert r.status_code == 200 and "score" in r.json()
    # answered after at most one turn of the recalibration on the model thread (4 images), not after all 12
    assert done["predict"] - t0 < 1.2, done["predict"] - t0
    assert done["predict"] < done["recalibrate"]
