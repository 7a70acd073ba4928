"""Heat-map overlays without plotting libraries: a small colour map, alpha blending, PNG encoding."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# Control points of a perceptually ordered map (dark blue -> cyan -> yellow -> red), value -> RGB.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLORS = np.array([[0, 0, 130], [0, 160, 255], [120, 255, 120], [255, 220, 0], [210, 0, 0]], dtype=np.float32)


def colorize(values01: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8."""
    v = np.clip(values01, 0, 1)
    rgb = np.stack([np.interp(v, _STOPS, _COLORS[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5,
            mask: np.ndarray | None = None) -> np.ndarray:
    """Blend the coloured map over the image (both (H, W[, 3]) at the same size); ``mask`` draws a
    white outline of a binary mask on top."""
    norm = (anomaly_map - vmin) / max(vmax - vmin, 1e-12)
    out = (1 - alpha) * image.astype(np.float32) + alpha * colorize(norm).astype(np.float32)
    out = out.astype(np.uint8)
    if mask is not None:
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255
    return out


def threshold_overlay(image: np.ndarray, anomaly_map: np.ndarray, pixel_thr: float | None) -> np.ndarray:
    """What ``predict`` and ``serve`` draw: the map over the image on a colour scale from 0 to twice the
    run's pixel threshold, the same for every image (the threshold sits mid-scale, in green); without a
    threshold, from 0 to this map's maximum."""
    top = 2 * pixel_thr if pixel_thr and pixel_thr > 0 else max(float(anomaly_map.max()), 1e-6)
    return overlay(image, anomaly_map, 0.0, top)


def threshold_mask(anomaly_map: np.ndarray, pixel_thr: float) -> np.ndarray:
    """The defect mask as a uint8 image: 255 where the map reaches the pixel threshold, else 0."""
    return (anomaly_map >= pixel_thr).astype(np.uint8) * 255


def png_b64(arr: np.ndarray) -> str:
    """An image array as a base64 PNG (for HTML pages and JSON answers)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
