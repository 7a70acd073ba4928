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
    """The config dataclass of ``name`` with paper defaults, fields overridden by keyword (None = keep)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    cls = MODELS[name][0]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = {k for k, v in overrides.items() if v is not None} - known
    if unknown:
        raise ValueError(f"model '{name}' has no option(s) {', '.join(sorted(unknown))}")
    return cls(**{k: v for k, v in overrides.items() if v is not None})


def build_model(name: str, config, teacher_weights=None, pretrained: bool = True):
    return MODELS[name][1](config, teacher_weights=teacher_weights, pretrained=pretrained)


__all__ = ["BACKBONES", "MODELS", "DeSTSeg", "DeSTSegConfig", "STFPM", "STFPMConfig", "TESD", "TESDConfig",
           "Teacher", "build_backbone", "build_model", "model_config"]
