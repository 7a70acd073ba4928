"""predict, thresholds, report, ONNX export, benchmark command: on a tiny run."""

import csv
import os
import shutil
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import struct
import sys
import warnings
import zlib
import torch
from PIL import Image

from destseg.cli import main
from destseg.data import scan_mvtec
from destseg.device import autocast_dtype, describe_cpu
from destseg.errors import DestsegError
from destseg.infer import Detector, evaluate_run
from destseg.models import model_config
from destseg.train import DataSource, TrainOptions, train

from conftest import make_mvtec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = make_mvtec(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("runs") / "run"
    cfg = model_config("destseg", teacher="efficientnet_lite0", image_size=64, batch_size=4, steps=4, student_steps=2)
    train(run, "destseg", cfg, DataSource(str(root), "widget"), options=TrainOptions(progress=False))
    evaluate_run(run, progress=False, report=True)
    return run, root


def test_thresholds_and_report(tiny_run):
    run, _ = tiny_run
    thr = json.loads((run / "thresholds.json").read_text())
    assert thr["source"] == "good_images" and {"image", "pixel"} <= set(thr)  # in force: from training
    assert thr["measured_on_test"]["method"].startswith("f1-max")  # beside them: what the test split suggests
    page = (run / "report.html").read_text()
    assert '<pre id="decisions">at the image threshold in force' in page

    class Collect(HTMLParser):
        tags: list = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

    c = Collect()
    c.feed(page)
    names = [t for t, _ in c.tags]
    assert names.count("svg") == 3 and "table" in names  # ROC, PR, histogram; metric table
    assert sum(1 for t, a in c.tags if t == "img" and a["src"].startswith("data:image/png;base64,")) >= 2
    assert "Worst false positives" in page and "Worst false negatives" in page


def test_fpr_thresholds_without_defects(tmp_path):
    root = make_mvtec(tmp_path / "d", n_defect=0)
    import shutil
    shutil.rmtree(root / "widget" / "test" / "spot")
    run = tmp_path / "run"
    cfg = model_config("destseg", teacher="efficientnet_lite0", image_size=64, batch_size=2, steps=2, student_steps=1)
    train(run, "destseg", cfg, DataSource(str(root), "widget"), options=TrainOptions(progress=False))
    before = (run / "calibration.json").read_text()
    result = evaluate_run(run, progress=False, fpr=0.5)
    assert "no defect images" in result["note"] and "i_auroc" not in result
    assert result["decisions"]["n_good"] == 2 and result["decisions"]["detection_rate"] is None
    assert (run / "calibration.json").read_text() == before  # measured, recorded, not in force
    assert json.loads((run / "thresholds.json").read_text())["measured_on_test"]["n_images"] == 2
    result = evaluate_run(run, progress=False, fpr=0.5, adopt_thresholds=True)
    assert (run / "calibration.json").read_text() != before
    thr = json.loads((run / "thresholds.json").read_text())
    scores = np.sort(result["_outputs"].scores)  # split conformal: the ceil((n + 1)(1 - fpr))-th smallest
    k = min(int(np.ceil((len(scores) + 1) * 0.5)), len(scores))
    assert thr["image"] == pytest.approx(scores[k - 1]) and thr["n_images"] == len(scores) == 2
    assert thr["fpr_target"] == 0.5 and thr["fpr_bound"] == 0.5


def test_predict_folder_with_bad_files(tiny_run, tmp_path, capsys):
    run, root = tiny_run
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    good = sorted((root / "widget" / "test").rglob("*.png"))
    for i, p in enumerate(good):
        (inp / "sub" / f"{i}.png").write_bytes(p.read_bytes())
    (inp / "empty.png").write_bytes(b"")
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (inp / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)))
    out = tmp_path / "out"
    code = main(["predict", "--run", str(run), "--input", str(inp), "--out", str(out), "--batch-size", "3",
                 "--no-progress"])
    assert code == 1  # some files were skipped
    err = capsys.readouterr().err
    assert "empty.png" in err and "broken.jpg" in err and "huge.png" in err
    result = json.loads((out / "results.json").read_text())
    assert len(result["results"]) == len(good) and len(result["skipped"]) == 3
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(good) and {r["decision"] for r in rows} <= {"ok", "defect"}
    for r in rows:
        assert Image.open(out / r["overlay"]).size == (64, 64)
        assert set(np.unique(np.asarray(Image.open(out / r["mask"])))) <= {0, 255}
    # A second run into the same folder is refused without --overwrite.
    assert main(["predict", "--run", str(run), "--input", str(inp), "--out", str(out), "--no-progress"]) == 2


