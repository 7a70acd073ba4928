"""Training-time augmentation and anomaly synthesis as batched tensor operations on the training device.

The same distribution as the per-sample NumPy path (``synthesis.py`` + ``rotate_image``), computed for a
whole batch at once where the model runs, so that a GPU is not starved by CPU workers drawing Perlin
masks: per-category rotation of the clean image (fill 114), Perlin noise with per-sample scales 2^tx x 2^ty
rotated by U(-90, 90) and thresholded at 0.5, a texture from a bank held on the device, and the blend
I*(1-M) + (1-b)*A*M + b*I*M with b ~ U(0, 0.8). Randomness comes from a ``torch.Generator`` seeded per step
(seed, stage, step, rank), so batches are reproducible and identical after a resume.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from destseg.data.images import hw
from destseg.data.images import Normalize
from destseg.data.synthesis import GeneratedTextures, TextureFolder, gradient_noise, to_gray

LATTICE = 33  # gradient lattice points per axis: the finest Perlin scale is 2^5 = 32 cells
FILL = 114 / 255


def texture_bank(size, texture_dir=None, generated: int = 256, seed: int = 0, gray: bool = False) -> torch.Tensor:
    """(K, 3, H, W) float in [0, 1]: the texture folder's images, or ``generated`` procedural textures
    (the offline fallback draws a fixed bank instead of a fresh texture per sample); ``gray``: their
    luminance in all three channels (see ``AnomalySynthesizer``)."""
    if texture_dir:
        arr = TextureFolder(texture_dir, size).images.astype(np.float32) / 255.0
    else:
        gen = GeneratedTextures(size)
        rng = np.random.default_rng([seed, 99])
        arr = np.stack([gen(rng) for _ in range(generated)])
    if gray:
        arr = to_gray(arr)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _uniform(n, low, high, g, device):
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def _rotate(x: torch.Tensor, degrees: torch.Tensor, fill: float) -> torch.Tensor:
    """Rotate each image of (N, C, H, W) by its angle about the centre (bilinear, ``fill`` outside)."""
    n, _, h, w = x.shape
    theta = degrees * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # affine_grid works in [-1, 1] coordinates; correct for the aspect ratio of non-square images.
    mat = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    mat[:, 0, 0], mat[:, 0, 1] = cos, -sin * h / w
    mat[:, 1, 0], mat[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    # As PIL: bilinear inside (edges clamped), a hard in/out decision per output pixel for the fill.
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ones = torch.ones(n, 1, h, w, device=x.device, dtype=x.dtype)
    inside = F.grid_sample(ones, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out * inside + (1 - inside) * fill


def perlin_batch(n: int, size, g: torch.Generator, device) -> torch.Tensor:
    """(N, H, W) Perlin noise, each with its own scale 2^ty x 2^tx (tx, ty in [0, 5]), fade 6t^5-15t^4+10t^3."""
    h, w = hw(size)
    tx = torch.randint(0, 6, (n,), generator=g, device=device)
    ty = torch.randint(0, 6, (n,), generator=g, device=device)
    rx, ry = (2 ** tx).float(), (2 ** ty).float()
    angles = 2 * math.pi * torch.rand(n, LATTICE * LATTICE, generator=g, device=device)
    gy = torch.arange(h, device=device).float()[None, :, None] * ry[:, None, None] / h  # (N, H, 1)
    gx = torch.arange(w, device=device).float()[None, None, :] * rx[:, None, None] / w  # (N, 1, W)
    cy, cx = gy.floor(), gx.floor()
    fy, fx = gy - cy, gx - cx
    cy, cx = cy.long(), cx.long()

    def corner_gradients(oy, ox):
        idx = ((cy + oy) * LATTICE + (cx + ox)).reshape(n, -1)
        a = torch.gather(angles, 1, idx).reshape(n, h, w)
        return torch.sin(a), torch.cos(a)

    return gradient_noise(corner_gradients, fy, fx)


class DeviceAugment:
    """Turns a batch of clean uint8 images (N, H, W, 3) into the training batch on ``device``:
    normalised ``image``, and with synthesis ``augmented`` and ``mask`` (N, 1, H, W)."""

    def __init__(self, size, normalize: Normalize, rotation: str, textures: torch.Tensor | None, device,
                 max_beta: float = 0.8):
        self.size, self.rotation, self.max_beta, self.device = size, rotation, max_beta, torch.device(device)
        self.normalize = normalize
        self.textures = None if textures is None else textures.to(self.device)

    def generator(self, *seed_parts: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(int(np.random.SeedSequence(list(seed_parts)).generate_state(1, np.uint64)[0] >> 1))
        return g

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = images_u8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
        n = x.shape[0]
        if self.rotation != "none":
            angle = _uniform(n, -5.0, 5.0, g, self.device)
            if self.rotation == "rot90":
                angle = angle + 90.0 * torch.randint(0, 4, (n,), generator=g, device=self.device)
            x = _rotate(x, angle, FILL)
        out = {"image": self.normalize(x)}
        if self.textures is not None:
            noise = perlin_batch(n, self.size, g, self.device)[:, None]
            noise = _rotate(noise, _uniform(n, -90.0, 90.0, g, self.device), 0.0)
            mask = (noise > 0.5).float()
            source = self.textures[torch.randint(0, len(self.textures), (n,), generator=g, device=self.device)]
            beta = _uniform(n, 0.0, self.max_beta, g, self.device).view(n, 1, 1, 1)
            aug = x * (1 - mask) + (1 - beta) * source * mask + beta * x * mask
            out.update(augmented=self.normalize(aug), mask=mask, beta=beta.view(n))
        for k in ("image", "augmented"):
            if k in out:
                out[k] = out[k].contiguous(memory_format=torch.channels_last)
        return out
