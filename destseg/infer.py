"""Inference on a trained run: the test-split evaluation behind ``destseg test`` and the :class:`Detector` API.
Reads runs through :class:`destseg.run.Run`; nothing here imports training."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from destseg.data.datasets import DataSource, TestDataset
from destseg.data.images import resize_map, resize_rgb, to_rgb
from destseg.device import CompiledModel, autocast, autocast_dtype, io_workers, resolve_device, should_compile
from destseg.errors import DestsegError
from destseg.metrics import METRIC_NAMES, evaluate, f1_max_threshold, format_table, pixel_ranking
from destseg.models import ModelConfig
from destseg.models.backbones import backbone_spec
from destseg.run import Run, training_summary
from destseg.scoring import TestOutputs, run_test_split
from destseg.thresholds import in_force

__all__ = ["Detector", "InferenceModel", "Prediction", "TestOutputs", "evaluate_run", "load_inference",
           "metrics_table"]


@dataclass
class InferenceModel:
    """A run's model ready for inference, with what its callers need to know about it."""

    model: object  # callable: normalised images (N, 3, H, W) -> {"map", "score", ...}
    run: Run
    config: ModelConfig
    model_name: str
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype (None: fp32)
    precision: str  # in words: fp32, bf16, openvino f32...
    ckpt: dict  # the checkpoint (model_state dropped)
    backend: str  # the engine that runs it: torch or openvino

    @property
    def map_outputs(self) -> dict[str, tuple[str, str]]:
        return getattr(self.model, "map_outputs", {"": ("map", "score")})


def resolve_backend(backend: str, device: str, compile: str = "auto", precision: str = "auto") -> str:
    """``auto``: OpenVINO on a CPU when the package is installed (the faster CPU engine, docs/BENCHMARKS.md),
    else PyTorch; PyTorch on a GPU and whenever ``--compile on`` asks for torch.compile. ``--precision int8``
    is OpenVINO's."""
    if backend not in ("auto", "torch", "openvino"):
        raise DestsegError(f"--backend must be auto, torch or openvino (got {backend!r})")
    if precision == "int8":
        if backend == "torch":
            raise DestsegError("--precision int8 runs on the OpenVINO backend (--backend openvino or auto)")
        return "openvino"
    if backend != "auto":
        return backend
    if compile == "on" or resolve_device(device).type != "cpu":
        return "torch"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "torch"
    return "openvino"