def test_predict_with_io_threads_matches_main_thread(tiny_run, tmp_path):
    """Reading and PNG writing on a thread pool: same rows in the same order, same files, bad files still
    skipped by name; results.json appears only once every PNG is written."""
    run, root = tiny_run
    inp = tmp_path / "in"
    inp.mkdir()
    good = sorted((root / "widget" / "test").rglob("*.png"))
    for i in range(5):  # more images than a batch, a bad one in the middle
        for j, p in enumerate(good):
            (inp / f"{i}_{j}.png").write_bytes(p.read_bytes())
    (inp / "2_bad.png").write_bytes(b"not a png")
    (inp / "0_0.jpg").write_bytes(good[1].read_bytes())  # same stem as 0_0.png: must not overwrite its PNGs
    outs = {}
    for workers in ("0", "3"):
        out = outs[workers] = tmp_path / f"out{workers}"
        assert main(["predict", "--run", str(run), "--input", str(inp), "--out", str(out), "--batch-size", "3",
                     "--workers", workers, "--device", "cpu", "--precision", "fp32", "--no-progress"]) == 1
    a, b = (json.loads((outs[w] / "results.json").read_text()) for w in ("0", "3"))
    assert [r["file"] for r in a["results"]] == [r["file"] for r in b["results"]]
    assert len(a["results"]) == 5 * len(good) + 1 and [s["file"] for s in b["skipped"]] == [str(inp / "2_bad.png")]
    overlays = [r["overlay"] for r in a["results"]]
    assert len(set(overlays)) == len(overlays) and "overlays/0_0.png.png" in overlays  # 0_0.jpg came first
    for ra, rb in zip(a["results"], b["results"]):
        assert ra["score"] == pytest.approx(rb["score"], rel=1e-5)
        for key in ("overlay", "mask"):
            assert np.array_equal(np.asarray(Image.open(outs["0"] / ra[key])), np.asarray(Image.open(outs["3"] / rb[key])))
    assert main(["predict", "--run", str(run), "--input", str(inp), "--out", str(tmp_path / "x"), "--workers", "-2",
                 "--no-progress"]) == 2


def test_predict_outputs_at_the_input_size(tiny_run, tmp_path):
    """A frame of another size than the model's gets its overlay and mask at its own size (the map resized
    back bilinearly, the mask thresholded after resizing); --output-size model keeps the model's size; both
    agree with the Python API's Prediction.map_at."""
    from destseg.infer import Detector

    run, root = tiny_run
    inp = tmp_path / "in"
    inp.mkdir()
    src = sorted((root / "widget" / "test").rglob("*.png"))[-1]
    Image.open(src).resize((150, 90)).save(inp / "frame.png")  # width 150, height 90; the model runs at 64
    det = Detector.load(run, precision="fp32")
    pred = det.predict(inp / "frame.png")
    thr = json.loads((run / "thresholds.json").read_text())["pixel"]
    for size, expected in (("input", (90, 150)), ("model", (64, 64))):
        out = tmp_path / size
        assert main(["predict", "--run", str(run), "--input", str(inp), "--out", str(out), "--output-size", size,
                     "--precision", "fp32", "--no-progress"]) == 0
        mask = np.asarray(Image.open(out / "masks" / "frame.png"))
        assert Image.open(out / "overlays" / "frame.png").size == expected[::-1] and mask.shape == expected
        np.testing.assert_array_equal(mask > 0, pred.map_at(expected) >= thr)
        row = json.loads((out / "results.json").read_text())["results"][0]
        assert (row["height"], row["width"]) == (90, 150)
    big = pred.map_at((90, 150))
    assert big.shape == (90, 150) and big.min() >= pred.map.min() - 1e-6 and big.max() <= pred.map.max() + 1e-6
    assert pred.map_at(64) is pred.map


