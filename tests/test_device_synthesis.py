"""The batched, on-device synthesis draws from the same distribution as the per-sample NumPy path."""

import numpy as np
import pytest
import torch
from PIL import Image

from destseg.data.training import rotate_image
from destseg.data.device_synthesis import DeviceAugment, texture_bank
from destseg.data.images import Normalize
from destseg.data.synthesis import AnomalySynthesizer

SIZE, N = 64, 600


@pytest.fixture
def black_texture(tmp_path):
    d = tmp_path / "tex"
    d.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(d / "black.png")
    return d


def stats(masks: np.ndarray, betas: np.ndarray) -> dict:
    cover = masks.reshape(len(masks), -1).mean(1)
    return {"cover_mean": cover.mean(), "cover_std": cover.std(), "empty": (cover == 0).mean(),
            "beta_mean": betas[cover > 0].mean(), "beta_std": betas[cover > 0].std()}


def test_mask_coverage_and_blend_factors_match_the_numpy_path(black_texture):
    # A white image blended with a black texture: inside the mask the augmented value is the blend factor b.
    synth = AnomalySynthesizer(SIZE, black_texture)
    white = np.ones((SIZE, SIZE, 3), np.float32)
    cpu_masks, cpu_betas = [], []
    for i in range(N):
        aug, mask = synth(white, np.random.default_rng(i))
        cpu_masks.append(mask)
        cpu_betas.append(aug[mask].mean() if mask.any() else np.nan)
    cpu = stats(np.array(cpu_masks), np.array(cpu_betas))

    dev = DeviceAugment(SIZE, Normalize((0, 0, 0), (1, 1, 1)), "none", texture_bank(SIZE, black_texture), "cpu")
    masks, betas = [], []
    for chunk in range(N // 100):
        out = dev(torch.full((100, SIZE, SIZE, 3), 255, dtype=torch.uint8), dev.generator(0, chunk))
        m = out["mask"][:, 0].bool()
        masks.append(m.numpy())
        aug = out["augmented"][:, 0]
        betas.append(np.array([float(aug[i][m[i]].mean()) if m[i].any() else np.nan for i in range(len(m))]))
        inside = m.any(dim=(1, 2))
        assert torch.allclose(torch.tensor(betas[-1])[inside].float(), out["beta"][inside], atol=1e-5)
    gpu = stats(np.concatenate(masks), np.concatenate(betas))
    assert 0.02 < cpu["cover_mean"] < 0.5  # a meaningful amount of anomaly to compare
    assert abs(gpu["cover_mean"] / cpu["cover_mean"] - 1) < 0.2, (cpu, gpu)
    assert abs(gpu["cover_std"] / cpu["cover_std"] - 1) < 0.2, (cpu, gpu)
    assert abs(gpu["empty"] - cpu["empty"]) < 0.06, (cpu, gpu)
    assert abs(gpu["beta_mean"] - 0.4) < 0.03 and abs(cpu["beta_mean"] - 0.4) < 0.03
    assert abs(gpu["beta_std"] - cpu["beta_std"]) < 0.03


def test_rotation_fill_matches_the_numpy_path():
    white = np.full((SIZE, SIZE, 3), 255, np.uint8)
    cpu_fill = np.mean([(rotate_image(white, "rot90", np.random.default_rng(i)) < 250).mean() for i in range(300)])
    dev = DeviceAugment(SIZE, Normalize((0, 0, 0), (1, 1, 1)), "rot90", None, "cpu")
    img = dev(torch.from_numpy(white).expand(300, -1, -1, -1).contiguous(), dev.generator(1))["image"]
    gpu_fill = float((img < 250 / 255).float().mean())
    assert abs(gpu_fill - cpu_fill) < 0.01, (cpu_fill, gpu_fill)
    assert "augmented" not in dev(torch.from_numpy(white)[None], dev.generator(1))  # no textures: no synthesis


def test_device_synthesis_is_deterministic_under_a_seed(black_texture):
    dev = DeviceAugment((64, 96), Normalize((0.5,) * 3, (0.5,) * 3), "rot90", texture_bank((64, 96), None, generated=8), "cpu")
    imgs = torch.randint(0, 255, (4, 64, 96, 3), dtype=torch.uint8)
    a, b, c = (dev(imgs, dev.generator(*s)) for s in ((0, 1, 5), (0, 1, 5), (0, 1, 6)))
    assert a["augmented"].shape == (4, 3, 64, 96) and a["mask"].shape == (4, 1, 64, 96)
    assert all(torch.equal(a[k], b[k]) for k in ("image", "augmented", "mask"))
    assert not torch.equal(a["augmented"], c["augmented"])


@pytest.mark.parametrize("model", ["destseg", "stfpm"])
def test_training_with_device_synthesis_is_reproducible(tmp_path, tiny_mvtec, model):
    import json

    from destseg.checkpoint import load_checkpoint
    from destseg.models import model_config
    from destseg.train import DataSource, TrainOptions, train

    kw = dict(teacher="efficientnet_lite0", image_size=64, batch_size=2)
    kw.update(steps=4, student_steps=2) if model == "destseg" else kw.update(epochs=1)
    states = []
    for name in ("a", "b"):
        run = tmp_path / name
        train(run, model, model_config(model, **kw), DataSource(str(tiny_mvtec), "widget"),
              options=TrainOptions(seed=3, precision="fp32", progress=False, synthesis="device", rotation="rot90"))
        states.append(load_checkpoint(run / "checkpoint.pt")["model_state"])
        assert json.loads((run / "config.json").read_text())["resolved"]["synthesis"] == "batched on cpu"
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
