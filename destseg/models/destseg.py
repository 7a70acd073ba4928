"""DeSTSeg (Zhang et al., CVPR 2023): segmentation-guided denoising student-teacher.

Teacher: frozen ImageNet backbone. Student: a randomly initialised ResNet18 encoder (through layer4) and a
decoder that mirrors the teacher's channels, trained on corrupted images to output the teacher's features
of the clean image. Segmentation network: fuses the per-scale teacher-student products into a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from destseg.models.backbones import ResNet18, Teacher, build_backbone
from destseg.models.common import Decoder, SegmentationGuidedModel, SegmentationNet


@dataclass
class DeSTSegConfig:
    """Paper values (SPEC "DeSTSeg model") as defaults."""

    teacher: str = "resnet18"
    image_size: int | tuple[int, int] = 256  # S (square) or (height, width)
    batch_size: int = 32
    steps: int = 5000  # total, both stages
    student_steps: int = 1000
    lr_student: float = 0.4
    lr_res: float = 0.1
    lr_head: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    focal_gamma: float = 4.0
    top_k: int = 100
    seg_width: int = 256  # channels of the segmentation network (paper: 256; 128 is ~3x cheaper, see RESULTS)
    # Table 4 ablations: denoising input, encoder-decoder student, segmentation network.
    denoising: bool = True
    student_arch: str = "encoder_decoder"  # or "identical": the teacher's architecture, random init
    segmentation: bool = True


class DeSTSegStudent(nn.Module):
    def __init__(self, channels: tuple[int, int, int]):
        super().__init__()
        self.encoder = ResNet18(zero_init_residual=True)
        del self.encoder.avgpool, self.encoder.fc
        self.decoder = Decoder(channels)

    def forward(self, x, sizes) -> list[torch.Tensor]:
        return self.decoder(self.encoder.layer4(self.encoder.features(x)[-1]), sizes)


class DeSTSeg(SegmentationGuidedModel):
    def __init__(self, config: DeSTSegConfig, teacher_weights=None, pretrained: bool = True):
        super().__init__(config)
        self.teacher = Teacher(config.teacher, teacher_weights, pretrained)
        channels = self.teacher.channels
        if config.student_arch == "encoder_decoder":
            self.student = DeSTSegStudent(channels)
        elif config.student_arch == "identical":
            self.student = build_backbone(config.teacher, pretrained=False, features_only=True)
        else:
            raise ValueError(f"student_arch must be 'encoder_decoder' or 'identical', not {config.student_arch!r}")
        self.segmentation = SegmentationNet(sum(channels), config.seg_width) if config.segmentation else None

    def student_module(self) -> nn.Module:
        return self.student

    def student_features(self, x, teacher_feats=None):
        if self.config.student_arch == "identical":
            return self.student(x)
        # The decoder's output sizes are the teacher's: strides 4, 8, 16 of the input.
        h, w = x.shape[-2:]
        sizes = [(-(-h // s), -(-w // s)) for s in (4, 8, 16)]
        return self.student(x, sizes)