def test_predict_glob_and_threshold_override(tiny_run, tmp_path):
    run, root = tiny_run
    out = tmp_path / "out"
    pattern = str(root / "widget" / "test" / "*" / "*.png")
    assert main(["predict", "--run", str(run), "--input", pattern, "--out", str(out), "--threshold", "-1",
                 "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert all(r["decision"] == "defect" for r in result["results"]) and len(result["results"]) == 4


def test_python_api_array_and_pil(tiny_run):
    run, root = tiny_run
    import destseg
    det = destseg.load_detector(run, precision="fp32")
    img = Image.open(scan_mvtec(root, "widget").test[0].path)
    a = det.predict(img)
    b = det.predict(np.asarray(img))
    assert a.map.shape == (64, 64) and a.score == pytest.approx(b.score)
    assert isinstance(a.is_defect, bool)


def _onnx_and_openvino_match_pytorch(run, root, path):
    ort = pytest.importorskip("onnxruntime")
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(path)]) == 0
    det = Detector.load(run, precision="fp32")
    imgs = [Image.open(s.path).convert("RGB") for s in scan_mvtec(root, "widget").test[:3]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run(None, {"images": det.preprocess(imgs).contiguous().numpy()})
    preds = det.predict_batch(imgs)
    assert onnx_map.shape == (3, 64, 64)
    assert np.abs(onnx_map - np.stack([p.map for p in preds])).max() < 1e-4
    assert np.allclose(onnx_score, [p.score for p in preds], atol=1e-4)
    try:
        import openvino  # noqa: F401  (the OpenVINO backend converts the same ONNX graph)
    except ImportError:
        return
    ov_preds = Detector.load(run, precision="fp32", backend="openvino").predict_batch(imgs)
    assert max(np.abs(a.map - b.map).max() for a, b in zip(preds, ov_preds)) < 1e-4


def test_onnx_export_matches_pytorch(tiny_run, tmp_path):
    run, root = tiny_run
    path = tmp_path / "model.onnx"
    _onnx_and_openvino_match_pytorch(run, root, path)
    assert main(["export", "--run", str(run), "--out", str(path)]) == 2  # no silent overwrite


def test_a_failing_converter_is_one_clear_line_and_leaves_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    run, _ = tiny_run

    def refuse(*args, **kwargs):  # what the exporter said about TESD's adaptive pooling before a2f13ba
        raise torch.onnx.errors.OnnxExporterError("ONNX export of operator adaptive pooling, since output_size "
                                                  "is not constant.\n[Caused by the value ...]")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run}: ONNX export of its 'destseg' model failed: ONNX export of operator adaptive pooling" in err
    monkeypatch.undo()
    openvino = pytest.importorskip("openvino")
    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad graph")))
    assert main(["export", "--run", str(run), "--format", "openvino", "--out", str(tmp_path / "ir")]) == 2
    assert "OpenVINO conversion of its ONNX graph failed: bad graph" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no partial file, folder or temporary left behind


@pytest.mark.parametrize("model", ["tesd", "stfpm"])
def test_onnx_export_of_every_model_matches_pytorch(model, tmp_path):
    root = make_mvtec(tmp_path / "data")
    run = tmp_path / model
    cfg = model_config(model, teacher="efficientnet_lite0", image_size=64, batch_size=4,
                       **({"epochs": 1} if model == "stfpm" else {"steps": 2, "student_steps": 1}))
    train(run, model, cfg, DataSource(str(root), "widget"), options=TrainOptions(progress=False))
    _onnx_and_openvino_match_pytorch(run, root, tmp_path / "model.onnx")


def test_benchmark_command_tiny(tmp_path):
    root = make_mvtec(tmp_path / "data")
    root2 = make_mvtec(tmp_path / "data2", category="gadget", seed=1)
    schedule = tmp_path / "tiny.json"
    schedule.write_text(json.dumps({"destseg": {"image_size": 64, "batch_size": 2, "steps": 2, "student_steps": 1},
                                    "stfpm": {"image_size": 64, "batch_size": 2, "epochs": 1}}))
    out = tmp_path / "bench"
    args = ["benchmark", "--data", f"one={root}", "--data", f"two={root2}", "--categories", "widget,two:gadget",
            "--models", "destseg,stfpm", "--schedule", str(schedule), "--out", str(out), "--no-progress",
            "--device", "cpu"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["run"], r["dataset"]) for r in res["runs"]] == [
        ("widget-destseg-s0", "one"), ("widget-stfpm-s0", "one"), ("gadget-destseg-s0", "two"), ("gadget-stfpm-s0", "two")]
    assert all(0 <= r["i_auroc"] <= 1 and r["train_peak_mib"] > 0 for r in res["runs"])
    mean = res["mean_over_categories"]["stfpm"]
    assert mean["categories"] == 2 and mean["i_auroc"] == pytest.approx(
        np.mean([r["i_auroc"] for r in res["runs"] if r["model"] == "stfpm"]))
    md = (out / "results.md").read_text()
    assert "widget-stfpm-s0" in md and "Published" in md and "Mean over categories" in md
    assert main(["benchmark", "--data", str(root), "--categories", "nope", "--out", str(out)]) == 2
    # Re-running skips finished runs (no retraining: checkpoints untouched).
    mtime = (out / "widget-destseg-s0" / "checkpoint.pt").stat().st_mtime
    assert main(args) == 0
    assert (out / "widget-destseg-s0" / "checkpoint.pt").stat().st_mtime == mtime


