import numpy as np
import pytest
import torch
from PIL import Image

from destseg.errors import CheckpointError
from destseg.models import build_model, model_config
from destseg.models.backbones import SameConv2d, build_backbone, load_resnet18_weights, ResNet18, same_pad


@pytest.mark.parametrize("name, classes", [("chelsea", range(281, 286)), ("coffee", [967])])
def test_lite0_weights_classify_real_photos(name, classes):
    data = pytest.importorskip("skimage.data")
    net = build_backbone("efficientnet_lite0", pretrained=True).eval()
    img = Image.fromarray(getattr(data, name)()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        top = int(net((x - 0.5) / 0.5).argmax())
    assert top in classes


def test_resnet18_refuses_file_with_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fake = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    fake.parent.mkdir(parents=True)
    torch.save(ResNet18().state_dict(), fake)  # right name and shapes, wrong content
    with pytest.raises(CheckpointError, match="does not match the expected prefix f37072fd"):
        load_resnet18_weights()
    with pytest.raises(CheckpointError, match="does not match"):
        load_resnet18_weights(fake)


def test_resnet18_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(CheckpointError, match="resnet18-f37072fd.pth.*--teacher-weights"):
        load_resnet18_weights()


def test_resnet18_parameter_names_are_torchvisions():
    names = set(ResNet18().state_dict())
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias",
            "layer4.1.bn2.running_var"} <= names
    assert len([n for n in names if not n.endswith("num_batches_tracked")]) == 102


@pytest.mark.parametrize("model", ["destseg", "tesd", "stfpm"])
@pytest.mark.parametrize("teacher", ["resnet18", "efficientnet_lite0"])
def test_output_shapes_and_teacher_frozen(model, teacher):
    torch.manual_seed(0)
    m = build_model(model, model_config(model, teacher=teacher, image_size=64), pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    batch = {"image": x, "augmented": x + 0.1, "mask": torch.zeros(2, 1, 64, 64)}
    for stage in m.stages(10):
        m.train()
        assert not m.teacher.net.training  # the teacher stays in eval mode
        loss = m.training_loss(stage.name, batch)
        loss.backward()
        assert all(p.grad is None for p in m.teacher.parameters())
    m.eval()
    with torch.no_grad():
        out = m(x)
    assert out["map"].shape == (2, 64, 64) and out["score"].shape == (2,)


def test_seg_width_narrows_the_segmentation_network_only():
    paper = build_model("destseg", model_config("destseg"), pretrained=False)
    narrow = build_model("destseg", model_config("destseg", seg_width=64), pretrained=False)
    aspp = narrow.segmentation.head[0]
    assert narrow.segmentation.res[0].conv1.in_channels == 448 and narrow.segmentation.res[1].conv2.out_channels == 64
    assert aspp.project[0].in_channels == 4 * 64 and narrow.segmentation.head[-1].in_channels == 64
    assert [p.shape for p in narrow.student.parameters()] == [p.shape for p in paper.student.parameters()]
    assert build_model("tesd", model_config("tesd", seg_width=32), pretrained=False).segmentation.head[-1].in_channels == 32
    with pytest.raises(ValueError, match="--seg-width must be at least 8"):
        model_config("destseg", seg_width=4)


def test_destseg_matches_spec_shapes():
    m = build_model("destseg", model_config("destseg"), pretrained=False)
    assert m.segmentation.res[0].conv1.in_channels == 448  # 64 + 128 + 256
    aspp = m.segmentation.head[0]
    assert aspp.project[0].in_channels == 1024 and [b[0].dilation[0] for b in aspp.branches] == [6, 12, 18]
    dec = m.student.decoder
    assert [dec.layer4[0].conv1.out_channels, dec.layer3[0].conv1.out_channels,
            dec.layer2[0].conv1.out_channels, dec.layer1[0].conv1.out_channels] == [512, 256, 128, 64]
    # The student encoder zero-inits the last BN of each block.
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in m.student.encoder.layer1)
    stages = m.stages(100)
    assert [(s.name, s.steps) for s in stages] == [("student", 1000), ("segmentation", 4000)]
    assert [g["lr"] for g in stages[1].param_groups] == [0.1, 0.01]


def test_ablation_switches():
    m = build_model("destseg", model_config("destseg", teacher="efficientnet_lite0", student_arch="identical",
                                            segmentation=False, denoising=False), pretrained=False)
    assert m.segmentation is None and [s.name for s in m.stages(10)] == ["student"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = m.eval()(x)
    assert torch.equal(out["map"], out["dest_map"])
    with pytest.raises(ValueError, match="student_arch"):
        build_model("destseg", model_config("destseg", student_arch="bogus"), pretrained=False)


@pytest.mark.parametrize("size", [(16, 16), (5, 9), (1, 2)])
def test_aspp_closed_form_pool_branch_equals_the_broadcast_convolution(size):
    """The paper: the ASPP fuses the concatenation of its four branches with a 3x3 conv. The pooled branch's
    share is computed in closed form; it must equal convolving the broadcast map (forward and gradients),
    at the border, on non-square and on maps smaller than the kernel."""
    from destseg.models.common import ASPP, cat_channels

    torch.manual_seed(0)
    aspp = ASPP(8, 8, rates=(1, 2, 3)).double().train()
    x = torch.randn(3, 8, *size, dtype=torch.float64)

    def by_definition(x):
        pooled = aspp.pool(x).expand(-1, -1, *x.shape[-2:])
        return aspp.project(cat_channels([b(x) for b in aspp.branches] + [pooled]))

    results = []
    for fn in (by_definition, aspp):
        xi = x.clone().requires_grad_()
        aspp.zero_grad()
        y = fn(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in aspp.parameters()])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape, size", [((16, 16), (4, 4)), ((8, 20), (2, 5)), ((4, 4), (4, 4)), ((7, 9), (2, 4))])
def test_tesd_fixed_pooling_equals_adaptive_pooling(shape, size):
    """TESD's fusion pools each scale with a fixed kernel (ONNX-exportable) where sizes divide: the same
    function as the adaptive pooling it replaces, and adaptive pooling where they do not (7x9 -> 2x4)."""
    import torch.nn.functional as F

    from destseg.models.tesd import _pool_to

    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    assert torch.allclose(_pool_to(x, size), F.adaptive_avg_pool2d(x, size), atol=1e-12)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (5, 1), (3, 2), (5, 2)])
@pytest.mark.parametrize("size", [(32, 32), (33, 30)])
def test_same_conv_equals_tensorflow_same_padding(kernel, stride, size):
    """SameConv2d pads inside the convolution at stride 1 and explicitly at stride 2: the same output as
    padding every input the TensorFlow way (the Lite0 weights' convention), for even and odd sizes."""
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, kernel, stride, groups=4, bias=False)
    x = torch.randn(2, 4, *size)
    reference = torch.nn.functional.conv2d(same_pad(x, kernel, stride), conv.weight, stride=stride, groups=4)
    assert torch.allclose(conv(x), reference, atol=1e-6)
    assert conv(x).shape[-2:] == tuple(-(-s // stride) for s in size)
