"""Training numerics on every device type present: losses under autocast, saturated logits, batch sizes."""

import pytest
import torch

from destseg.errors import DestsegError
from destseg.models import build_model, model_config
from destseg.models.common import SegmentationNet, segmentation_loss
from destseg.train import DataSource, TrainOptions, check_per_process_batch, train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def spec_loss64(logits, target, gamma=4.0):
    """The paper's definition on the probability, in float64: focal (no alpha) + L1, means over pixels."""
    p = torch.sigmoid(logits.double())
    y = target.double()
    p_t = p * y + (1 - p) * (1 - y)
    return (-torch.log(p_t) * (1 - p_t) ** gamma).mean() + (p - y).abs().mean()


def test_segmentation_loss_equals_spec_where_probability_is_representable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 16, 16, generator=g) * 4  # |z| up to ~15: p representable in fp32
    target = (torch.rand(4, 1, 16, 16, generator=g) > 0.7).float()
    assert float(segmentation_loss(logits, target)) == pytest.approx(float(spec_loss64(logits, target)), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_confidently_wrong_pixels_keep_a_gradient(device, dtype):
    """Last conv bias +20 (p rounds to 1.0 in bf16 and fp32) on an all-normal target: the loss on clamped
    probabilities gave this bias exactly zero gradient."""
    torch.manual_seed(0)
    net = SegmentationNet(8, width=16).to(device)
    with torch.no_grad():
        net.head[-1].bias.fill_(20.0)
    x = torch.randn(2, 8, 16, 16, device=device)
    target = torch.zeros(2, 1, 16, 16, device=device)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = segmentation_loss(net.logits(x), target)
    loss.backward()
    grad = net.head[-1].bias.grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(grad.abs().min()) > 0.5  # d(focal)/dz -> 1 for a saturated wrong pixel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["destseg", "tesd", "stfpm"])
def test_training_step_of_every_model_under_autocast(device, model):
    torch.manual_seed(0)
    m = build_model(model, model_config(model, teacher="efficientnet_lite0", image_size=64), pretrained=False)
    m = m.to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    batch = {"image": x, "augmented": x + 0.1, "mask": (torch.rand(2, 1, 64, 64, device=device) > 0.7).float()}
    for stage in m.stages(10):
        m.eval()
        for mod in stage.train_modules:
            mod.train()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = m.training_loss(stage.name, batch)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for g in stage.param_groups for p in g["params"] if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_batch_of_one_per_process_is_refused_before_training(tmp_path, tiny_mvtec):
    cfg = model_config("destseg", teacher="efficientnet_lite0", image_size=64, batch_size=1, steps=4,
                       student_steps=2)
    with pytest.raises(DestsegError, match=r"--batch-size 1 leaves 1 image .* 1 process.*--batch-size 2"):
        train(tmp_path / "run", "destseg", cfg, DataSource(str(tiny_mvtec), "widget"),
              options=TrainOptions(progress=False))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # torchrun with batch = world size: one image per process.
    def stages(name, **fields):
        return build_model(name, model_config(name, teacher="efficientnet_lite0", **fields), pretrained=False).stages(10)

    with pytest.raises(DestsegError, match="--batch-size 4 leaves 1 image per step to each of 4 process"):
        check_per_process_batch(stages("tesd"), 4, 4)
    check_per_process_batch(stages("stfpm"), 4, 4)  # no pooled BatchNorm: fine
    check_per_process_batch(stages("destseg", segmentation=False), 1, 1)
    # the segmentation stage's own batch size is checked as --batch-size is
    with pytest.raises(DestsegError, match="segmentation stage's batch size 6 .* divisible by the 4 processes"):
        check_per_process_batch(stages("destseg", seg_batch_size=6), 8, 4)
    with pytest.raises(DestsegError, match="segmentation stage's batch size 4 leaves 1 image .* a batch size of 8"):
        check_per_process_batch(stages("destseg", seg_batch_size=4), 8, 4)
    check_per_process_batch(stages("destseg", seg_batch_size=8), 4, 4)  # the student's 1 per process is fine
    with pytest.raises(ValueError, match=r"--seg-batch-size must be 0 \(--batch-size\) or at least 2"):
        model_config("destseg", seg_batch_size=1)
