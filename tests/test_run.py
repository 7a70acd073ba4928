"""Run directories: one written by destseg 0.2.0 (before the Run object, the model registry and the training
records) still loads, tests, predicts, exports and resumes; the inference side imports nothing from training."""

import json
import subprocess
import sys

import torch

from destseg.checkpoint import load_checkpoint, save_checkpoint
from destseg.cli import main
from destseg.models import model_config
from destseg.train import DataSource, TrainOptions, train

# config fields DeSTSeg had in destseg 0.2.0, in its order
OLD_DESTSEG_FIELDS = ("teacher", "image_size", "batch_size", "steps", "student_steps", "lr_student", "lr_res", "lr_head",
                      "momentum", "weight_decay", "focal_gamma", "top_k", "seg_width", "denoising", "student_arch",
                      "segmentation")


def as_written_by_0_2_0(run, finished: bool = True):
    """Rewrite a run directory into destseg 0.2.0's layout: config.json with the schedule in words among
    the options and no training record, a checkpoint with the step counter and ``time_budget_cuts`` instead
    of per-stage counts, thresholds.json with an ``fpr`` quantile."""
    record = json.loads((run / "config.json").read_text())
    old_config = {k: record["config"][k] for k in OLD_DESTSEG_FIELDS}
    options = {k: v for k, v in record["options"].items()}
    options["schedule"] = "paper (SPEC) schedule"
    resolved = {k: v for k, v in record["resolved"].items() if k != "schedule"}
    (run / "config.json").write_text(json.dumps({"library_version": "0.2.0", "model": "destseg", "config": old_config,
                                                 "data": record["data"], "options": options, "resolved": resolved}))
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt = {k: v for k, v in ckpt.items() if k not in ("stages",)}
    ckpt.update(config=old_config, library_version="0.2.0", time_budget_cuts={}, finished=finished)
    save_checkpoint(run / "checkpoint.pt", ckpt)
    thr = json.loads((run / "thresholds.json").read_text())
    (run / "thresholds.json").write_text(json.dumps({"image": thr["image"], "pixel": thr["pixel"], "source": "good_images",
                                                     "fpr": 0.01, "n_images": 6, "method": "(1 - 0.01) quantile"}))


def test_a_run_written_by_destseg_0_2_0_still_loads_tests_predicts_and_exports(tmp_path, tiny_mvtec, capsys):
    run = tmp_path / "run"
    cfg = model_config("destseg", teacher="efficientnet_lite0", image_size=64, batch_size=2, steps=4, student_steps=2,
                       seg_width=16)
    train(run, "destseg", cfg, DataSource(str(tiny_mvtec), "widget"), options=TrainOptions(progress=False))
    as_written_by_0_2_0(run)
    assert main(["test", "--run", str(run), "--json", "--no-progress", "--workers", "0"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["steps_planned"] == 4 and metrics["steps_trained"] == 4 and "earlier destseg" in metrics["training_note"]
    assert main(["predict", "--run", str(run), "--input", str(tiny_mvtec / "widget" / "test"),
                 "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.onnx")]) == 0


def test_an_unfinished_run_of_destseg_0_2_0_resumes(tmp_path, tiny_mvtec):
    run = tmp_path / "run"
    cfg = model_config("destseg", teacher="efficientnet_lite0", image_size=64, batch_size=2, steps=4, student_steps=2,
                       seg_width=16)
    train(run, "destseg", cfg, DataSource(str(tiny_mvtec), "widget"), options=TrainOptions(progress=False))
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt.update(step=3, stage="segmentation", finished=False, optimizer_state=None)
    save_checkpoint(run / "checkpoint.pt", ckpt)
    as_written_by_0_2_0(run, finished=False)
    train(run, options=TrainOptions(progress=False), resume=True)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["finished"] and ckpt["step"] == 4
    assert [(s["name"], s["trained"]) for s in ckpt["stages"]] == [("student", 2), ("segmentation", 2)]


def test_inference_imports_nothing_from_training():
    """`destseg test`, predict, serve, export and the Python API load without the training modules."""
    code = ("import sys, destseg.infer, destseg.predict, destseg.serve, destseg.export, destseg.openvino_ir, destseg.run,"
            " destseg.watch, destseg.feedback, destseg.drift;"
            "bad = sorted(m for m in sys.modules if m in ('destseg.train', 'destseg.loop',"
            " 'destseg.data.synthesis', 'destseg.data.device_synthesis', 'destseg.schedules'));"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"inference imported training modules: {out}"
    assert torch.__version__  # (torch itself is shared)
