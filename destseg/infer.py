"""Inference: batch prediction over a dataset, test-split evaluation, and the :class:`Detector` API."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from destseg.checkpoint import atomic_write_text
from destseg.data.datasets import TestDataset
from destseg.data.images import hw, resize_map, resize_rgb, to_rgb
from destseg.errors import DestsegError
from destseg.metrics import METRIC_NAMES, evaluate, f1_max_threshold, format_table, pixel_ranking
from destseg.models.backbones import backbone_spec
from destseg.data.datasets import DataSource
from destseg.device import CompiledModel, autocast, autocast_dtype, io_workers, resolve_device, should_compile
from destseg.thresholds import fpr_thresholds, read_thresholds, write_thresholds
from destseg.train import load_model, read_run_config


@dataclass
class TestOutputs:
    maps: np.ndarray  # (N, H, W) float32
    scores: np.ndarray  # (N,)
    masks: np.ndarray  # (N, H, W) bool
    labels: np.ndarray  # (N,)
    dest_maps: np.ndarray | None
    dest_scores: np.ndarray | None
    seconds: float


@torch.no_grad()
def run_test_split(model, dataset: TestDataset, device: torch.device, dtype, batch_size: int = 16,
                   progress: bool = True, num_workers: int = -1) -> TestOutputs:
    """Maps and scores of a test split. Reading, decoding and resizing run in DataLoader workers
    (``num_workers`` -1: :func:`destseg.device.io_workers`)."""
    workers = io_workers(device) if num_workers < 0 else num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    n, (h, w) = len(dataset), hw(dataset.size)
    maps = np.empty((n, h, w), np.float32)
    masks = np.empty((n, h, w), bool)
    labels = np.empty(n, np.int64)
    scores = np.empty(n, np.float64)
    dest_maps = dest_scores = None
    seconds = 0.0
    for batch in tqdm(loader, desc="test", unit="batch", disable=not progress):
        idx = batch["index"].numpy()
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            out = model(x)
        m = out["map"].float().cpu().numpy()
        seconds += time.perf_counter() - t0
        maps[idx], scores[idx] = m, out["score"].float().cpu().numpy()
        masks[idx], labels[idx] = batch["mask"].numpy(), batch["label"].numpy()
        if "dest_map" in out:
            if dest_maps is None:
                dest_maps, dest_scores = np.empty_like(maps), np.empty_like(scores)
            dest_maps[idx] = out["dest_map"].float().cpu().numpy()
            dest_scores[idx] = out["dest_score"].float().cpu().numpy()
    return TestOutputs(maps, scores, masks, labels, dest_maps, dest_scores, seconds)


def load_inference_model(run_dir, device: str = "auto", precision: str = "auto", backend: str = "torch",
                         compile: str = "auto"):
    """(model, checkpoint, device, autocast dtype, precision in words) for inference with ``backend``:
    ``torch`` (batch norms folded, channels_last on CPU; ``compile``: auto|on|off, see
    :func:`destseg.device.should_compile`) or ``openvino`` (CPU, the run's cached IR)."""
    if backend == "openvino":
        from destseg.checkpoint import load_checkpoint
        from destseg.openvino_ir import OpenVINOModel, run_ir

        if device not in ("auto", "cpu"):
            raise DestsegError(f"--backend openvino runs on the CPU, not --device {device}")
        ckpt = load_checkpoint(Path(run_dir) / "checkpoint.pt" if Path(run_dir).is_dir() else run_dir)
        model = OpenVINOModel(run_ir(run_dir), precision)
        return model, ckpt, torch.device("cpu"), None, f"openvino {model.precision}"
    if backend != "torch":
        raise DestsegError(f"--backend must be torch or openvino (got {backend!r})")
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    model, ckpt = load_model(run_dir, str(dev))
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    if should_compile(compile, dev):
        model = CompiledModel(model)
    return model, ckpt, dev, dtype, "fp32" if dtype is None else "bf16"


def evaluate_run(run_dir: Path | str, data: DataSource | None = None, device: str = "auto",
                 precision: str = "auto", batch_size: int = 16, progress: bool = True, fpr: float = 0.01,
                 report: bool = False, backend: str = "torch", compile: str = "auto", workers: int = -1) -> dict:
    """Evaluate a run on its test split; writes RUN/metrics.json and RUN/thresholds.json (and
    RUN/report.html with ``report``). Thresholds: F1-max on the test split, or, when it has no defect
    images, the (1 - fpr) quantile of the normal images' scores and pixels. ``workers``: DataLoader
    workers (-1: :func:`destseg.device.io_workers`)."""
    run_dir = Path(run_dir)
    if workers < -1:
        raise DestsegError(f"--workers must be -1 (automatic) or more (got {workers})")
    saved = read_run_config(run_dir)
    if data is None:
        if not saved.get("data"):
            raise DestsegError(f"{run_dir}: the run does not record its data; pass --data and --category")
        data = DataSource(**saved["data"])
    index = data.scan()
    if not index.test:
        raise DestsegError(f"{index.name}: the test split has no images")
    model, ckpt, dev, dtype, precision_used = load_inference_model(run_dir, device, precision, backend, compile)
    spec = backbone_spec(ckpt["config"]["teacher"])
    dataset = TestDataset(index.test, ckpt["config"]["image_size"], spec.mean, spec.std)
    t0 = time.perf_counter()
    out = run_test_split(model, dataset, dev, dtype, batch_size, progress, workers)
    wall = time.perf_counter() - t0
    result = {"model": ckpt["model"], "teacher": ckpt["teacher"], "step": ckpt["step"],
              "n_test": len(dataset), "backend": backend, "precision": precision_used, "device": str(dev),
              "images_per_s": len(dataset) / max(wall, 1e-9),  # end to end: reading, decoding, resizing too
              "model_images_per_s": len(dataset) / max(out.seconds, 1e-9)}
    if out.labels.any() and out.masks.any():
        t1 = time.perf_counter()
        sort_on = dev if dev.type == "cuda" else None  # the pixel sort is the costly part: on the GPU if any
        ranking = pixel_ranking(out.maps, out.masks, sort_on)  # one sort of all pixels: metrics and threshold
        result.update(evaluate(out.maps, out.masks, out.labels, out.scores, ranking))
        if out.dest_maps is not None and ckpt["config"].get("segmentation", True):
            dest = evaluate(out.dest_maps, out.masks, out.labels, out.dest_scores, device=sort_on)
            result.update({f"dest_{k}": v for k, v in dest.items()})
        image_thr, image_f1 = f1_max_threshold(out.scores, out.labels)
        pixel_thr, pixel_f1 = f1_max_threshold(out.maps.ravel(), out.masks.ravel(), ranking)
        del ranking
        result["metrics_s"] = time.perf_counter() - t1
        thresholds = {"image": image_thr, "pixel": pixel_thr, "image_f1": image_f1, "pixel_f1": pixel_f1,
                      "source": "test_split", "method": "f1-max on the labelled test split"}
    else:
        result["note"] = "no defect images with masks in the test split: metrics skipped"
        thresholds = fpr_thresholds(out.scores, out.maps, fpr, "good test images")
    result["thresholds"] = thresholds
    atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    write_thresholds(run_dir, thresholds)
    if report:
        from destseg.report import write_report

        write_report(run_dir / "report.html", result, out, index.test, dataset.size)
    result["_outputs"] = out
    return result


def metrics_table(result: dict) -> str:
    if "i_auroc" not in result:
        return result.get("note", "no metrics")
    rows = {result.get("model", "model"): {k: result[k] for k in METRIC_NAMES}}
    if "dest_i_auroc" in result:
        rows["  dest map"] = {k: result[f"dest_{k}"] for k in METRIC_NAMES}
    return format_table(rows)


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

    def __init__(self, model, config: dict, thresholds: dict | None, device, dtype, model_name: str = ""):
        self.model, self.config, self.thresholds, self.model_name = model, config, thresholds, model_name
        self.device, self.dtype = device, dtype
        spec = backbone_spec(config["teacher"])
        self.mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std).view(1, 3, 1, 1)

    @classmethod
    def load(cls, run_dir, device: str = "cpu", precision: str = "auto", backend: str = "torch",
             compile: str = "auto") -> "Detector":
        """``backend``: ``torch``, or ``openvino`` (CPU; the run's IR is exported on first use);
        ``compile``: auto (torch.compile on CUDA), on, off."""
        run_dir = Path(run_dir)
        model, ckpt, dev, dtype, _ = load_inference_model(run_dir, device, precision, backend, compile)
        return cls(model, ckpt["config"], read_thresholds(run_dir), dev, dtype, ckpt["model"])

    def preprocess(self, images) -> torch.Tensor:
        """PIL images or uint8 arrays (H, W, 3) / (H, W) -> normalised batch (N, 3, H', W') at the run's size."""
        size = self.config["image_size"]
        arrs = []
        for im in images:
            if isinstance(im, np.ndarray):
                im = Image.fromarray(im)
            arrs.append(resize_rgb(to_rgb(im), size))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

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
        thr = threshold if threshold is not None else (self.thresholds or {}).get("image")
        return [Prediction(float(s), m, None if thr is None else bool(s >= thr)) for s, m in zip(scores, maps)]

    def predict(self, image, threshold: float | None = None) -> Prediction:
        """One PIL image, numpy array or path."""
        if isinstance(image, (str, Path)):
            from destseg.data.images import read_rgb

            image = read_rgb(image)
        return self.predict_batch([image], threshold)[0]
