"""Model registry: name -> (config dataclass, module class)."""

from __future__ import annotations

import dataclasses

from destseg.models.backbones import BACKBONES, Teacher, build_backbone
from destseg.models.destseg import DeSTSeg, DeSTSegConfig
from destseg.models.stfpm import STFPM, STFPMConfig
from destseg.models.tesd import TESD, TESDConfig

MODELS = {
    "destseg": (DeSTSegConfig, DeSTSeg),
    "stfpm": (STFPMConfig, STFPM),
    "tesd": (TESDConfig, TESD),
}


def model_config(name: str, **overrides):
    """The config dataclass of ``name`` with paper defaults, fields overridden by keyword (None = keep);
    checked with :func:`check_config`."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    cls = MODELS[name][0]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = {k for k, v in overrides.items() if v is not None} - known
    if unknown:
        raise ValueError(f"model '{name}' has no option(s) {', '.join(sorted(unknown))}")
    return check_config(cls(**{k: v for k, v in overrides.items() if v is not None}))


def has_segmentation_stage(config) -> bool:
    return getattr(config, "segmentation", False) or isinstance(config, TESDConfig)


def _valid_size(v) -> bool:
    sides = [v] if isinstance(v, int) else list(v) if isinstance(v, (list, tuple)) and len(v) == 2 else []
    return bool(sides) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 and s % 32 == 0
                               for s in sides)


def check_config(config):
    """Refuse values that cannot train (ValueError naming the command-line flag); returns ``config``."""
    def bad(field, rule):
        flag = "--" + field.replace("_", "-")
        raise ValueError(f"{flag} must be {rule} (got {getattr(config, field)!r})")

    def need(field, ok, rule):
        value = getattr(config, field, None)
        if value is not None and not ok(value):
            bad(field, rule)

    if config.teacher not in BACKBONES:
        raise ValueError(f"--teacher must be one of {', '.join(BACKBONES)} (got {config.teacher!r})")
    need("image_size", _valid_size, "one size or a (height, width) pair, each a multiple of 32, at least 32")
    need("batch_size", lambda v: v >= 1, "at least 1")
    need("epochs", lambda v: v >= 1, "at least 1")
    need("student_steps", lambda v: v >= 1, "at least 1")
    for field in ("lr", "lr_student", "lr_res", "lr_head"):
        need(field, lambda v: v > 0 and v == v, "positive")
    need("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    need("weight_decay", lambda v: v >= 0, "0 or more")
    need("focal_gamma", lambda v: v >= 0, "0 or more")
    need("top_k", lambda v: v >= 1, "at least 1")
    need("seg_width", lambda v: v >= 8, "at least 8")
    need("val_split", lambda v: 0 <= v < 1, "in [0, 1)")
    if hasattr(config, "steps"):
        if has_segmentation_stage(config) and config.steps <= config.student_steps:
            bad("steps", f"larger than --student-steps ({config.student_steps}): the segmentation network "
                         "trains for steps - student_steps")
        need("steps", lambda v: v >= config.student_steps, f"at least --student-steps ({config.student_steps})")
    return config


def build_model(name: str, config, teacher_weights=None, pretrained: bool = True):
    return MODELS[name][1](config, teacher_weights=teacher_weights, pretrained=pretrained)


__all__ = ["BACKBONES", "MODELS", "check_config", "has_segmentation_stage", "DeSTSeg", "DeSTSegConfig", "STFPM", "STFPMConfig", "TESD", "TESDConfig",
           "Teacher", "build_backbone", "build_model", "model_config"]