def test_benchmark_names_the_cpu_and_its_bf16_path():
    def cpuinfo(name, flags):
        entry = f"processor\t: 0\nvendor_id\t: x\nmodel name\t: {name}\nflags\t\t: fpu sse2 {flags}\n\n"
        return entry + entry.replace("processor\t: 0", "processor\t: 1")

    assert describe_cpu(cpuinfo("Intel(R) Xeon(R)  Platinum 8480+", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")) \
        == "Intel(R) Xeon(R) Platinum 8480+ (AMX bf16)"
    assert describe_cpu(cpuinfo("AMD EPYC", "avx2 avx512f avx512_bf16")) == "AMD EPYC (AVX-512 bf16, no AMX)"
    assert describe_cpu(cpuinfo("AMD EPYC", "avx2")) == "AMD EPYC (AVX2, no AVX-512)"
    assert describe_cpu("processor : 0\n") == "unknown CPU"
    vm = cpuinfo("Intel(R) Xeon(R) Processor", "avx2 amx_bf16")
    vm = vm.replace("model name", "cpu family\t: 6\nmodel\t\t: 207\nmodel name")
    assert describe_cpu(vm) == "Intel(R) Xeon(R) Processor (family 6 model 207, AMX bf16)"
    assert describe_cpu().strip()  # this machine's, whatever it is


def test_benchmark_passes_train_options_after_double_dash(tmp_path, capsys):
    root = make_mvtec(tmp_path / "data")
    schedule = tmp_path / "tiny.json"
    schedule.write_text(json.dumps({"destseg": {"image_size": 64, "batch_size": 2, "steps": 2, "student_steps": 1}}))
    out = tmp_path / "bench"
    base = ["benchmark", "--data", str(root), "--categories", "widget", "--models", "destseg", "--schedule",
            str(schedule), "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(base + ["--", "--anomaly-color", "gray", "--log-every", "1"]) == 0
    config = json.loads((out / "widget-destseg-s0" / "config.json").read_text())
    assert config["resolved"]["anomaly_color"] == "gray"
    assert json.loads((out / "results.json").read_text())["meta"]["train_args"] == [
        "--anomaly-color", "gray", "--log-every", "1"]
    assert "Train options: `--anomaly-color gray --log-every 1`" in (out / "results.md").read_text()
    capsys.readouterr()
    # The same --out with other options would mix two experiments in one table: refused, nothing retrained.
    assert main(base + ["--", "--anomaly-color", "rgb"]) == 2
    assert "widget-destseg-s0 was trained with train options" in capsys.readouterr().err
    # ... and so would another schedule
    other = tmp_path / "other.json"
    other.write_text(schedule.read_text())
    assert main([other.as_posix() if a == str(schedule) else a for a in base]
                + ["--", "--anomaly-color", "gray", "--log-every", "1"]) == 2
    assert f"was trained with --schedule {schedule} and this benchmark asks for {other}" in capsys.readouterr().err
    # ... and so would a schedule that kept its name but not its meaning: a second seed trains, then is refused
    schedule.write_text(json.dumps({"destseg": {"image_size": 64, "batch_size": 2, "steps": 3, "student_steps": 1}}))
    assert main(base + ["--seeds", "2", "--", "--anomaly-color", "gray", "--log-every", "1"]) == 2
    assert "widget-destseg-s1 was trained with another config than widget-destseg-s0 (steps 2 vs 3)" in \
        capsys.readouterr().err
    for extra, says in ((["--anomaly-color", "purple"], "argument --anomaly-color: invalid choice"),
                        (["--seed=3"], "--seed after -- is set by benchmark"),
                        (["--mod", "tesd"], "--model after -- is set by benchmark"),
                        (["--bogus"], "unrecognized arguments: --bogus")):
        assert main(base + ["--", *extra]) == 2, extra
        assert says in capsys.readouterr().err, extra
    assert main(base + ["stray"]) == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err


def test_predict_works_right_after_train_with_good_image_threshold(tmp_path):
    """No `destseg test`: the threshold comes from good training images held out of training."""
    root = make_mvtec(tmp_path / "d", n_train=12)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--category", "widget", "--out", str(run), "--teacher",
                 "efficientnet_lite0", "--image-size", "64", "--batch-size", "2", "--steps", "3",
                 "--student-steps", "2", "--no-progress"]) == 0
    thr = json.loads((run / "thresholds.json").read_text())
    assert thr["source"] == "good_images" and thr["n_images"] == 1 and "held out" in thr["method"]
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["train_images"] == 11 and config["resolved"]["threshold_images"] == 1
    assert config["resolved"]["rotation"] == "none" and "unknown category 'widget'" in config["resolved"]["rotation_source"]
    bf16 = autocast_dtype(torch.device("cpu"), "auto") is not None  # what this CPU supports
    assert config["resolved"]["device"] == "cpu" and config["resolved"]["hardware"] == describe_cpu()
    assert config["resolved"]["precision"] == ("bf16 autocast" if bf16 else "fp32") + " (--precision auto)"
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--input", str(root / "widget" / "test"), "--out", str(out),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {r["decision"] for r in rows} <= {"ok", "defect"}
    assert Detector.load(run).predict(np.zeros((64, 64, 3), np.uint8)).is_defect is not None
    # `test` records the labelled split's thresholds beside the ones in force, which stay; --adopt-thresholds puts
    # them in force and keeps the good-image ones beside them; --data alone takes the category from the run.
    before = json.loads((run / "thresholds.json").read_text())
    assert main(["test", "--run", str(run), "--data", str(root), "--no-progress", "--no-report"]) == 0
    thr = json.loads((run / "thresholds.json").read_text())
    assert {k: thr[k] for k in before} == before and thr["measured_on_test"]["source"] == "test_split"
    assert thr["measured_on_test"]["fpr_bound"] is None and thr["measured_on_test"]["method"].startswith("f1-max")
    assert main(["test", "--run", str(run), "--data", str(root), "--no-progress", "--no-report",
                 "--adopt-thresholds"]) == 0
    thr = json.loads((run / "thresholds.json").read_text())
    assert thr["source"] == "test_split" and thr["good_images"]["source"] == "good_images"
    assert "measured_on_test" not in thr and len(list((run / "thresholds-history").iterdir())) == 1


def test_non_square_run_trains_tests_predicts_and_exports(tmp_path):
    """Line-camera-like frames (wide): --image-size H W through the whole pipeline."""
    root = make_mvtec(tmp_path / "d", n_train=8)
    for png in root.rglob("*.png"):  # 64x64 -> 160x64 (W x H), masks too (nearest keeps them binary)
        img = Image.open(png)
        img.resize((160, 64), Image.NEAREST if "ground_truth" in png.parts else Image.BILINEAR).save(png)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--category", "widget", "--out", str(run), "--teacher",
                 "efficientnet_lite0", "--image-size", "64", "128", "--batch-size", "2", "--steps", "3",
                 "--student-steps", "2", "--no-progress"]) == 0
    result = evaluate_run(run, progress=False, report=True)
    out = result.pop("_outputs")
    assert out.maps.shape == (4, 64, 128) and out.masks.shape == (4, 64, 128) and out.masks.any()
    assert 0 <= result["i_auroc"] <= 1 and (run / "report.html").is_file()
    det = Detector.load(run)
    pred = det.predict(np.zeros((300, 700, 3), np.uint8))
    assert pred.map.shape == (64, 128) and pred.is_defect is not None
    pred_dir = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--input", str(root / "widget" / "test"), "--out", str(pred_dir),
                 "--no-progress"]) == 0
    row = json.loads((pred_dir / "results.json").read_text())["results"][0]
    overlay_png = pred_dir / row["overlay"]
    assert Image.open(overlay_png).size == Image.open(row["file"]).size  # the input's own size
    assert main(["predict", "--run", str(run), "--input", str(root / "widget" / "test"), "--out", str(pred_dir),
                 "--output-size", "model", "--overwrite", "--no-progress"]) == 0
    assert Image.open(overlay_png).size == (128, 64)
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "--out", str(onnx_path)]) == 0
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = det.preprocess([np.zeros((64, 128, 3), np.uint8)]).contiguous().numpy()
    onnx_map = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert onnx_map.shape == (1, 64, 128)
    for bad in (["--image-size", "64", "100"], ["--image-size", "1", "2", "3"]):
        assert main(["train", "--data", str(root), "--category", "widget", "--out", str(tmp_path / "x"), *bad]) == 2


