"""The model contract and the registry: what a model file provides, and how the rest of the library finds it.

A model is one file that defines a config dataclass (each field an :func:`option`: default, help text, check)
and an :class:`AnomalyModel` subclass decorated with :func:`register_model`. From those alone the library
derives the command-line flags, the config checks, the schedules, the benchmark tables and the training
loop's work; nothing outside ``destseg/models/`` names a particular model. docs/ARCHITECTURE.md shows how
to add one (``tests/test_model_contract.py`` is the worked example).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from destseg.models.backbones import BACKBONES


def option(default, help: str, check: Callable | None = None, rule: str = "", flag: str | None = "", **cli):
    """A config field: its default, help text and check (``check(value)`` is true for a valid value,
    ``rule`` says what valid is). ``flag``: the command-line flag ("" derives ``--field-name``; None: no
    flag, the field is set by schedules and JSON files only); ``cli``: argparse settings (``choices``,
    ``const`` for a flag that stores a fixed value, ``nargs``, ``metavar``, ``parse`` to convert the parsed
    value)."""
    return field(default=default, metadata={"help": help, "check": check, "rule": rule, "flag": flag, "cli": cli})


def flag_of(f: dataclasses.Field) -> str | None:
    """The command-line flag of config field ``f`` (None when it has none)."""
    flag = f.metadata.get("flag", "")
    return "--" + f.name.replace("_", "-") if flag == "" else flag


def _valid_size(v) -> bool:
    sides = [v] if isinstance(v, int) else list(v) if isinstance(v, (list, tuple)) and len(v) == 2 else []
    return bool(sides) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 and s % 32 == 0
                               for s in sides)


def _image_size(values: list[int]):
    from destseg.errors import DestsegError

    if len(values) > 2:
        raise DestsegError(f"--image-size takes one size or a height and a width, not {len(values)} numbers")
    return values[0] if len(values) == 1 else list(values)


@dataclass
class ModelConfig:
    """Fields every model has. A model's config dataclass extends it; paper values are the defaults."""

    teacher: str = option("resnet18", "teacher backbone (the paper: resnet18)",
                          lambda v: v in BACKBONES, f"one of {', '.join(BACKBONES)}", choices=list(BACKBONES))
    image_size: int | tuple[int, int] = option(
        256, "model input size: S (square) or H W, multiples of 32 (default 256)", _valid_size,
        "one size or a (height, width) pair, each a multiple of 32, at least 32",
        nargs="+", metavar="SIZE", type=int, parse=_image_size)
    batch_size: int = option(32, "images per training step (global under torchrun)", lambda v: v >= 1, "at least 1")
    momentum: float = option(0.9, "SGD momentum", lambda v: 0 <= v < 1, "in [0, 1)", flag=None)
    weight_decay: float = option(1e-4, "SGD weight decay", lambda v: v >= 0, "0 or more")
    category_rotation: bool = option(True, "train with the category's rotation (the paper's) augmentation", flag=None)

    @property
    def validation_share(self) -> float:
        """Share of the training images the model keeps aside to pick its best weights (0: none)."""
        return 0.0

    def check(self, explicit: frozenset[str] = frozenset()) -> "ModelConfig":
        """Rules between fields (``explicit``: the fields the user set); returns the config to use."""
        return self


def check_config(config: ModelConfig, explicit=frozenset()) -> ModelConfig:
    """Refuse values that cannot train (ValueError naming the flag, or the field where it has none);
    returns the config after its own cross-field rules (:meth:`ModelConfig.check`)."""
    for f in dataclasses.fields(config):
        check, value = f.metadata.get("check"), getattr(config, f.name)
        if check is not None and value is not None and not _passes(check, value):
            settable = flag_of(f) and "const" not in f.metadata["cli"]  # a value the flag itself can carry
            where = flag_of(f) if settable else f"config field '{f.name}'"
            raise ValueError(f"{where} must be {f.metadata['rule']} (got {value!r})")
    return config.check(frozenset(explicit))


