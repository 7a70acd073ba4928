"""The model contract, proved from outside the package: a small model defined here (a convolutional
autoencoder whose anomaly map is its reconstruction error) registers itself and then trains, tests, predicts
and exports through the command line and the Python API, with its flags, checks, schedule and published
numbers taken from its own file. docs/ARCHITECTURE.md uses it as the worked example."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from destseg.models import MODELS, AnomalyModel, ModelConfig, Stage, option, register_model


@dataclass
class TinyAEConfig(ModelConfig):
    """Every field is an option: its default, help text and check become a flag of `destseg train`."""

    ae_steps: int = option(100, "training steps", lambda v: v >= 1, "at least 1")
    ae_width: int = option(16, "channels of the hidden layer", lambda v: v >= 1, "at least 1")
    ae_lr: float = option(0.05, "learning rate", lambda v: v > 0, "positive", flag=None)  # schedules/JSON only


def tiny_cpu_schedule(n_train: int) -> tuple[dict, str]:
    return {"ae_steps": 2 * n_train, "batch_size": 4}, f"tiny cpu schedule: {2 * n_train} steps of 4"


class TinyAE(AnomalyModel):
    name = "tiny_ae"
    Config = TinyAEConfig
    published = {"source": "nobody, a test model", "i_auroc": 0.5}
    schedules = {"cpu": tiny_cpu_schedule}

    def __init__(self, config: TinyAEConfig, teacher_weights=None, pretrained: bool = True):
        super().__init__(config)  # no teacher: ``config.teacher`` only sets the input normalisation
        w = config.ae_width
        self.net = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 3, 3, padding=1))

    def stages(self, n_train: int) -> list[Stage]:
        return [Stage("fit", self.config.ae_steps, [{"params": list(self.net.parameters()), "lr": self.config.ae_lr}],
                      [self.net], needs_synthesis=False)]

    def training_loss(self, stage: str, batch: dict) -> torch.Tensor:
        x = batch["image"]
        return ((self.net(x) - x) ** 2).mean()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        anomaly_map = ((self.net(x) - x) ** 2).mean(dim=1)
        return {"map": anomaly_map, "score": anomaly_map.flatten(1).amax(dim=1)}


@pytest.fixture
def tiny_ae():
    register_model(TinyAE)
    yield TinyAE
    MODELS.pop(TinyAE.name)


def test_a_model_defined_outside_the_package_runs_through_the_cli(tiny_ae, tiny_mvtec, tmp_path, capsys):
    from destseg.benchmark import published
    from destseg.cli import main

    run, out = tmp_path / "run", tmp_path / "pred"
    base = ["train", "--data", str(tiny_mvtec), "--category", "widget", "--model", "tiny_ae", "--out", str(run),
            "--teacher", "efficientnet_lite0", "--image-size", "64", "--no-progress"]
    assert main(base + ["--ae-width", "0"]) == 2  # its own check, naming its own flag
    assert "--ae-width must be at least 1 (got 0)" in capsys.readouterr().err
    assert main(base + ["--steps", "5"]) == 2  # another model's flag
    assert "--steps does not apply to --model tiny_ae" in capsys.readouterr().err
    assert main(base + ["--schedule", "cpu", "--ae-width", "4"]) == 0
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["ae_width"] == 4 and record["config"]["ae_steps"] == 12  # 6 images, its cpu schedule
    assert record["resolved"]["schedule"].startswith("tiny cpu schedule")
    assert record["training"]["steps_trained"] == record["training"]["steps_planned"] == 12

    capsys.readouterr()
    assert main(["test", "--run", str(run), "--json", "--no-progress", "--workers", "0"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["i_auroc"] <= 1 and metrics["model"] == "tiny_ae" and metrics["steps_trained"] == 12
    assert main(["predict", "--run", str(run), "--input", str(tiny_mvtec / "widget" / "test"), "--out", str(out),
                 "--no-progress"]) == 0
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4

    import onnxruntime as ort

    from destseg.infer import Detector

    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    det = Detector.load(run, precision="fp32")
    x = det.preprocess([np.full((64, 64, 3), 120, np.uint8)]).contiguous()
    onnx_map, onnx_score = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})
    np.testing.assert_allclose(onnx_map, det.model(x)["map"].detach().numpy(), rtol=1e-4, atol=1e-5)
    assert published()["tiny_ae"]["source"] == "nobody, a test model"


def test_a_model_defined_outside_the_package_runs_through_the_python_api(tiny_ae, tiny_mvtec, tmp_path):
    from destseg.data import DataSource
    from destseg.infer import Detector, evaluate_run
    from destseg.run import Run
    from destseg.train import TrainOptions, train

    run = tmp_path / "run"
    train(run, "tiny_ae", data=DataSource(str(tiny_mvtec), "widget"), overrides={"ae_steps": 3, "image_size": 64},
          options=TrainOptions(progress=False, precision="fp32", schedule="paper"))
    assert isinstance(Run(run).config, TinyAEConfig) and Run(run).config.ae_steps == 3
    result = evaluate_run(run, progress=False, workers=0)
    assert result["steps_trained"] == 3 and "i_auroc" in result
    pred = Detector.load(run).predict(np.full((80, 80, 3), 120, np.uint8))
    assert pred.map.shape == (64, 64) and pred.is_defect is not None