def test_openvino_export_and_backend_match_pytorch(tiny_run, tmp_path):
    pytest.importorskip("openvino")
    run, root = tiny_run
    out = tmp_path / "ir"
    assert main(["export", "--run", str(run), "--format", "openvino", "--out", str(out)]) == 0
    assert (out / "model.xml").is_file() and (out / "model.bin").is_file()
    assert main(["export", "--run", str(run), "--format", "openvino", "--out", str(out)]) == 2  # no overwrite
    images = [np.asarray(Image.open(s.path).convert("RGB")) for s in scan_mvtec(root, "widget").test]
    torch_preds = Detector.load(run, precision="fp32").predict_batch(images)
    ov = Detector.load(run, precision="fp32", backend="openvino")
    assert (run / "openvino" / "model.xml").is_file()  # the run's cached IR
    ov_preds = ov.predict_batch(images)
    assert max(np.abs(a.map - b.map).max() for a, b in zip(torch_preds, ov_preds)) < 1e-4
    assert np.allclose([p.score for p in ov_preds], [p.score for p in torch_preds], atol=1e-4)
    assert [p.is_defect for p in ov_preds] == [p.is_defect for p in torch_preds]
    result = evaluate_run(run, progress=False, backend="openvino", precision="fp32")
    assert result["backend"] == "openvino" and result["precision"].startswith("openvino")
    assert main(["predict", "--run", str(run), "--input", str(root / "widget" / "test"), "--out",
                 str(tmp_path / "p"), "--backend", "openvino", "--no-progress"]) == 0
    assert main(["test", "--run", str(run), "--backend", "openvino", "--device", "cuda"]) == 2


def test_compile_failure_falls_back_to_eager_with_one_warning(tiny_run, monkeypatch, capsys):
    import torch

    from destseg.device import CompiledModel

    def broken_compile(model):
        def call(x):
            raise RuntimeError("no C++ compiler found\nlong details")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    run, root = tiny_run
    eager = Detector.load(run, precision="fp32", compile="off")
    det = Detector.load(run, precision="fp32", compile="on")
    assert isinstance(det.model, CompiledModel)
    images = [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)]
    a, b = det.predict_batch(images), det.predict_batch(images)
    err = capsys.readouterr().err
    assert err.count("torch.compile failed (RuntimeError: no C++ compiler found); running eagerly") == 1
    assert np.allclose([p.score for p in a], [p.score for p in eager.predict_batch(images)])
    assert [p.score for p in a] == [p.score for p in b]


