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

from destseg.data.datasets import DataSource, TestDataset, TestSample
from destseg.data.images import resize_map, resize_rgb, to_rgb
from destseg.device import CompiledModel, autocast, autocast_dtype, io_workers, resolve_device, should_compile
from destseg.errors import DestsegError
from destseg.metrics import (
    METRIC_NAMES, decision_rates, evaluate, f1_max_threshold, format_table, image_metrics, pixel_ranking,
)
from destseg.models import ModelConfig
from destseg.models.backbones import backbone_spec
from destseg.run import Run, calibration_unseen, training_summary
from destseg.scoring import TestOutputs, run_test_split
from destseg.thresholds import decide, good_image_thresholds, in_force, record_measured, utc_now

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
    def engine(self) -> str:
        """The engine that scores, in words: "openvino int8", "openvino fp32", "torch bf16"..."""
        return self.precision.replace("f32", "fp32") if self.backend == "openvino" else f"torch {self.precision}"

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
                   compile: str = "auto", progress: bool = True) -> InferenceModel:
    """A run's model for inference with ``backend``: ``torch`` (batch norms folded, channels_last on CPU;
    ``compile``: auto|on|off, see :func:`destseg.device.should_compile`), ``openvino`` (CPU, the run's
    cached IR) or ``auto`` (:func:`resolve_backend`; a model OpenVINO cannot take runs in PyTorch, with a
    warning). ``precision`` auto on OpenVINO: int8 where :func:`destseg.openvino_ir.auto_int8` says so (a CPU
    without native bf16), bf16 where the CPU runs it natively, else fp32. ``progress`` False: the one-time
    int8 quantisation without progress bars."""
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
                model = OpenVINOModel(run_ir(run.path, int8=True, progress=progress), "int8")
            except Exception as exc:  # NNCF's errors have no common class; int8 was not asked for: fp32 instead
                warnings.warn(f"int8 could not be made for this run ({_last_line(exc)}); "
                              "running it in fp32", stacklevel=2)
        if model is None:
            try:
                model = OpenVINOModel(run_ir(run.path, int8=precision == "int8", progress=progress), precision)
            except (DestsegError, RuntimeError) as exc:  # export, conversion, or compilation for this CPU
                if backend == "openvino" or precision == "int8":  # asked for: no fallback
                    if isinstance(exc, DestsegError):
                        raise
                    raise DestsegError(f"{run.path}: OpenVINO could not run it "
                                       f"({_last_line(exc)})") from exc
                warnings.warn(f"OpenVINO could not take this run ({_last_line(exc)}); running it "
                              "in PyTorch", stacklevel=2)
                return load_inference(run_dir, device, precision, "torch", compile, progress)
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