def _last_line(exc: BaseException) -> str:
    """The last line of an engine's error (OpenVINO's and NNCF's run to pages), or its type where it has none."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def load_inference(run_dir, device: str = "auto", precision: str = "auto", backend: str = "auto",
                   compile: str = "auto") -> InferenceModel:
    """A run's model for inference with ``backend``: ``torch`` (batch norms folded, channels_last on CPU;
    ``compile``: auto|on|off, see :func:`destseg.device.should_compile`), ``openvino`` (CPU, the run's
    cached IR) or ``auto`` (:func:`resolve_backend`; a model OpenVINO cannot take runs in PyTorch, with a
    warning). ``precision`` auto on OpenVINO: int8 where :func:`destseg.openvino_ir.auto_int8` says so (a CPU
    without native bf16), bf16 where the CPU runs it natively, else fp32."""
    run = Run(run_dir)
    chosen = resolve_backend(backend, device, compile, precision)
    if chosen == "openvino":
        from destseg.openvino_ir import OpenVINOModel, auto_int8, run_ir

        if device not in ("auto", "cpu"):
            raise DestsegError(f"--backend openvino runs on the CPU, not --device {device}")
        ckpt = run.checkpoint()  # a missing or corrupt run is said as such, whatever the engine
        model = None
        if precision == "auto" and auto_int8(run.path, ckpt["model"]):
            try:
                model = OpenVINOModel(run_ir(run.path, int8=True), "int8")
            except Exception as exc:  # NNCF's errors have no common class; int8 was not asked for: fp32 instead
                warnings.warn(f"int8 could not be made for this run ({_last_line(exc)}); "
                              "running it in fp32", stacklevel=2)
        if model is None:
            try:
                model = OpenVINOModel(run_ir(run.path, int8=precision == "int8"), precision)
            except (DestsegError, RuntimeError) as exc:  # export, conversion, or compilation for this CPU
                if backend == "openvino" or precision == "int8":  # asked for: no fallback
                    if isinstance(exc, DestsegError):
                        raise
                    raise DestsegError(f"{run.path}: OpenVINO could not run it "
                                       f"({_last_line(exc)})") from exc
                warnings.warn(f"OpenVINO could not take this run ({_last_line(exc)}); running it "
                              "in PyTorch", stacklevel=2)
                return load_inference(run_dir, device, precision, "torch", compile)
        return InferenceModel(model, run, run.config, ckpt["model"], torch.device("cpu"), None,
                              f"openvino {model.precision}", _light(ckpt), "openvino")
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    model, ckpt = run.load_model(str(dev))
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    if should_compile(compile, dev):
        model = CompiledModel(model)
    return InferenceModel(model, run, model.config, ckpt["model"], dev, dtype, "fp32" if dtype is None else "bf16",
                          _light(ckpt), "torch")


def _light(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt.items() if k not in ("model_state", "optimizer_state")}


def evaluate_run(run_dir: Path | str, data: DataSource | None = None, device: str = "auto",
                 precision: str = "auto", batch_size: int = 16, progress: bool = True, fpr: float = 0.01,
                 report: bool = False, backend: str = "auto", compile: str = "auto", workers: int = -1) -> dict:
    """Evaluate a run on its test split; writes RUN/metrics.json and RUN/thresholds.json (and
    RUN/report.html with ``report``). Thresholds: F1-max on the test split, or, when it has no defect
    images, the split-conformal thresholds of its good images at false-positive rate ``fpr``.
    ``workers``: DataLoader workers (-1: :func:`destseg.device.io_workers`)."""
    run = Run(run_dir)
    if workers < -1:
        raise DestsegError(f"--workers must be -1 (automatic) or more (got {workers})")
    if data is None:
        data = run.data
        if data is None:
            raise DestsegError(f"{run.path}: the run does not record its data; pass --data and --category")
    index = data.scan()
    if not index.test:
        raise DestsegError(f"{index.name}: the test split has no images")
    inf = load_inference(run.path, device, precision, backend, compile)
    dataset = TestDataset(index.test, inf.config.image_size, backbone_spec(inf.config.teacher).normalize)
    t0 = time.perf_counter()
    out = run_test_split(inf.model, dataset, inf.device, inf.dtype, inf.map_outputs, batch_size, progress,
                         io_workers(inf.device) if workers < 0 else workers)
    wall = time.perf_counter() - t0
    result = {"model": inf.model_name, "teacher": inf.config.teacher, **training_summary(inf.ckpt),
              "n_test": len(dataset), "backend": inf.backend, "precision": inf.precision, "device": str(inf.device),
              "images_per_s": len(dataset) / max(wall, 1e-9),  # end to end: reading, decoding, resizing too
              "model_images_per_s": len(dataset) / max(out.seconds, 1e-9)}
    if out.labels.any() and out.masks.any():
        result.update(_metrics(out, inf.device))
        thresholds = result.pop("_thresholds")
    else:
        result["note"] = "no defect images with masks in the test split: metrics skipped"
        thresholds = run.calibrate([s.path for s in index.test], out.scores, out.maps, fpr, "good test images")
    result["thresholds"] = thresholds
    run.write_metrics(result)
    run.write_thresholds(thresholds)
    if report:
        from destseg.report import write_report

        write_report(run.path / "report.html", result, out, index.test, dataset.size)
    result["_outputs"] = out
    return result


def _metrics(out: TestOutputs, device: torch.device) -> dict:
    """The SPEC metrics of the anomaly map and of each secondary map (by prefix), the F1-max thresholds on
    the labelled split (``_thresholds``), and the time the metrics took (``metrics_s``)."""
    t1 = time.perf_counter()
    sort_on = device if device.type == "cuda" else None  # the pixel sort is the costly part: on the GPU if any
    ranking = pixel_ranking(out.maps, out.masks, sort_on)  # one sort of all pixels: metrics and threshold
    result = evaluate(out.maps, out.masks, out.labels, out.scores, ranking)
    for prefix, (maps, scores) in out.extra.items():
        result.update({prefix + k: v for k, v in evaluate(maps, out.masks, out.labels, scores, device=sort_on).items()})
    image_thr, image_f1 = f1_max_threshold(out.scores, out.labels)
    pixel_thr, pixel_f1 = f1_max_threshold(out.maps.ravel(), out.masks.ravel(), ranking)
    del ranking
    result["metrics_s"] = time.perf_counter() - t1
    result["_thresholds"] = {"image": image_thr, "pixel": pixel_thr, "image_f1": image_f1, "pixel_f1": pixel_f1,
                             "source": "test_split", "method": "f1-max on the labelled test split"}
    return result


def metrics_table(result: dict) -> str:
    """The metrics as a table (a row per evaluated map), with a line on what was trained when the time
    budget cut the run short."""
    if "i_auroc" not in result:
        table = result.get("note", "no metrics")
    else:
        rows = {result.get("model", "model"): {k: result[k] for k in METRIC_NAMES}}
        for key in result:
            if key.endswith("i_auroc") and key != "i_auroc":
                prefix = key[: -len("i_auroc")]
                rows[f"  {prefix.rstrip('_')} map"] = {k: result[prefix + k] for k in METRIC_NAMES}
        table = format_table(rows)
    return table + training_note(result)


def training_note(result: dict) -> str:
    """'' for a run trained as planned; else a line saying how much of the plan was trained."""
    trained, planned = result.get("steps_trained"), result.get("steps_planned")
    if trained is None or planned is None or trained >= planned:
        return ""
    word = "UNDERTRAINED" if result.get("undertrained") else "note"
    return f"\n{word}: trained {trained} of {planned} planned steps ({trained / planned:.0%}); cut by --time-budget"


@dataclass
class Prediction:
    score: float
    map: np.ndarray  # (H, W) at the model's input size (config image_size)
    is_defect: bool | None  # None when the run has no threshold yet

    def map_at(self, size) -> np.ndarray:
        """The map bilinearly resized to ``size`` (S or (H, W)), e.g. the input image's (height, width)."""
        return resize_map(self.map, size)


