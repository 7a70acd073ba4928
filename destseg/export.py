"""ONNX export: one graph from a normalised image batch (N, 3, H, W) to (anomaly map (N, H, W), score (N,)).

Batch norms are folded first; the batch axis is dynamic, the image size (H, W) is the run's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from destseg.checkpoint import atomic_write
from destseg.data.images import hw
from destseg.errors import DestsegError
from destseg.run import load_model


class MapAndScore(nn.Module):
    """The model's outputs ``keys`` as a tuple (default: the anomaly map and the score)."""

    def __init__(self, model: nn.Module, keys=("map", "score")):
        super().__init__()
        self.model, self.keys = model, tuple(keys)

    def forward(self, images):
        out = self.model(images)
        return tuple(out[k] for k in self.keys)


def export_onnx(run_dir: Path | str, out_path: Path | str, opset: int = 17, all_maps: bool = False) -> Path:
    """``all_maps``: also the secondary maps the model's ``map_outputs`` names (outputs named like the
    model's keys: ``map``, ``score``, ``dest_map``...; for the run's own OpenVINO IR, so that ``destseg test``
    evaluates them too); else the two outputs ``anomaly_map`` and ``score``."""
    model, ckpt = load_model(run_dir, "cpu")
    h, w = hw(model.config.image_size)
    keys = [k for pair in model.map_outputs.values() for k in pair] if all_maps else ["map", "score"]
    names = keys if all_maps else ["anomaly_map", "score"]
    wrapper = MapAndScore(model, keys).eval()
    example = torch.zeros(2, 3, h, w)

    def write(f):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic (sizes are fixed here)
            torch.onnx.export(wrapper, (example,), f, input_names=["images"], output_names=names,
                              dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
                              opset_version=opset, dynamo=False)

    try:
        atomic_write(out_path, write)
    except RuntimeError as exc:  # the exporter's own errors (OnnxExporterError) and tracing failures
        raise export_failed(run_dir, f"ONNX export of its '{ckpt['model']}' model", exc) from exc
    return Path(out_path)


def export_failed(run_dir, what: str, exc: Exception) -> DestsegError:
    """A conversion that fails on a valid run is a bug of ours or of the converter: say so in one line."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DestsegError(f"{run_dir}: {what} failed: {first} (a bug: please "
                        f"report it with the run's config.json and torch {torch.__version__})")
