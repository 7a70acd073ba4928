"""Records that tell the truth: thresholds with a stated guarantee, training records that say what was
trained, and a test for each defect fixed (each fails on the code before its fix)."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from destseg.checkpoint import load_checkpoint, save_checkpoint
from destseg.cli import main
from destseg.models import build_model, model_config
from destseg.models.backbones import Teacher, build_backbone
from destseg.models.common import segmentation_loss
from destseg.models.stfpm import STFPMConfig
from destseg.thresholds import conformal_threshold, fpr_bound, good_image_thresholds, images_needed
from destseg.train import DataSource, TrainOptions, resolve_rotation, train

DISTRIBUTIONS = {"normal": lambda rng, size: rng.normal(size=size),
                 "exponential": lambda rng, size: rng.exponential(size=size),
                 "uniform": lambda rng, size: rng.uniform(size=size)}


def false_positive_rate(rule, n: int, fpr: float, dist: str, trials: int = 4000, seed: int = 0) -> float:
    """How often a fresh good score reaches the threshold ``rule`` set from n good scores, over ``trials``
    independent calibration sets (the guarantee is marginal over the calibration draw)."""
    rng = np.random.default_rng(seed)
    calibration = DISTRIBUTIONS[dist](rng, (trials, n))
    fresh = DISTRIBUTIONS[dist](rng, trials)
    thresholds = np.array([rule(c, fpr) for c in calibration])
    return float(np.mean(fresh >= thresholds))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 300), fpr=st.sampled_from([0.005, 0.01, 0.05, 0.1, 0.3]),
       dist=st.sampled_from(sorted(DISTRIBUTIONS)))
def test_a_good_image_exceeds_the_threshold_at_most_at_the_stated_rate(n, fpr, dist):
    bound = fpr_bound(n, fpr)
    trials = 4000
    observed = false_positive_rate(conformal_threshold, n, fpr, dist, trials)
    assert observed <= bound + 4 * math.sqrt(bound * (1 - bound) / trials), (n, fpr, dist, observed, bound)


def test_the_former_quantile_rule_breaks_that_bound_on_few_images():
    """What the rule replaced: np.quantile(scores, 1 - fpr) on 21 held-out images (bottle's 10%) let ~5.5%
    of good images through at a 1% target, above even the 1/22 that 21 images can promise."""
    observed = false_positive_rate(lambda c, a: np.quantile(c, 1 - a), 21, 0.01, "normal", 20000)
    assert observed > fpr_bound(21, 0.01) + 0.004


def test_thresholds_record_their_guarantee_and_warn_when_too_few_images():
    rng = np.random.default_rng(0)
    scores, maps = rng.normal(size=21), rng.normal(size=(21, 8, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"21 good images cannot set a 0.01 .*99 good images are needed"):
        t = good_image_thresholds(scores, maps, 0.01, "held-out images")
    assert t["n_images"] == 21 and t["fpr_target"] == 0.01 and t["fpr_bound"] == pytest.approx(1 / 22)
    # just above the largest: a calibration image is not called defect by its own threshold
    up = np.float32(np.inf)
    assert t["image"] == np.nextafter(np.float32(scores.max()), up) and t["pixel"] == np.nextafter(maps.max(), up)
    assert not (scores >= t["image"]).any() and not (maps >= t["pixel"]).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough images: no warning
        t = good_image_thresholds(rng.normal(size=199), rng.normal(size=(199, 4, 4)), 0.01, "x")
    assert t["fpr_bound"] == 0.01 and images_needed(0.01) == 99 and images_needed(0.05) == 19


def test_the_pixel_threshold_keeps_masks_of_good_images_empty_at_the_stated_rate():
    rng = np.random.default_rng(1)
    n, fpr, trials = 40, 0.1, 3000
    empty = []
    for _ in range(trials):
        t = good_image_thresholds(rng.normal(size=n), rng.normal(size=(n, 6, 6)), fpr, "x")
        empty.append(bool((rng.normal(size=(6, 6)) < t["pixel"]).all()))
    assert 1 - np.mean(empty) <= fpr + 4 * math.sqrt(fpr * (1 - fpr) / trials)


TINY = dict(teacher="efficientnet_lite0", image_size=64, batch_size=2, seg_width=16)


def test_a_budget_cut_run_says_what_it_trained_everywhere(tmp_path, tiny_mvtec, capsys):
    run = tmp_path / "run"
    cfg = model_config("destseg", **TINY, steps=40, student_steps=20)
    train(run, "destseg", cfg, DataSource(str(tiny_mvtec), "widget"),
          options=TrainOptions(progress=False, time_budget_s=0.001))
    err = capsys.readouterr().err
    assert "stage student stopped after 1 of 20 steps (5% of the plan)" in err
    assert "UNDERTRAINED: trained 2 of 40 planned steps" in err
    record = json.loads((run / "config.json").read_text())["training"]
    assert (record["steps_trained"], record["steps_planned"], record["undertrained"]) == (2, 40, True)
    assert main(["test", "--run", str(run), "--no-progress", "--workers", "0"]) == 0
    assert "UNDERTRAINED: trained 2 of 40 planned steps (5%)" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps_trained"] == 2 and metrics["undertrained"] and "step" not in metrics
    assert [s["trained"] for s in metrics["stages"]] == [1, 1]
    assert "Undertrained" in (run / "report.html").read_text()


def test_a_resumed_run_counts_the_time_already_spent_against_the_budget(tmp_path, tiny_mvtec):
    run = tmp_path / "run"
    cfg = model_config("destseg", **TINY, steps=40, student_steps=20)
    train(run, "destseg", cfg, DataSource(str(tiny_mvtec), "widget"),
          options=TrainOptions(progress=False, time_budget_s=600))  # generous: all 40 steps
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert [s["trained"] for s in ckpt["stages"]] == [20, 20]
    # As if killed at step 4 after 700 s of the 600 s budget: the resumed run must not start a new clock.
    ckpt.update(step=4, stage="student", finished=False, optimizer_state=None, elapsed_s=700.0,
                stages=[{"name": "student", "planned": 20, "trained": 4}, {"name": "segmentation", "planned": 20,
                                                                          "trained": 0}])
    save_checkpoint(run / "checkpoint.pt", ckpt)
    train(run, options=TrainOptions(progress=False), resume=True)
    assert [s["trained"] for s in load_checkpoint(run / "checkpoint.pt")["stages"]] == [5, 1]


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_focal_gamma_below_one_keeps_finite_gradients(gamma):
    """(1 - p_t)^gamma has an infinite derivative at 0 for gamma < 1: a confidently correct pixel (p_t = 1
    exactly) made every gradient NaN (0 * inf)."""
    logits = torch.tensor([[-200.0, 200.0, 0.3, -1.2]]).view(1, 1, 2, 2).requires_grad_()
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0]]).view(1, 1, 2, 2)
    loss = segmentation_loss(logits, target, gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    p = torch.sigmoid(logits.detach().double())[0, 0].flatten()[2:]
    y = target[0, 0].flatten()[2:].double()
    p_t = p * y + (1 - p) * (1 - y)
    spec = ((-torch.log(p_t) * (1 - p_t) ** gamma).sum() + (p - y).abs().sum()) / 4  # the two saturated pixels add 0
    assert float(loss) == pytest.approx(float(spec), rel=1e-5)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_the_segmentation_loss_runs_in_fp32_under_bf16_autocast(device):
    """Same bf16 logits, loss inside and outside autocast: equal to fp32 rounding. A loss computed in bf16
    (autocast left on, no cast) differs by far more, as the second assertion shows."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 1, 32, 32, generator=g)).bfloat16().to(device)
    target = (torch.rand(2, 1, 32, 32, generator=g) > 0.8).float().to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        inside = segmentation_loss(logits, target)
    reference = segmentation_loss(logits.float(), target)
    assert inside.dtype == torch.float32 and float(inside) == pytest.approx(float(reference), rel=1e-6)
    z, y = logits, target.bfloat16()
    miss = y * torch.sigmoid(-z) + (1 - y) * torch.sigmoid(z)
    in_bf16 = (-(y * torch.nn.functional.logsigmoid(z) + (1 - y) * torch.nn.functional.logsigmoid(-z)) * miss**4).mean() \
        + miss.mean()
    assert abs(float(in_bf16) - float(reference)) > 1e-4 * float(reference)


def test_no_segmentation_trains_the_student_steps_and_refuses_steps(tmp_path, tiny_mvtec, capsys):
    cfg = model_config("destseg", segmentation=False, student_steps=7)
    assert cfg.steps == 7  # the one stage's plan, not the 5000 default that was silently ignored
    assert main(["train", "--data", str(tiny_mvtec), "--category", "widget", "--out", str(tmp_path / "r"),
                 "--no-segmentation", "--steps", "30", "--student-steps", "7"]) == 2
    assert "--steps 30 does not apply without a segmentation network" in capsys.readouterr().err


def test_the_cpu_schedule_counts_only_the_images_that_train(tmp_path):
    from conftest import make_mvtec

    root = make_mvtec(tmp_path / "d", n_train=30)
    run = tmp_path / "run"
    train(run, "destseg", data=DataSource(str(root), "widget"), overrides={"image_size": 64, "steps": 2,
                                                                           "student_steps": 1, "seg_width": 16,
                                                                           "teacher": "efficientnet_lite0"},
          options=TrainOptions(progress=False, schedule="cpu"))  # 3 of 30 held out for the threshold
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["train_images"] == 27 and "for 27 training images" in resolved["schedule"]


# ------------------------------------------------------------------------- the three STFPM fixes

def test_a_trainable_lite0_updates_its_batchnorm_statistics_at_pytorch_momentum():
    student = build_model("stfpm", model_config("stfpm", teacher="efficientnet_lite0"), pretrained=False).student
    assert {m.momentum for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    teacher = Teacher("efficientnet_lite0")  # the ImageNet weights' own running statistics, frozen
    assert {m.momentum for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}


def test_depthwise_kernels_start_at_the_grouped_fan_out_std():
    torch.manual_seed(0)
    net = build_backbone("efficientnet_lite0", pretrained=False, features_only=True)
    dw = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    weights = torch.cat([m.weight.flatten() for m in dw if m.kernel_size == (3, 3)])
    assert float(weights.std()) == pytest.approx(math.sqrt(2 / 9), rel=0.05)  # not sqrt(2 / (9 C))


def test_stfpm_trains_without_the_category_rotation_by_default():
    rotation, why = resolve_rotation("bottle", STFPMConfig(), TrainOptions())
    assert rotation == "none" and "category_rotation=False" in why
    assert resolve_rotation("bottle", model_config("destseg"), TrainOptions())[0] == "rot90"
    assert resolve_rotation("bottle", STFPMConfig(), TrainOptions(rotation="rot90"))[0] == "rot90"


def test_batch_reduction_sum_is_half_the_batch_times_the_mean():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    losses = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = build_model("stfpm", model_config("stfpm", teacher="efficientnet_lite0", batch_reduction=reduction),
                            pretrained=False)
        losses[reduction] = float(model.training_loss("student", {"image": x}))
    assert losses["sum"] == pytest.approx(0.5 * 4 * losses["mean"], rel=1e-6)
    with pytest.raises(ValueError, match="--batch-reduction must be mean or sum"):
        model_config("stfpm", batch_reduction="max")


def test_validation_scores_in_eval_mode_and_leaves_the_batchnorm_statistics_alone(tiny_mvtec):
    """STFPM picks its best weights by the mean map on held-out images. That map was computed with the student
    in training mode: BatchNorm normalised by the validation batch's own statistics (not the maps inference
    makes) and folded the validation images into its running statistics."""
    from destseg.data import TestDataset, TestSample, scan_mvtec
    from destseg.models.backbones import backbone_spec
    from destseg.scoring import mean_map

    model = build_model("stfpm", model_config("stfpm", teacher="efficientnet_lite0"), pretrained=False)
    stage = model.stages(10)[0]
    stage.train_mode(model)
    bn = [m for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    ds = TestDataset([TestSample(p, 0, None, "good") for p in scan_mvtec(tiny_mvtec, "widget").train], 64,
                     backbone_spec("efficientnet_lite0").normalize)
    value = mean_map(model, ds, torch.device("cpu"), None, 4)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bn))
    assert model.student.training and not model.teacher.training  # each module's mode put back
    model.eval()
    assert value == pytest.approx(mean_map(model, ds, torch.device("cpu"), None, 4))
