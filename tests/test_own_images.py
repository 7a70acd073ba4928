"""A user's own images: training from a plain folder, `test` with defect photos with or without masks (image
metrics, thresholds in force untouched), help and messages that say what runs, and warnings for runs whose
decisions mean nothing."""

import csv
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_mvtec, normal_image
from destseg.cli import build_parser, main, next_steps
from destseg.engine_thresholds import engine_file
from destseg.health import run_warnings
from destseg.loop import pace_note
from destseg.metrics import decision_rates, proportion_ci
from destseg.run import Run
from destseg.schedules import parse_duration

TINY = ["--teacher", "efficientnet_lite0", "--image-size", "64", "--batch-size", "2", "--steps", "3",
        "--student-steps", "2", "--no-progress"]


def make_folders(root: Path, n_good=14, n_defect=4, n_test_good=3, seed=1) -> Path:
    """A quality engineer's folders: good/ (with a subfolder, a GIF and a note), defect/ photos (no masks),
    good_test/ (other good photos) and masks/ for the first two defect photos only."""
    rng = np.random.default_rng(seed)
    for name in ("good/day2", "defect", "good_test", "masks"):
        (root / name).mkdir(parents=True)
    for i in range(n_good):
        sub = "good/day2" if i % 3 == 0 else "good"
        Image.fromarray(normal_image(rng)).save(root / sub / f"g{i:03d}.png")
    Image.fromarray(normal_image(rng)).save(root / "good" / "camera.gif")
    (root / "good" / "notes.txt").write_text("not an image")
    for i in range(n_test_good):
        Image.fromarray(normal_image(rng)).save(root / "good_test" / f"t{i:03d}.png")
    for i in range(n_defect):
        img, mask = normal_image(rng), np.zeros((64, 64), np.uint8)
        img[20:34, 20:34] = 250
        mask[20:34, 20:34] = 255
        Image.fromarray(img).save(root / "defect" / f"d{i:03d}.jpg", quality=95)
        if i < 2:
            Image.fromarray(mask).save(root / "masks" / f"d{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = make_folders(tmp_path_factory.mktemp("own"))
    run = root / "runs" / "part"
    assert main(["train", "--data", str(root / "good"), "--out", str(run), *TINY]) == 0
    return run, root


def test_train_from_a_plain_folder_takes_every_image_under_it(folder_run, capsys):
    run, root = folder_run
    record = json.loads((run / "config.json").read_text())
    assert record["data"]["layout"] == "folder" and record["data"]["category"] == ""
    resolved = record["resolved"]
    # 14 PNGs (some in a subfolder) and one GIF; 10% held out for the thresholds
    assert resolved["train_images"] + resolved["threshold_images"] == 15 and resolved["threshold_images"] == 2
    assert resolved["rotation"] == "none" and "plain folder" in resolved["rotation_source"]
    # the record says what was trained, the flags included
    assert "set by flags: " in resolved["schedule"] and "steps 3" in resolved["schedule"]
    thr = json.loads((run / "thresholds.json").read_text())
    assert thr["source"] == "good_images" and "held out" in thr["method"]
    assert main(["inspect", "--data", str(root / "good"), "--json"]) == 1  # the note is a problem, named
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == 15 and any("notes.txt: not an image" in p for p in summary["problems"])


def test_train_prints_its_plan_the_pace_and_the_next_command(tmp_path, capsys, monkeypatch):
    root = make_folders(tmp_path)
    run = tmp_path / "run"
    monkeypatch.setattr("destseg.loop.LONG_RUN_S", 0.06)  # any plan counts as long: the line on capping it shows
    args = [a for a in TINY if a != "--no-progress"]
    args[args.index("--steps") + 1], args[args.index("--student-steps") + 1] = "24", "12"
    assert main(["train", "--data", str(root / "good"), "--out", str(run), *args, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "plan: student 12 steps of 2 images + segmentation 12 steps of 8 images = 24 steps on 13" in err
    assert "student stage:" in err and "s/step; at this pace the" in err
    assert f"press Ctrl-C and run: destseg train --out {run} --resume --time-budget 0.001m" in err
    assert err.count("--resume --time-budget") == 1  # once, at the first stage
    assert parse_duration("0.001m") == pytest.approx(0.06)  # the printed budget is one train accepts
    assert f"destseg test --run {run} --defect" in out and f"destseg predict --run {run}" in out
    spaced = tmp_path / "line 2 run"
    spaced.symlink_to(run)
    assert f"destseg watch --run '{spaced}' --input" in next_steps(spaced)  # paste-ready: quoted where it must be
    log = [json.loads(line) for line in (run / "train.log").read_text().splitlines()]
    assert any("pace_s_per_step" in e and e["expected_s_left"] >= 0 for e in log)


def test_the_pace_line_names_when_a_budget_ends_training_or_how_to_cap_a_long_run():
    now, run = 1_000_000.0, Path("runs/part")
    hour = pace_note("student", 2.0, 1800, now, None, True, run)  # 1 h left, no budget: the capping command
    assert "take about 1 h 00 min" in hour and f"train --out {run} --resume --time-budget 30m" in hour
    assert "--out 'my runs/part' --resume" in pace_note("student", 2.0, 1800, now, None, True, Path("my runs/part"))
    assert "--time-budget" not in pace_note("student", 2.0, 600, now, None, True, run)  # 20 min: nothing to add
    assert "--time-budget" not in pace_note("segmentation", 2.0, 1800, now, None, False, run)  # said once
    cut = pace_note("student", 2.0, 1800, now, now + 1200, True, run)
    assert cut.endswith("; --time-budget ends it near " + time.strftime("%H:%M", time.localtime(now + 1200)))
    assert "--time-budget" not in pace_note("student", 2.0, 1800, now, now + 4000, True, run)  # the plan fits


def test_a_dataset_root_is_not_taken_for_a_folder_of_good_images(tmp_path, capsys):
    root = make_mvtec(tmp_path / "d")
    for data, words in ((root, "dataset root with categories widget: pass --category"),
                        (root / "widget", f"pass --data {root} --category widget")):
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def engine_threshold(run: Path, engine: str) -> float:
    """The image threshold in force for ``engine``: training's where it trained in that engine, else the one
    ``engine`` derived from the same good images (RUN/engines/: on a CPU without native bf16, OpenVINO int8)."""
    stored = json.loads((run / "thresholds.json").read_text())
    if stored["engine"] == engine:
        return stored["image"]
    return json.loads(engine_file(run, engine).read_text())["thresholds"]["image"]


def _files(run: Path) -> dict:
    return {name: (run / name).read_bytes() for name in ("thresholds.json", "calibration.json")}


def test_defect_photos_without_masks_give_image_metrics_and_leave_the_thresholds(folder_run, capsys):
    """`test --defect DIR` alone: the good side is the run's held-out good images; no masks, so the image
    metrics and the decisions at the thresholds in force, no pixel metrics; thresholds and calibration in force
    unchanged, the split's own suggestion recorded beside them."""
    run, root = folder_run
    before = _files(run)
    assert main(["test", "--run", str(run), "--defect", str(root / "defect"), "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_defect"] == 4 and result["n_good"] == 2 and result["n_defect_with_mask"] == 0
    assert 0 <= result["i_auroc"] <= 1 and 0 <= result["i_ap"] <= 1 and "p_auroc" not in result
    assert "pixel metrics skipped" in result["note"] and "held out of training" in result["note"]
    d = result["decisions"]
    stored = json.loads(before["thresholds.json"])
    assert d["threshold"] == engine_threshold(run, result["engine"]) and d["n_defect"] == 4 and d["n_good"] == 2
    lo, hi = d["detection_rate_ci95"]
    assert lo <= d["detection_rate"] <= hi
    after = _files(run)
    assert after["calibration.json"] == before["calibration.json"]
    thr = json.loads(after["thresholds.json"])
    assert {k: thr[k] for k in stored} == stored  # in force: exactly as training left them
    measured = thr["measured_on_test"]
    assert measured["source"] == "test_split" and measured["pixel"] is None and measured["fpr_bound"] is None
    assert (run / "report.html").read_text().count("none of the 4 defect images has a mask") == 1


def test_mixed_masks_give_pixel_metrics_on_the_images_that_have_them(folder_run, capsys):
    run, root = folder_run
    assert main(["test", "--run", str(run), "--good", str(root / "good_test"), "--defect", str(root / "defect"),
                 "--masks", str(root / "masks"), "--no-progress", "--no-report"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_good"] == 3 and metrics["n_defect"] == 4 and metrics["n_defect_with_mask"] == 2
    assert all(0 <= metrics[k] <= 1 for k in ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90"))
    assert "the 2 of 4 defect images that have a mask" in metrics["note"]
    assert "defects detected" in out and "false alarms" in out and "95% CI" in out
    # the pixel metrics are those of the subset: good images and masked defects only
    from destseg.data import TestFolders, TestDataset
    from destseg.infer import load_inference
    from destseg.metrics import evaluate
    from destseg.models.backbones import backbone_spec
    from destseg.scoring import run_test_split

    index = TestFolders(str(root / "good_test"), str(root / "defect"), str(root / "masks")).scan()
    keep = [s for s in index.test if s.label == 0 or s.mask is not None]
    inf = load_inference(run, precision="fp32", backend="torch")
    ds = TestDataset(keep, inf.config.image_size, backbone_spec(inf.config.teacher).normalize)
    o = run_test_split(inf.model, ds, inf.device, None, progress=False)
    assert main(["test", "--run", str(run), "--good", str(root / "good_test"), "--defect", str(root / "defect"),
                 "--masks", str(root / "masks"), "--no-progress", "--no-report", "--backend", "torch",
                 "--precision", "fp32"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["p_ap"] == pytest.approx(evaluate(o.maps, o.masks, o.labels, o.scores)["p_ap"], abs=1e-6)


def test_mvtec_layout_without_ground_truth_is_judged_by_labels(tmp_path, capsys):
    root = make_mvtec(tmp_path / "d", n_train=8, n_good=3, n_defect=3)
    shutil.rmtree(root / "widget" / "ground_truth")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--category", "widget", "--out", str(run), *TINY]) == 0
    before = _files(run)
    assert main(["inspect", "--data", str(root), "--category", "widget"]) == 0  # no masks is no problem
    assert "3 defect image(s) without a mask" in capsys.readouterr().out
    assert main(["test", "--run", str(run), "--no-progress", "--no-report"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "i_auroc" in metrics and "p_ap" not in metrics and metrics["n_defect"] == 3
    assert _files(run)["calibration.json"] == before["calibration.json"]
    assert json.loads((run / "thresholds.json").read_text())["image"] == json.loads(before["thresholds.json"])["image"]


def test_decision_rates_and_their_exact_intervals():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 5), (3, 7), (7, 7), (12, 200)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert proportion_ci(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    d = decision_rates(np.array([0.1, 0.5, 0.7, 0.2, 0.9]), np.array([0, 0, 1, 1, 1]), 0.5)
    assert (d["detected"], d["n_defect"], d["false_alarms"], d["n_good"]) == (2, 3, 1, 2)
    assert d["detection_rate"] == pytest.approx(2 / 3) and d["false_alarm_rate"] == 0.5


def test_help_shows_what_runs_on_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub.choices["train"]._actions}
    here = "what runs here (--schedule auto is cpu on this CPU)"
    assert here in helps["teacher"] and "destseg efficientnet_lite0" in helps["teacher"]
    assert "destseg 48" in helps["seg_width"] and "destseg 32" in helps["student_width"]
    assert "follows the number of training images" in helps["steps"]
    top = parser.format_help()
    for name in sub.choices:  # every command, with a line of its own
        assert f"\n    {name}" in top


def test_undertrained_and_degenerate_runs_are_warned_about(folder_run, tmp_path, capsys):
    run, root = folder_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("openvino"))
    assert any("UNDERTRAINED: trained only 3 steps" in w for w in run_warnings(Run(copy)))
    cal = json.loads((copy / "calibration.json").read_text())
    cal["scores"] = [0.4766] * len(cal["scores"])
    (copy / "calibration.json").write_text(json.dumps(cal))
    assert any("are all equal (0.4766)" in w for w in run_warnings(Run(copy)))
    record = json.loads((copy / "config.json").read_text())
    record["training"]["steps_trained"] = record["training"]["steps_planned"] = 1200
    (copy / "config.json").write_text(json.dumps(record))
    cal["scores"] = [0.1, 0.2]
    (copy / "calibration.json").write_text(json.dumps(cal))
    assert run_warnings(Run(copy)) == []
    # predict says it on stderr; its CSV names the threshold that decided each row; a GIF is read, a note named
    (copy / "calibration.json").write_text(json.dumps({**cal, "scores": [0.3, 0.3]}))
    out = tmp_path / "pred"
    with pytest.warns(UserWarning, match="calibration images are all equal"):
        assert main(["predict", "--run", str(copy), "--input", str(root / "good"), "--out", str(out),
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 file(s) of the input folder are not images" in err and "notes.txt" in err
    rows = list(csv.DictReader(open(out / "results.csv")))
    thr = engine_threshold(copy, rows[0]["engine"])
    assert len(rows) == 15 and any(r["file"].endswith("camera.gif") for r in rows)
    assert all(float(r["threshold"]) == pytest.approx(thr) for r in rows)


def test_watch_prints_each_defect_decision_as_it_happens(folder_run, tmp_path, capsys):
    run, root = folder_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("openvino"))
    thr = json.loads((copy / "thresholds.json").read_text())
    (copy / "thresholds.json").write_text(json.dumps({**thr, "image": -1e9, "source": "manual"}))  # all defects
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["watch", "--run", str(copy), "--input", str(root / "defect"), "--out", str(tmp_path / "w"),
                     "--once", "--settle", "0"]) == 0
    out = capsys.readouterr().out
    for i in range(4):
        assert f"destseg watch: DEFECT d{i:03d}.jpg score " in out


def test_the_python_api_does_the_same_in_one_call_each(tmp_path):
    import destseg

    root = make_folders(tmp_path)
    ckpt = destseg.train_on_folder(root / "good", tmp_path / "run", teacher="efficientnet_lite0", image_size=64,
                                   batch_size=2, steps=3, student_steps=2, progress=False)
    assert ckpt.is_file() and Run(tmp_path / "run").data.layout == "folder"
    result = destseg.test_on_folders(tmp_path / "run", good=root / "good_test", defect=root / "defect")
    assert result["n_good"] == 3 and result["n_defect"] == 4 and "i_auroc" in result and "p_ap" not in result