def evaluate_run(run_dir: Path | str, data=None, device: str = "auto",
                 precision: str = "auto", batch_size: int = 16, progress: bool = True, fpr: float = 0.01,
                 report: bool = False, backend: str = "auto", compile: str = "auto", workers: int = -1,
                 adopt_thresholds: bool = False) -> dict:
    """Evaluate a run on a labelled test split (``data``: a :class:`DataSource` or :class:`TestFolders`;
    default: the run's own) and write RUN/metrics.json (and RUN/report.html with ``report``).

    Image metrics (I-AUROC, image AP, and the detection and false-alarm rates at the thresholds in force)
    need labels only; the pixel metrics are computed on the good images and the defect images that have a
    mask, and skipped (saying so) where none has one. The thresholds this split suggests (F1-max where it
    has defect images; split conformal at ``fpr`` on its good images where it has none) are recorded in
    RUN/thresholds.json under ``measured_on_test``; the thresholds in force (from training or recalibrate)
    stay in force unless ``adopt_thresholds``. Good-image thresholds are never set from a split that holds
    defect images. ``workers``: DataLoader workers (-1: :func:`destseg.device.io_workers`)."""
    run = Run(run_dir)
    if workers < -1:
        raise DestsegError(f"--workers must be -1 (automatic) or more (got {workers})")
    index, notes = test_split(run, data)
    inf = load_inference(run.path, device, precision, backend, compile, progress)
    dataset = TestDataset(index.test, inf.config.image_size, backbone_spec(inf.config.teacher).normalize)
    t0 = time.perf_counter()
    out = run_test_split(inf.model, dataset, inf.device, inf.dtype, inf.map_outputs, batch_size, progress,
                         io_workers(inf.device) if workers < 0 else workers)
    wall = time.perf_counter() - t0
    labels = out.labels.astype(bool)
    has_mask = np.array([s.mask is not None for s in index.test], dtype=bool)
    result = {"model": inf.model_name, "teacher": inf.config.teacher, **training_summary(inf.ckpt),
              "n_test": len(dataset), "n_good": int((~labels).sum()), "n_defect": int(labels.sum()),
              "n_defect_with_mask": int((labels & has_mask).sum()), "test_data": index.name,
              "backend": inf.backend, "precision": inf.precision, "device": str(inf.device),
              "images_per_s": len(dataset) / max(wall, 1e-9),  # end to end: reading, decoding, resizing too
              "model_images_per_s": len(dataset) / max(out.seconds, 1e-9)}
    scorer = Detector(inf.model, inf.config, None, inf.device, inf.dtype, inf.model_name, run, inf.engine)
    scorer.reload_thresholds()  # the thresholds in force as this engine scores
    stored = scorer.thresholds
    result["engine"] = inf.engine
    if labels.any() and (~labels).any():
        result.update(image_metrics(out.scores, labels))
        for prefix, (_, scores) in out.extra.items():
            result.update({prefix + k: v for k, v in image_metrics(scores, labels).items()})
    if labels.any():
        measured = _f1_thresholds(out, labels, has_mask)
        if result["n_defect_with_mask"]:
            result.update(_pixel_metrics(out, labels, has_mask, inf.device))
            if result["n_defect_with_mask"] < result["n_defect"]:
                notes.append(f"pixel metrics on the {int((~labels).sum())} good images and the "
                             f"{result['n_defect_with_mask']} of {result['n_defect']} defect images that have a "
                             "mask; image metrics on all images")
        else:
            notes.append(f"none of the {result['n_defect']} defect images has a mask: pixel metrics skipped, "
                         "image metrics (I-AUROC, image AP, detection and false-alarm rates) computed from labels")
    else:
        notes.append("no defect images in the test split: only the false-alarm rate is measured")
        if adopt_thresholds:  # these good images become the calibration set (RUN/calibration.json)
            measured = run.calibrate([s.path for s in index.test], out.scores, out.maps, fpr, "good test images")
        else:
            measured = good_image_thresholds(out.scores, out.maps, fpr, "good test images")
    measured.update(measured=utc_now(), test_data=index.name, engine=inf.engine)
    if adopt_thresholds:
        if labels.any() and measured.get("pixel") is None:  # no masks: the pixel threshold in force stays
            measured["pixel"] = (stored or {}).get("pixel")
        thresholds = run.write_thresholds(measured)
        notes.append("the thresholds measured on this split are now in force (--adopt-thresholds); the ones they "
                     "replaced are in thresholds-history/")
    elif stored is not None:  # in force as they were (this engine's), the split's suggestion recorded beside
        record_measured(run.path, measured)
        thresholds = {**stored, "measured_on_test": measured}
    else:  # a run without thresholds: the only ones there are
        thresholds = run.write_thresholds(measured)
    image_thr, _ = in_force(thresholds)
    if image_thr is not None:  # the decisions the thresholds now in force make on this split
        result["decisions"] = decision_rates(out.scores, labels, image_thr)
    result["thresholds"] = thresholds
    result["thresholds_measured"] = measured
    if notes:
        result["note"] = "; ".join(notes)
    run.write_metrics(result)
    if report:
        from destseg.report import write_report

        write_report(run.path / "report.html", result, out, index.test, dataset.size)
    result["_outputs"] = out
    return result