def test_overlay_scale_is_fixed_by_the_threshold_not_by_the_image():
    from destseg.visualize import threshold_mask, threshold_overlay

    black = np.zeros((4, 4, 3), np.uint8)
    calm, hot = np.full((4, 4), 0.3), np.full((4, 4), 0.3)
    hot[0, 0] = 5.0  # one very anomalous pixel elsewhere must not wash out the rest of the picture
    a, b = threshold_overlay(black, calm, 0.3), threshold_overlay(black, hot, 0.3)
    assert np.array_equal(a[1:, 1:], b[1:, 1:])
    assert a[2, 2].tolist() == [60, 127, 60]  # the threshold is the scale's green middle, half-blended
    assert threshold_overlay(black, hot, None)[2, 2].tolist() != a[2, 2].tolist()  # no threshold: the map's max
    assert threshold_mask(hot, 0.31).tolist()[0][:2] == [255, 0]


def test_int8_is_calibrated_on_the_training_images_cached_and_close_to_fp32(tiny_run, monkeypatch):
    """--precision int8: OpenVINO runs an NNCF-quantised copy of the run's IR, calibrated on its good training
    images (never the test images), made once and cached."""
    pytest.importorskip("nncf")
    from destseg.data import TestDataset

    run, root = tiny_run
    shutil.rmtree(run / "openvino" / "int8", ignore_errors=True)  # made by the fixture where auto is int8
    seen = []
    real_getitem = TestDataset.__getitem__
    monkeypatch.setattr(TestDataset, "__getitem__", lambda self, i: (seen.append(self.samples[i].path),
                                                                     real_getitem(self, i))[1])
    det = Detector.load(run, precision="int8")
    assert det.model.precision == "int8" and (run / "openvino" / "int8" / "model.xml").is_file()
    assert seen and {p.parent.name for p in seen} == {"good"} and all("train" in p.parts for p in seen)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / "widget" / "test").rglob("*.png"))]
    q = det.predict_batch(images)
    f = Detector.load(run, precision="fp32", backend="torch").predict_batch(images)
    scale = max(float(np.abs(p.map).max()) for p in f)
    assert max(float(np.abs(a.map - b.map).max()) for a, b in zip(q, f)) < 0.2 * scale
    seen.clear()
    Detector.load(run, precision="int8")
    assert not seen  # cached: no second calibration
    import nncf

    from destseg.openvino_ir import QUANTIZATION

    recipe = run / "openvino" / "int8" / "quantization.json"
    assert json.loads(recipe.read_text()) == QUANTIZATION == {**QUANTIZATION, "overflow_fix": "enable"}
    calls = []
    real_quantize = nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda *a, **k: (calls.append(k), real_quantize(*a, **k))[1])
    recipe.write_text(json.dumps({"tool": "nncf.quantize"}))  # a cache made by an older recipe
    Detector.load(run, precision="int8")
    assert seen and calls and calls[0]["advanced_parameters"].overflow_fix == nncf.OverflowFix.ENABLE
    assert json.loads(recipe.read_text()) == QUANTIZATION
    # calibrated on each training image twice: as it is, then with a synthetic anomaly
    assert calls[0]["subset_size"] == 2 * len(set(seen)) and len(seen) >= 2 * len(set(seen))
    import destseg.openvino_ir as ovir

    calls.clear()
    recipe.write_text(json.dumps({"tool": "nncf.quantize"}))  # an older recipe where the images are not: kept
    monkeypatch.setattr(ovir, "calibration_paths", lambda run: [])
    with pytest.warns(UserWarning, match="quantised by an earlier recipe, and the run's training images are not here"):
        assert Detector.load(run, precision="int8").model.precision == "int8"
    assert not calls
    monkeypatch.undo()
    recipe.write_text(json.dumps(QUANTIZATION))
    import openvino as ov

    # The teacher's convolutions read fp32 weights and activations; the rest are quantised.
    quantized = {}
    for op in ov.Core().read_model(str(run / "openvino" / "int8" / "model.xml")).get_ordered_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution"):
            inputs = {i.get_source_output().get_node().get_type_name() for i in op.inputs()}
            quantized[op.get_friendly_name()] = "FakeQuantize" in inputs or "FakeConvert" in inputs
    teacher = {k: v for k, v in quantized.items() if "/teacher/" in k}
    assert teacher and not any(teacher.values())
    assert any(v for k, v in quantized.items() if "/student/" in k) and any(v for k, v in quantized.items() if "/segmentation/" in k)
    with pytest.raises(DestsegError, match="int8 runs on the OpenVINO backend"):
        Detector.load(run, precision="int8", backend="torch")


