"""A run directory: its typed config, checkpoint, thresholds and metrics, and its model loaded for inference.

Every inference path (test, predict, serve, export, OpenVINO, the Python API) reads a run through
:class:`Run`; this module imports nothing from training. Layout::

    RUN/config.json      model name and config, data source, training options, what the library resolved
    RUN/checkpoint.pt    the one self-describing checkpoint (latest state; final weights when finished)
    RUN/train.log        one JSON line per logged step
    RUN/thresholds.json  decision thresholds (destseg.thresholds); RUN/thresholds-history/ the earlier ones
    RUN/calibration.json the good images the thresholds were set on: their scores and largest map values
    RUN/engines/         the thresholds and calibration scores of each other engine that decides (int8...)
    RUN/feedback/        images a person marked as false alarms or missed defects (destseg.feedback)
    RUN/metrics.json     the metrics of ``destseg test``
    RUN/openvino/        the OpenVINO IR, exported on first use
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import cached_property
from pathlib import Path

from destseg import __version__
from destseg.checkpoint import atomic_write_text, load_checkpoint
from destseg.data.datasets import DataSource
from destseg.device import resolve_device
from destseg.errors import DestsegError
from destseg.models import MODELS, ModelConfig, build_model, model_config
from destseg.models.common import fold_batchnorm
from destseg.thresholds import good_image_thresholds, map_peaks, read_thresholds, write_thresholds

# A run whose training was cut (``--time-budget``) below this share of its planned steps is called
# undertrained by ``destseg test`` and its report.
UNDERTRAINED_FRACTION = 0.5

RUN_FILES = ("checkpoint.pt", "train.log", "metrics.json", "thresholds.json", "config.json", "calibration.json")
RUN_DIRS = ("thresholds-history", "feedback", "engines")  # results of a run's use, removed with it by --overwrite


class Run:
    """``Run(path)``: the run directory at ``path`` (it need not exist yet, for training)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    # -- config.json
    @cached_property
    def record(self) -> dict:
        """config.json as written: model, config, data, options, resolved."""
        path = self.path / "config.json"
        if not path.is_file():
            raise DestsegError(f"{self.path}: not a run directory (no config.json)")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DestsegError(f"{path}: invalid JSON ({exc})") from None

    @property
    def model_name(self) -> str:
        return self.record["model"]

    @cached_property
    def config(self) -> ModelConfig:
        """The model's config dataclass, as trained."""
        return typed_config(self.model_name, self.record["config"], self.path / "config.json")

    @property
    def data(self) -> DataSource | None:
        return DataSource(**self.record["data"]) if self.record.get("data") else None

    def write_config(self, model_name: str, config, data: DataSource | None, options: dict,
                     resolved: dict | None = None) -> None:
        """config.json. ``resolved``: what the options left to the library and what it chose."""
        payload = {"library_version": __version__, "model": model_name, "config": dataclasses.asdict(config),
                   "data": dataclasses.asdict(data) if data else None, "options": options,
                   "resolved": resolved or {}}
        atomic_write_text(self.path / "config.json", json.dumps(payload, indent=2) + "\n")
        self.__dict__.pop("record", None)
        self.__dict__.pop("config", None)

    def update_record(self, **fields) -> None:
        """Add or replace top-level entries of config.json (e.g. ``training``: what was trained)."""
        record = {**self.record, **fields}
        atomic_write_text(self.path / "config.json", json.dumps(record, indent=2) + "\n")
        self.__dict__.pop("record", None)

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Existing results are never replaced unless asked: ``resume`` continues, ``overwrite`` starts anew."""
        if resume:
            if not self.checkpoint_path.is_file():
                raise DestsegError(f"{self.path}: nothing to resume (no checkpoint.pt)")
            return
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise DestsegError(f"{self.path}: run directory exists and is not empty; pass --resume to "
                                   "continue it or --overwrite to replace it")
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                shutil.rmtree(self.path / name, ignore_errors=True)

    # -- checkpoint and model
    def checkpoint(self, expected_model: str | None = None) -> dict:
        return load_checkpoint(self.checkpoint_path, expected_model)

    def load_model(self, device: str = "cpu", fold_bn: bool = True):
        """(model in eval mode on ``device``, checkpoint dict): see :func:`load_model`."""
        return load_model(self.checkpoint_path, device, fold_bn)

    # -- thresholds and metrics
    def thresholds(self) -> dict | None:
        return read_thresholds(self.path)

    def write_thresholds(self, thresholds: dict) -> dict:
        return write_thresholds(self.path, thresholds)

    def calibration(self) -> dict | None:
        """RUN/calibration.json: ``files``, ``scores`` and ``peaks`` (largest map value) of the good images
        the thresholds were set on, and ``what`` they are; None for a run written before it existed."""
        path = self.path / "calibration.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DestsegError(f"{path}: invalid JSON ({exc})") from None

    def calibrate(self, files, scores, maps, fpr: float, what: str, unseen: bool = True) -> dict:
        """Good-image thresholds (:func:`destseg.thresholds.good_image_thresholds`) from the scores and maps
        of the good images ``files``, which are kept in RUN/calibration.json (for recalibration and the
        drift check); the caller writes the thresholds. ``unseen``: the images were not used for training (else
        no false-positive bound is stated)."""
        peaks = map_peaks(maps)
        payload = {"what": what, "unseen": unseen, "files": [str(f) for f in files],
                   "scores": [float(s) for s in scores], "peaks": [float(p) for p in peaks]}
        atomic_write_text(self.path / "calibration.json", json.dumps(payload) + "\n")
        return good_image_thresholds(scores, peaks, fpr, what, unseen)

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_text(self.path / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def calibration_unseen(calibration: dict) -> bool:
    """Whether the good images of a calibration record were kept out of training (its ``unseen``; a record
    written before that field existed says it in words: "(seen in training)")."""
    return bool(calibration.get("unseen", "seen in training" not in calibration.get("what", "")))


def typed_config(model_name: str, fields: dict, where) -> ModelConfig:
    """A run's saved config fields as the model's config dataclass (fields added since it was written
    take their defaults); a clear error when they no longer fit."""
    if model_name not in MODELS:
        raise DestsegError(f"{where}: unknown model '{model_name}' (known: {', '.join(MODELS)}; a model from a "
                           "plugin must be imported before its runs are loaded)")
    try:
        return model_config(model_name, **fields)
    except (TypeError, ValueError) as exc:
        raise DestsegError(f"{where}: config does not fit model '{model_name}' of destseg {__version__} "
                           f"({exc})") from None


def load_model(path: Path | str, device: str = "cpu", fold_bn: bool = True):
    """(model in eval mode, checkpoint dict) of a finished or partial run directory or checkpoint file.
    ``fold_bn`` folds the batch norms into the convolutions (same outputs, 15-20% faster inference; the model
    can no longer train)."""
    path = Path(path)
    path = path / "checkpoint.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    config = typed_config(ckpt["model"], ckpt["config"], path)
    model = build_model(ckpt["model"], config, pretrained=False)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise DestsegError(f"{path}: weights do not fit model '{ckpt['model']}' ({str(exc).splitlines()[0]})") from None
    dev = resolve_device(device)
    model.eval()
    if fold_bn:
        fold_batchnorm(model)
    return model.to(dev), ckpt


def training_summary(ckpt: dict) -> dict:
    """What was trained, from a checkpoint: ``steps_planned``, ``steps_trained`` (totals), ``stages`` (name,
    planned, trained each), and ``undertrained`` (cut below ``UNDERTRAINED_FRACTION`` of the plan)."""
    stages = ckpt.get("stages")
    if not stages:  # written before per-stage counts were kept: the step counter, which a cut filled up
        cuts = ckpt.get("time_budget_cuts") or {}
        return {"steps_planned": ckpt["step"], "steps_trained": None if cuts else ckpt["step"], "stages": None,
                "undertrained": None, "training_note": "written by an earlier destseg: steps trained per stage not recorded"
                + (f"; stages cut by the time budget: {', '.join(cuts)}" if cuts else "")}
    planned = sum(s["planned"] for s in stages)
    trained = sum(s["trained"] for s in stages)
    return {"steps_planned": planned, "steps_trained": trained, "stages": stages,
            "undertrained": trained < UNDERTRAINED_FRACTION * planned}