def test_split(run: Run, data) -> tuple:
    """(the test split's index, notes): ``data`` scanned (the run's own by default); a defect folder without a
    good one takes the good images the run held out of training for its thresholds."""
    if data is None:
        data = run.data
        if data is None:
            raise DestsegError(f"{run.path}: the run does not record its data; pass --data and --category, or "
                               "--good DIR and --defect DIR")
        if getattr(data, "layout", None) == "folder":
            raise DestsegError(f"{run.path}: trained from a plain folder of good images, so it has no test split of "
                               "its own: pass --defect DIR (photos of defective parts) and --good DIR (good images "
                               "not used for training; without it, the good images held out of training)")
    index = data.scan()
    notes: list[str] = []
    if not any(s.label == 0 for s in index.test) and any(s.label for s in index.test):
        held = _held_out_good(run)
        if held:
            index.test = [TestSample(Path(f), 0, None, "good") for f in held] + index.test
            notes.append(f"good side: the {len(held)} good images held out of training (they also set the "
                         "thresholds, so their false-alarm rate is not an independent check; pass --good DIR "
                         "with other good images for one)")
        else:
            raise DestsegError("the test split has defect images but no good ones, and the run held no good images "
                               "out of training: pass --good DIR with good images not used for training")
    if not index.test:
        raise DestsegError(f"{index.name}: the test split has no images")
    seen = _seen_in_training(run, index)
    if seen:
        notes.append(f"{seen} of the good test images are in the run's training folder: seen in training, so "
                     "the false-alarm rate and I-AUROC are optimistic")
    return index, notes


def _held_out_good(run: Run) -> list[str]:
    """The good images the run's thresholds were set on, where they were kept out of training and are here."""
    cal = run.calibration()
    if not cal or not calibration_unseen(cal) or not all(Path(f).is_file() for f in cal["files"]):
        return []
    return list(cal["files"])


def _seen_in_training(run: Run, index) -> int:
    """How many good test images lie in a plain training folder (the benchmark layouts keep them apart)."""
    data = run.data
    if data is None or data.layout != "folder":
        return 0
    held = {str(Path(f).resolve()) for f in _held_out_good(run)}
    root = Path(data.root).resolve()
    return sum(1 for s in index.test if s.label == 0 and str(Path(s.path).resolve()) not in held
               and root in Path(s.path).resolve().parents)


def _f1_thresholds(out: TestOutputs, labels: np.ndarray, has_mask: np.ndarray) -> dict:
    """F1-max thresholds on a labelled split: the image threshold on all images, the pixel threshold on the
    good images and the defect images with a mask (None without any). No false-positive bound is stated."""
    image_thr, image_f1 = f1_max_threshold(out.scores, labels)
    block = {"image": image_thr, "image_f1": image_f1, "pixel": None, "pixel_f1": None, "source": "test_split",
             "n_images": int(len(labels)), "fpr_bound": None,
             "method": "f1-max on the labelled test split (no false-positive bound: defect images set it)"}
    rows = ~labels | has_mask
    if (labels & has_mask).any():
        block["pixel"], block["pixel_f1"] = f1_max_threshold(out.maps[rows].ravel(), out.masks[rows].ravel())
    return block


def _pixel_metrics(out: TestOutputs, labels: np.ndarray, has_mask: np.ndarray, device: torch.device) -> dict:
    """The pixel metrics (P-AUROC, P-AP, PRO, IAP, IAP@90) of the anomaly map and of each secondary map (by
    prefix) on the good images and the defect images with a mask, and the time they took (``metrics_s``)."""
    t1 = time.perf_counter()
    rows = ~labels | has_mask
    sel = slice(None) if rows.all() else np.flatnonzero(rows)
    maps, masks, lab = out.maps[sel], out.masks[sel], labels[sel]
    sort_on = device if device.type == "cuda" else None  # the pixel sort is the costly part: on the GPU if any
    ranking = pixel_ranking(maps, masks, sort_on)
    result = {k: v for k, v in evaluate(maps, masks, lab, out.scores[sel], ranking).items() if k != "i_auroc"}
    del ranking
    for prefix, (extra_maps, scores) in out.extra.items():
        result.update({prefix + k: v for k, v in evaluate(extra_maps[sel], masks, lab, scores[sel],
                                                          device=sort_on).items() if k != "i_auroc"})
    result["metrics_s"] = time.perf_counter() - t1
    return result