def test_int8_calibration_leaves_out_the_images_the_thresholds_were_set_on(tiny_run, tmp_path):
    """Good images held out of training for the thresholds stay unseen by the int8 copy too; thresholds set on
    the training images themselves leave those to calibrate on."""
    from destseg.openvino_ir import calibration_paths
    from destseg.run import Run

    run, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("openvino", "checkpoint.pt"))
    train = Run(copy).data.scan().train
    assert len(train) >= 3
    (copy / "calibration.json").write_text(json.dumps({"what": "held out", "files": [str(p) for p in train[:2]]}))
    assert calibration_paths(Run(copy)) == train[2:]
    (copy / "calibration.json").write_text(json.dumps({"what": "seen", "files": [str(p) for p in train]}))
    assert calibration_paths(Run(copy)) == train
    # good test images recalibrated on share the training images' names, not their paths
    same_names = [str(p.parent.parent.parent / "test" / "good" / p.name) for p in train[:2]]
    (copy / "calibration.json").write_text(json.dumps({"what": "recalibrated", "files": same_names}))
    assert calibration_paths(Run(copy)) == train


def test_a_copied_run_keeps_its_int8_ir_and_a_new_checkpoint_remakes_it(tiny_run, tmp_path, monkeypatch):
    """The cached IRs record the checkpoint they were made from: a run copied to a line PC (new modification
    times, no training images there) runs int8 without quantising again; another checkpoint remakes both."""
    nncf = pytest.importorskip("nncf")
    from destseg.checkpoint import load_checkpoint, save_checkpoint

    run, _ = tiny_run
    Detector.load(run, precision="int8")  # made where the training images are
    copy = tmp_path / "line-pc" / "run"
    shutil.copytree(run, copy, copy_function=shutil.copy)  # the modification times are the copy's
    os.utime(copy / "checkpoint.pt")  # the checkpoint now the newest file of the run
    quantized = []  # the calls; the model comes back unquantised (what is checked is whether it is made again)
    monkeypatch.setattr(nncf, "quantize", lambda model, *a, **k: (quantized.append(1), model)[1])
    xml = copy / "openvino" / "int8" / "model.xml"
    before = xml.stat().st_mtime_ns
    assert Detector.load(copy, precision="int8").model.precision == "int8"
    assert not quantized and xml.stat().st_mtime_ns == before
    payload = load_checkpoint(copy / "checkpoint.pt")  # another checkpoint (training went on, say)
    state = payload["model_state"]
    key = next(k for k, v in state.items() if v.is_floating_point() and "segmentation" in k)
    state[key] = state[key] + 0.01
    save_checkpoint(copy / "checkpoint.pt", {k: v for k, v in payload.items()
                                              if k not in ("format_version", "library_version")})
    Detector.load(copy, precision="int8")
    assert quantized == [1] and xml.stat().st_mtime_ns != before


def test_backend_auto_is_openvino_on_a_cpu_and_falls_back_to_torch_with_a_warning(tiny_run, monkeypatch):
    import destseg.openvino_ir as ovir
    from destseg.device import CompiledModel
    from destseg.openvino_ir import OpenVINOModel

    run, _ = tiny_run
    assert isinstance(Detector.load(run).model, OpenVINOModel)  # the default on a CPU with openvino installed
    assert isinstance(Detector.load(run, compile="on").model, CompiledModel)  # torch.compile asks for torch

    def cannot_compile(*a, **k):
        raise RuntimeError("Exception from plugin.cpp:\nSupported primitive descriptors list is empty")

    monkeypatch.setattr(ovir, "OpenVINOModel", cannot_compile)
    with pytest.warns(UserWarning, match="OpenVINO could not take this run .*running it in PyTorch"):
        det = Detector.load(run)
    assert isinstance(det.model, torch.nn.Module)
    with pytest.raises(DestsegError, match="OpenVINO could not run it .*descriptors list is empty"):
        Detector.load(run, backend="openvino")

    def cannot_say_why(*a, **k):
        raise RuntimeError()

    monkeypatch.setattr(ovir, "OpenVINOModel", cannot_say_why)  # an error without a message: named by its type
    with pytest.warns(UserWarning, match=r"OpenVINO could not take this run \(RuntimeError\); running it in PyTorch"):
        assert isinstance(Detector.load(run).model, torch.nn.Module)
    monkeypatch.setattr(ovir, "OpenVINOModel", cannot_compile)


def test_openvino_auto_precision_follows_torch_on_bf16(tiny_run, monkeypatch):
    """OpenVINO's `auto` runs bf16 only where oneDNN does: OpenVINO alone reads the CPU's flags, and under
    ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2 CPU emulated on a newer one) picked bf16 and then failed to compile."""
    pytest.importorskip("openvino")
    from destseg.openvino_ir import OpenVINOModel

    run, _ = tiny_run
    ir = run / "openvino" / "model.xml"
    Detector.load(run, backend="openvino")  # exports the IR
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert OpenVINOModel(ir, "auto").precision == "f32"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    import openvino as ov

    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        assert OpenVINOModel(ir, "auto").precision == "bf16"  # OpenVINO's own default where both agree