class Detector:
    """A trained run, ready to predict: ``Detector.load(run_dir).predict(image)``."""

    def __init__(self, model, config: ModelConfig, thresholds: dict | None, device, dtype, model_name: str = "",
                 run: Run | None = None):
        self.model, self.config, self.thresholds, self.model_name = model, config, thresholds, model_name
        self.device, self.dtype, self.run = device, dtype, run
        self.normalize = backbone_spec(config.teacher).normalize

    @classmethod
    def load(cls, run_dir, device: str = "cpu", precision: str = "auto", backend: str = "auto",
             compile: str = "auto") -> "Detector":
        """``backend``: ``auto`` (OpenVINO on a CPU where installed, else PyTorch), ``torch``, or ``openvino``
        (CPU; the run's IR is exported on first use); ``compile``: auto (torch.compile on CUDA), on, off."""
        inf = load_inference(run_dir, device, precision, backend, compile)
        return cls(inf.model, inf.config, inf.run.thresholds(), inf.device, inf.dtype, inf.model_name, inf.run)

    def preprocess(self, images) -> torch.Tensor:
        """PIL images or uint8 arrays (H, W, 3) / (H, W) -> normalised batch (N, 3, H', W') at the run's size."""
        arrs = []
        for im in images:
            if isinstance(im, np.ndarray):
                im = Image.fromarray(im)
            arrs.append(resize_rgb(to_rgb(im), self.config.image_size))
        return self.normalize.uint8(np.stack(arrs)).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def predict_batch(self, images, threshold: float | None = None) -> list[Prediction]:
        x = self.preprocess(images)
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        with autocast(self.device, self.dtype):
            out = self.model(x)
        maps = out["map"].float().cpu().numpy()
        scores = out["score"].float().cpu().numpy()
        thr, _ = in_force(self.thresholds, threshold)
        return [Prediction(float(s), m, None if thr is None else bool(s >= thr)) for s, m in zip(scores, maps)]

    def predict(self, image, threshold: float | None = None) -> Prediction:
        """One PIL image, numpy array or path."""
        if isinstance(image, (str, Path)):
            from destseg.data.images import read_rgb

            image = read_rgb(image)
        return self.predict_batch([image], threshold)[0]