def _passes(check, value) -> bool:
    try:
        return bool(check(value))
    except TypeError:  # a value of the wrong type (a string from a JSON schedule file...)
        return False


@dataclass
class Stage:
    """One phase of training: which parameters learn, at what rates, for how many steps, and what the
    training loop must know about it."""

    name: str
    steps: int
    param_groups: list[dict]
    train_modules: list[nn.Module]
    needs_synthesis: bool = True  # batches carry ``augmented`` images and ``mask``s
    sums_batch: bool = False  # the loss sums over the batch: scaled by the world size under torchrun
    validate_every: int | None = None  # keep the weights with the lowest mean map on validation images
    min_batch: int = 1  # images per process and step the stage needs (BatchNorm over one value per image)
    lr_decay: str = "none"  # none: constant learning rates; cosine: from the groups' rates down to 0 over the stage
    batch_size: int | None = None  # images per step (global under torchrun); None: the config's batch_size

    def lr_factor(self, step: int) -> float:
        """The factor of the groups' learning rates at ``step`` (0-based) of the stage."""
        return 0.5 * (1 + math.cos(math.pi * step / self.steps)) if self.lr_decay == "cosine" else 1.0

    def freeze_others(self, model: nn.Module) -> None:
        """Only this stage's parameters take gradients."""
        trainable = {id(p) for g in self.param_groups for p in g["params"]}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)

    def train_mode(self, model: nn.Module) -> None:
        """Training mode for the modules this stage trains, eval mode (fixed BatchNorm statistics) elsewhere."""
        model.eval()
        for m in self.train_modules:
            m.train()


class AnomalyModel(nn.Module):
    """What every model provides. Class attributes: ``name`` (its ``--model`` value), ``Config`` (its config
    dataclass), ``published`` (reference numbers: ``source`` and metric fractions), ``schedules``
    (``{"cpu": fn(n_train) -> (config overrides, description)}``; ``paper`` is the config's defaults),
    ``int8_by_default`` (whether ``--precision auto`` may run it in int8 on a CPU without native bf16: only
    where int8's accuracy was measured to match fp32's).
    Instances: ``stages(n_train)``, ``training_loss(stage, batch)`` and ``forward(x)`` -> ``{"map": (N, H, W),
    "score": (N,), ...}``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    published: ClassVar[dict] = {}
    schedules: ClassVar[dict[str, Callable[[int], tuple[dict, str]]]] = {}
    int8_by_default: ClassVar[bool] = False

    def __init__(self, config):
        super().__init__()
        self.config = config

    def stages(self, n_train: int) -> list[Stage]:
        raise NotImplementedError

    def training_loss(self, stage: str, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    @property
    def map_outputs(self) -> dict[str, tuple[str, str]]:
        """The (map, score) output pairs evaluated by ``destseg test``, by metric prefix ("" for the
        anomaly map itself, e.g. "dest_" for a secondary map)."""
        return {"": ("map", "score")}


MODELS: dict[str, type[AnomalyModel]] = {}


def register_model(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    """Class decorator: make ``cls`` available as ``--model cls.name`` everywhere."""
    if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
        raise TypeError(f"{cls!r} is not an AnomalyModel subclass")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)) or not issubclass(cls.Config, ModelConfig):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass extending ModelConfig")
    MODELS[cls.name] = cls
    return cls


def model_class(name: str) -> type[AnomalyModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    return MODELS[name]


def model_config(name: str, explicit=frozenset(), **overrides) -> ModelConfig:
    """The config of model ``name`` with its defaults, fields overridden by keyword (None = keep), checked
    with :func:`check_config`."""
    cls = model_class(name).Config
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = {k for k, v in overrides.items() if v is not None} - known
    if unknown:
        raise ValueError(f"model '{name}' has no option(s) {', '.join(sorted(unknown))}")
    return check_config(cls(**{k: v for k, v in overrides.items() if v is not None}), explicit)


def build_model(name: str, config, teacher_weights=None, pretrained: bool = True) -> AnomalyModel:
    return model_class(name)(config, teacher_weights=teacher_weights, pretrained=pretrained)
