"""Reading images and masks with clear errors, resizing them, and normalising them for a teacher.

Every decoding failure becomes an :class:`ImageError` naming the file. Conversions (documented in the
README): grayscale, palette, RGBA/LA (alpha dropped, not composited), CMYK and 16-bit images are
converted to 8-bit RGB; 16-bit values are scaled by 1/257 (a warning when a 16-bit frame uses 12 bits or
fewer). Masks: any non-zero pixel is a defect.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from destseg.errors import ImageError

# The raster formats Pillow decodes here (PNG, JPEG, BMP, TIFF, WebP, GIF, PNM, TGA, JPEG 2000...); files of
# other types in an input folder are counted and named by the commands that skip them.
_RASTER = (".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif",
           ".pgm", ".ppm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2", ".j2k", ".jpx", ".avif")
IMAGE_EXTENSIONS = tuple(e for e in _RASTER if Image.registered_extensions().get(e) in Image.OPEN)

# Refuse anything larger before decoding: a 20000x20000 header would need 1.2 GB of RAM to decode.
MAX_PIXELS = 64_000_000


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(folder).glob(pattern) if p.is_file() and is_image_file(p))


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    """Open and decode ``path`` (or the bytes ``data``, named ``path`` in errors)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if data is not None else path)
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError(f"{path}: image has an empty size {width}x{height}")
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"{path}: image is {width}x{height} pixels, more than the {MAX_PIXELS:,} allowed; "
                    "resize it before use"
                )
            img.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, RuntimeError, TypeError,
            struct.error) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.nan_to_num(arr) * 255.0 if arr.max(initial=0) <= 1.0 else arr, 0, 255).astype(np.uint8)
    if arr.dtype.itemsize >= 2:  # 16-bit (or 32-bit int) PNG/TIFF
        return np.clip(arr.astype(np.int64) // 257, 0, 255).astype(np.uint8)
    return arr.astype(np.uint8)


_noted_narrow_16bit = False


def _note_narrow_16bit(arr: np.ndarray, path) -> None:
    """Warn (once per process) about a 16-bit frame that uses 12 bits or fewer: a 12-bit camera's 0-4095
    divided by 257 keeps at most 16 grey levels."""
    global _noted_narrow_16bit
    top = int(arr.max(initial=0))
    if 0 < top < 4096 and not _noted_narrow_16bit:
        _noted_narrow_16bit = True
        warnings.warn(f"{path}: 16-bit image whose values reach only {top} (a 10/12-bit camera?): converted to "
                      f"8 bits by dividing by 257, it keeps {top // 257 + 1} grey level(s); scale such frames to "
                      "the full 16-bit (or 8-bit) range first", stacklevel=3)


def to_rgb(img: Image.Image, path: Path | str = "<array>") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see module docstring)."""
    try:
        if img.mode == "RGB":
            return img
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img)
            if img.mode.startswith("I;16"):
                _note_narrow_16bit(arr, path)
            return Image.fromarray(_to_uint8(arr), mode="L").convert("RGB")
        if img.mode in ("RGBA", "LA", "PA"):
            return img.convert("RGBA").convert("RGB") if img.mode == "PA" else img.convert("RGB")
        return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: cannot convert mode {img.mode} to RGB ({exc})") from None


def read_rgb(path: Path | str) -> Image.Image:
    """Open, fully decode and convert an image to RGB; :class:`ImageError` on any problem."""
    return to_rgb(_open(Path(path)), path)


def decode_rgb(data: bytes, name: str = "<upload>") -> Image.Image:
    """:func:`read_rgb` for encoded bytes (an upload); errors name ``name``."""
    if not data:
        raise ImageError(f"{name}: empty (0 bytes)")
    return to_rgb(_open(Path(name), data), name)


def read_mask(path: Path | str) -> np.ndarray:
    """Binary mask (H, W) bool at the file's own resolution: any non-zero value is a defect."""
    img = _open(Path(path))
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > 0


GRAY_TOLERANCE = 2  # grey levels: a monochrome frame that went through a colour pipeline keeps this much


def is_grayscale(images_u8: np.ndarray, tolerance: int = GRAY_TOLERANCE) -> bool:
    """True when, in every image of an (N, H, W, 3) uint8 stack, each pixel's three channels lie within
    ``tolerance`` levels of each other (a grayscale camera)."""
    def gray(img):
        c = img.astype(np.int16)
        return int((c.max(axis=-1) - c.min(axis=-1)).max()) <= tolerance  # the largest difference between two channels
    return bool(len(images_u8)) and all(gray(img) for img in images_u8)


def hw(size) -> tuple[int, int]:
    """An image size as (height, width): one number is a square, a pair is (height, width)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_rgb(img: Image.Image, size) -> np.ndarray:
    """PIL bilinear resize (no crop) to ``size`` (S or (H, W)), as uint8 (H, W, 3)."""
    h, w = hw(size)
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """The paper's ground-truth rule: bilinear (antialiased) resize of the 0/1 mask, then >= 0.5."""
    h, w = hw(size)
    if mask.shape == (h, w):
        return mask.astype(bool)
    img = Image.fromarray(mask.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(img) >= 0.5


def resize_map(anomaly_map: np.ndarray, size) -> np.ndarray:
    """An (H, W) anomaly map bilinearly resized to ``size`` (S or (H, W)), e.g. back onto the input image."""
    h, w = hw(size)
    if anomaly_map.shape == (h, w):
        return anomaly_map
    return np.asarray(Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


@dataclass(frozen=True)
class Normalize:
    """A teacher's input normalisation, ``(x - mean) / std`` per channel, for float tensors (..., 3, H, W)
    with values in [0, 1]: the one place it is computed (datasets, device synthesis, the Detector)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def hwc(self, img01: np.ndarray) -> torch.Tensor:
        """A float (H, W, 3) image in [0, 1] -> normalised (3, H, W) tensor."""
        return self(torch.from_numpy(np.ascontiguousarray(img01.transpose(2, 0, 1))))

    def uint8(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> normalised (N, 3, H, W) float tensor."""
        return self(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