def metrics_table(result: dict) -> str:
    """The metrics as a table (a row per evaluated map), the decisions at the thresholds in force, which
    thresholds those are, the notes, and a line on what was trained when the time budget cut the run short."""
    lines = []
    if "i_auroc" in result:
        rows = {result.get("model", "model"): {k: result.get(k) for k in METRIC_NAMES}}
        for key in result:
            if key.endswith("i_auroc") and key != "i_auroc":
                prefix = key[: -len("i_auroc")]
                rows[f"  {prefix.rstrip('_')} map"] = {k: result.get(prefix + k) for k in METRIC_NAMES}
        lines.append(format_table(rows))
        lines.append(f"image AP {100 * result['i_ap']:.1f}")
    lines += decisions_lines(result)
    if result.get("note"):
        lines.append("note: " + result["note"])
    return "\n".join(lines) + training_note(result)


def decisions_lines(result: dict) -> list[str]:
    """The decisions at the thresholds in force, in words, and the thresholds the split suggests."""
    lines = []
    thr = result.get("thresholds") or {}
    d = result.get("decisions")
    if d:
        def rate(name, k, n):
            lo, hi = d[f"{name}_ci95"]
            return f"{k}/{n} = {100 * d[name]:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"

        where = {"good_images": "set on good images", "test_split": "adopted from a test split"}.get(
            thr.get("source"), thr.get("source", "?"))
        lines.append(f"at the image threshold in force ({d['threshold']:.5g}, {where}):")
        if d["n_defect"]:
            lines.append("  defects detected   " + rate("detection_rate", d["detected"], d["n_defect"]))
        if d["n_good"]:
            lines.append("  false alarms       " + rate("false_alarm_rate", d["false_alarms"], d["n_good"]))
    m = result.get("thresholds_measured")
    if m and thr.get("measured_on_test"):
        pixel = "none (no masks)" if m.get("pixel") is None else f"{m['pixel']:.5g}"
        how = m["method"].split(":")[0]
        lines.append(f"this split suggests image threshold {m['image']:.5g}, pixel {pixel} ({how}); "
                     "recorded in thresholds.json under measured_on_test, not in force (--adopt-thresholds puts "
                     "them in force)")
    return lines


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
                 run: Run | None = None, engine: str = ""):
        self.model, self.config, self.thresholds, self.model_name = model, config, thresholds, model_name
        self.device, self.dtype, self.run, self.engine = device, dtype, run, engine
        self.calibration: dict | None = None  # the calibration images' scores by this engine (the drift reference)
        self.normalize = backbone_spec(config.teacher).normalize

    @classmethod
    def load(cls, run_dir, device: str = "cpu", precision: str = "auto", backend: str = "auto",
             compile: str = "auto", progress: bool = True) -> "Detector":
        """``backend``: ``auto`` (OpenVINO on a CPU where installed, else PyTorch), ``torch``, or ``openvino``
        (CPU; the run's IR is exported on first use); ``compile``: auto (torch.compile on CUDA), on, off;
        ``progress`` False: a first int8 quantisation without progress bars."""
        from destseg.health import run_warnings

        inf = load_inference(run_dir, device, precision, backend, compile, progress)
        for warning in run_warnings(inf.run):  # once per load: predict, serve and watch load once
            warnings.warn(warning, stacklevel=2)
        det = cls(inf.model, inf.config, None, inf.device, inf.dtype, inf.model_name, inf.run, inf.engine)
        det.reload_thresholds()
        return det

    def reload_thresholds(self) -> None:
        """The run's thresholds in force and calibration scores, as this detector's engine scores them
        (:mod:`destseg.engine_thresholds`)."""
        from destseg.engine_thresholds import for_engine

        if self.run is not None:
            self.thresholds, self.calibration = for_engine(self.run, self.engine, self.predict_batch)

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
        return [Prediction(float(s), m, decide(s, thr)) for s, m in zip(scores, maps)]

    def predict(self, image, threshold: float | None = None) -> Prediction:
        """One PIL image, numpy array or path."""
        if isinstance(image, (str, Path)):
            from destseg.data.images import read_rgb

            image = read_rgb(image)
        return self.predict_batch([image], threshold)[0]
