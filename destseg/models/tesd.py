"""TESD: teacher-encoder / student-decoder denoising with adaptive segmentation, after PFADSeg.

Our interpretation of the PFADSeg abstract (see docs/TESD.md for what is taken from it and what is ours).
The student has no encoder of its own: it decodes the frozen teacher's features of the corrupted image,
fused across the three scales into a stride-32 bottleneck, back to the teacher's features of the clean
image. The segmentation network weights the per-scale similarity features with learned, per-pixel,
input-dependent weights before fusing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from destseg.models.backbones import BasicBlock, Teacher, kaiming_init
from destseg.models.base import option, register_model
from destseg.models.common import (
    Decoder, SegmentationGuidedConfig, SegmentationGuidedModel, SegmentationNet, cat_channels, cosine_distance_maps,
    cpu_schedule, narrow_cpu_schedule, resize,
)


@dataclass
class TESDConfig(SegmentationGuidedConfig):
    """Same schedule shape as DeSTSeg (the PFADSeg paper's own values are not public)."""

    fusion_width: int = option(128, "channels per scale in the fusion block", lambda v: v >= 1, "at least 1",
                               flag=None)


class ScaleFusion(nn.Module):
    """Multi-scale fusion into a bottleneck: each teacher scale -> 1x1 conv to ``width``, average-pooled
    to stride 16, concatenated, then one strided BasicBlock to a 512-channel stride-32 code. The narrow
    stride-32 code is what keeps the decoder from copying anomalous teacher features straight through."""

    def __init__(self, channels: tuple[int, int, int], width: int):
        super().__init__()
        self.align = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for c in channels)
        self.bottleneck = BasicBlock(3 * width, 512, stride=2)
        kaiming_init(self)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[-1].shape[-2:]
        fused = cat_channels([_pool_to(a(f), size) for a, f in zip(self.align, feats)])
        return self.bottleneck(fused)


def _pool_to(x: torch.Tensor, size) -> torch.Tensor:
    """Average-pool ``x`` to ``size``: a fixed k x k pooling where the sizes divide (always, for image sizes
    that are multiples of 32; the same function as adaptive pooling, and ONNX-exportable with a dynamic batch
    axis, which adaptive pooling is not), else adaptive pooling."""
    h, w = int(x.shape[-2]), int(x.shape[-1])  # plain ints: the exporter sees constant kernel sizes
    sh, sw = int(size[0]), int(size[1])
    if h % sh or w % sw:
        return F.adaptive_avg_pool2d(x, (sh, sw))
    return x if (h, w) == (sh, sw) else F.avg_pool2d(x, (h // sh, w // sw))


class StudentDecoder(nn.Module):
    def __init__(self, channels: tuple[int, int, int], width: int):
        super().__init__()
        self.fusion = ScaleFusion(channels, width)
        self.decoder = Decoder(channels)

    def forward(self, teacher_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.fusion(teacher_feats), [f.shape[-2:] for f in teacher_feats])


class ScaleGate(nn.Module):
    """Per-pixel weights over the scales from the three cosine-distance maps (softmax, times 3 so that
    equal weights leave the features unchanged)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, 3, 1))
        nn.init.zeros_(self.net[-1].weight)  # start from equal weights
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        return 3 * torch.softmax(self.net(distances), dim=1)


@register_model
class TESD(SegmentationGuidedModel):
    name = "tesd"
    Config = TESDConfig
    published = {"source": "PFADSeg abstract (a different model), MVTec mean", "i_auroc": 0.989, "p_ap": 0.764,
                 "iap": 0.787}
    student_reads_teacher = True
    # cpu (the default on a CPU): DeSTSeg's narrow segmentation stage (48 channels, docs/RESULTS.md); the student
    # decoder keeps the teacher's widths. cpu-wide: the paper's segmentation width at the cpu schedule's steps.
    schedules = {"cpu": narrow_cpu_schedule, "cpu-wide": cpu_schedule}
    # int8 is not its default: within 0.35 of fp32 on every bottle mean (3 seeds), but 3.9 points lower I-AUROC on
    # screw, for 1.16x the speed of fp32 end to end under the AVX2 cap (docs/RESULTS.md)

    def __init__(self, config: TESDConfig, teacher_weights=None, pretrained: bool = True):
        super().__init__(config)
        self.teacher = Teacher(config.teacher, teacher_weights, pretrained)
        channels = self.teacher.channels
        self.student = StudentDecoder(channels, config.fusion_width)
        self.gate = ScaleGate()
        self.segmentation = SegmentationNet(sum(channels), config.seg_width)

    def student_module(self) -> nn.Module:
        return self.student

    def student_features(self, x, teacher_feats=None):
        if teacher_feats is None:
            teacher_feats = self.teacher(x)
        return self.student(teacher_feats)

    def segmentation_input(self, t, s):
        size = t[0].shape[-2:]
        distances = torch.cat([resize(a, size) for a in cosine_distance_maps(t, s)], dim=1)
        weights = self.gate(distances)
        products = [resize(-(tk * sk), size) * weights[:, k:k + 1] for k, (tk, sk) in enumerate(zip(t, s))]
        return cat_channels(products)

    def extra_segmentation_parameters(self):
        return list(self.gate.parameters())

    def extra_segmentation_modules(self):
        return [self.gate]