def test_auto_precision_is_int8_on_a_cpu_without_native_bf16(tiny_run, monkeypatch):
    """`--precision auto` on OpenVINO: int8 where oneDNN has no native bf16 and the int8 copy is cached or can
    be made; fp32 where it cannot (no NNCF, no training images, a failed quantisation), each with a warning that
    says why; a model whose int8 accuracy was not measured: fp32 without one."""
    pytest.importorskip("nncf")
    import nncf

    import destseg.openvino_ir as ovir

    run, _ = tiny_run
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    shutil.rmtree(run / "openvino" / "int8", ignore_errors=True)  # made by the tests above
    assert Detector.load(run).model.precision == "int8"  # quantised on first use
    assert (run / "openvino" / "int8" / "model.xml").is_file()
    from destseg.models import DeSTSeg

    monkeypatch.setattr(DeSTSeg, "int8_by_default", False)  # a model whose int8 accuracy was not measured
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 is its default: nothing to warn about
        warnings.filterwarnings("ignore", message=".*UNDERTRAINED")  # the tiny run's few steps
        assert Detector.load(run).model.precision == "f32"
    monkeypatch.setattr(DeSTSeg, "int8_by_default", True)
    monkeypatch.setattr(ovir, "calibration_paths", lambda run: [])
    assert Detector.load(run).model.precision == "int8"  # cached: no training images needed
    shutil.rmtree(run / "openvino" / "int8")
    with pytest.warns(UserWarning, match="no int8 copy and its training images, which make one, are not here"):
        assert Detector.load(run).model.precision == "f32"  # neither cached nor makeable here
    monkeypatch.undo()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)

    def fails(*a, **k):
        raise RuntimeError("quantisation failed\nsomething NNCF could not do")

    monkeypatch.setattr(nncf, "quantize", fails)
    with pytest.warns(UserWarning, match="int8 could not be made for this run .something NNCF could not do.; running it in fp32"):
        assert Detector.load(run).model.precision == "f32"
    with pytest.raises(DestsegError, match="something NNCF"):  # asked for: no fallback
        Detector.load(run, precision="int8")
    monkeypatch.setitem(sys.modules, "nncf", None)  # not installed
    with pytest.warns(UserWarning, match=r"NNCF, which makes the int8 copy, is not installed .pip install 'destseg\[int8\]'.; running it in fp32"):
        assert Detector.load(run).model.precision == "f32"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    # native bf16: bf16 (f32 where OpenVINO lacks it; PyTorch, with a warning, where it cannot compile bf16)
    assert getattr(Detector.load(run).model, "precision", "torch") != "int8"


def test_test_json_stays_json_while_int8_is_made(tiny_run, capsys):
    """NNCF prints progress bars and log lines to stdout; `destseg test --json` must print its JSON only. The
    bars go to stderr, and nowhere under --no-progress; the line that says it quantises stays."""
    pytest.importorskip("nncf")
    import logging

    run, _ = tiny_run
    level = logging.getLogger("nncf").level
    for flags in ([], ["--no-progress"]):
        shutil.rmtree(run / "openvino" / "int8", ignore_errors=True)
        capsys.readouterr()
        assert main(["test", "--run", str(run), "--json", "--no-report", "--precision", "int8", *flags]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["precision"] == "openvino int8"
        assert "quantising" in err and ("Statistics collection" in err) == (not flags), err[-2000:]
        assert logging.getLogger("nncf").level == level  # put back


TELEMETRY_PROBE = """
import os, sys
from destseg.openvino_ir import import_nncf, no_telemetry
from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry
if sys.argv[1] == "destseg":
    import_nncf()
    with no_telemetry():
        ovc = init_ovc_telemetry()
else:  # the control: as the libraries behave on their own
    import nncf  # noqa: F401
    ovc = init_ovc_telemetry()
from nncf.telemetry.wrapper import telemetry
print(telemetry._impl.consent, ovc.consent, os.environ.get("CI"))
"""


def test_openvino_and_nncf_send_no_usage_data_from_destseg(tmp_path):
    """Outside CI, with no opt-out on the machine, OpenVINO's converter and NNCF would send usage data to Intel
    (offline, their sender held the process at exit); through destseg they do not, and CI is left unset."""
    pytest.importorskip("nncf")
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))  # no consent file of this machine's user
    got = {}
    for who in ("libraries", "destseg"):
        r = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, who], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        got[who] = r.stdout.split()
    assert got["libraries"][:2] == ["True", "True"]  # the control: they would send
    assert got["destseg"] == ["False", "False", "None"]
