"""The models, each one file that registers itself (see :mod:`destseg.models.base` for the contract)."""

from __future__ import annotations

from destseg.models.backbones import BACKBONES, Teacher, build_backbone
from destseg.models.base import (
    MODELS, AnomalyModel, ModelConfig, Stage, build_model, check_config, flag_of, model_class, model_config, option,
    register_model,
)
from destseg.models.destseg import DeSTSeg, DeSTSegConfig
from destseg.models.stfpm import STFPM, STFPMConfig
from destseg.models.tesd import TESD, TESDConfig

DEFAULT_MODEL = DeSTSeg.name

__all__ = ["BACKBONES", "DEFAULT_MODEL", "MODELS", "AnomalyModel", "DeSTSeg", "DeSTSegConfig", "ModelConfig", "STFPM",
           "STFPMConfig", "Stage", "TESD", "TESDConfig", "Teacher", "build_backbone", "build_model", "check_config",
           "flag_of", "model_class", "model_config", "option", "register_model"]
