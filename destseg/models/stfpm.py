"""STFPM (Wang et al., BMVC 2021): student-teacher feature pyramid matching.

Teacher and student share the architecture (student randomly initialised); the student learns the
teacher's normalised features of normal images on three scales. Anomaly map: product over scales of the
squared feature distance; image score: the map's maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from destseg.models.backbones import Teacher, build_backbone
from destseg.models.base import AnomalyModel, ModelConfig, Stage, option, register_model
from destseg.models.common import CPU_TEACHER, l2_normalize, resize


@dataclass
class STFPMConfig(ModelConfig):
    """docs/REFERENCE.md, "STFPM baseline" values as defaults."""

    epochs: int = option(100, "training epochs", lambda v: v >= 1, "at least 1")
    lr: float = option(0.4, "learning rate", lambda v: v > 0 and v == v, "positive")
    val_split: float = option(0.2, "held-out share of the train images for checkpoint selection (0: keep the "
                                    "last weights)", lambda v: 0 <= v < 1, "in [0, 1)")
    # "mean": the official loss, averaged over the batch; "sum": anomalib's, 0.5 x summed over the batch
    # (B/2 times larger updates at the same learning rate).
    batch_reduction: str = option("mean", "loss over the batch: mean (official code) or 0.5 x sum (anomalib)",
                                  lambda v: v in ("mean", "sum"), "mean or sum", choices=["mean", "sum"])
    # Neither the official code nor anomalib augments STFPM.
    category_rotation: bool = option(False, "train with the category's rotation (the paper's) augmentation", flag=None)

    @property
    def validation_share(self) -> float:
        return self.val_split


def cpu_schedule(n_train: int) -> tuple[dict, str]:
    return ({"teacher": CPU_TEACHER, "batch_size": 16},
            f"cpu schedule: {CPU_TEACHER} teacher, batch 16, the paper's 100 epochs")


def feature_distances(t: list[torch.Tensor], s: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per scale sum over channels of (t^ - s^)^2, shape (N, H_k, W_k)."""
    return [((l2_normalize(tk) - l2_normalize(sk)) ** 2).sum(dim=1) for tk, sk in zip(t, s)]


@register_model
class STFPM(AnomalyModel):
    name = "stfpm"
    Config = STFPMConfig
    published = {"source": "STFPM official code, ResNet18, MVTec mean", "i_auroc": 0.955, "p_auroc": 0.970}
    schedules = {"cpu": cpu_schedule}

    def __init__(self, config: STFPMConfig, teacher_weights=None, pretrained: bool = True):
        super().__init__(config)
        self.teacher = Teacher(config.teacher, teacher_weights, pretrained)
        self.student = build_backbone(config.teacher, pretrained=False, features_only=True)

    def stages(self, n_train: int) -> list[Stage]:
        c = self.config
        steps_per_epoch = -(-n_train // c.batch_size)
        return [Stage("student", c.epochs * steps_per_epoch, [{"params": list(self.student.parameters()),
                                                               "lr": c.lr}], [self.student],
                      needs_synthesis=False, validate_every=steps_per_epoch, sums_batch=c.batch_reduction == "sum")]

    def training_loss(self, stage: str, batch: dict) -> torch.Tensor:
        image = batch["image"]
        with torch.no_grad():
            t = self.teacher(image)
        per_image = sum(d.mean(dim=(1, 2)) for d in feature_distances(t, self.student(image)))
        return per_image.mean() if self.config.batch_reduction == "mean" else 0.5 * per_image.sum()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        d = feature_distances(self.teacher(x), self.student(x))
        size64 = d[0].shape[-2:]
        product = torch.stack([resize(dk[:, None], size64)[:, 0] for dk in d], dim=1).prod(dim=1)
        anomaly_map = resize(product[:, None], x.shape[-2:])[:, 0].float()
        return {"map": anomaly_map, "score": anomaly_map.flatten(1).amax(dim=1)}
