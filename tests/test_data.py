import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from destseg.cli import main
from destseg.data import scan_folder, scan_mvtec, scan_visa, validate
from destseg.data.synthesis import AnomalySynthesizer
from destseg.data.training import StepSampler, TrainDataset
from destseg.data.images import Normalize, read_mask, read_rgb, resize_mask
from destseg.data.synthesis import GeneratedTextures, gradient_noise, perlin_mask, perlin_noise
from destseg.errors import DatasetError, ImageError


def test_scan_counts(tiny_mvtec):
    s = scan_mvtec(tiny_mvtec, "widget").summary()
    assert (s["train"], s["test"], s["test_good"], s["test_defect"], s["masks"]) == (6, 4, 2, 2, 2)
    assert s["defect_types"] == {"spot": 2} and s["problems"] == []


def test_inspect_cli_json(tiny_mvtec, capsys):
    assert main(["inspect", "--data", str(tiny_mvtec), "--category", "widget", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"] == 6 and out["test_defect"] == 2 and out["problems"] == []
    assert out["train_image_size"] == "64x64" and out["shape_note"] is None
    assert out["train_color"] == "colour"
    train = sorted((tiny_mvtec / "widget" / "train" / "good").iterdir())
    for p in train[1:]:  # a monochrome camera: what --anomaly-color auto will do is reported before training
        Image.open(p).convert("L").save(p)
    assert main(["inspect", "--data", str(tiny_mvtec), "--category", "widget", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_color"].startswith("mixed (5 of 6 training images grayscale)")
    Image.open(train[0]).convert("L").save(train[0])
    assert main(["inspect", "--data", str(tiny_mvtec), "--category", "widget"]) == 0
    assert "colour: grayscale (all 6 training images): --anomaly-color auto blends gray" in capsys.readouterr().out


def test_inspect_decodes_each_image_once(tiny_mvtec, monkeypatch, capsys):
    import destseg.data.datasets as datasets

    decoded = []
    monkeypatch.setattr(datasets, "read_rgb", lambda p: decoded.append(p) or read_rgb(p))
    assert main(["inspect", "--data", str(tiny_mvtec), "--category", "widget", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_color"] == "colour"
    assert len(decoded) == len(set(decoded)) == 6 + 4  # train + test, once each


def test_inspect_shared_bottle(shared_bottle, capsys):
    assert main(["inspect", "--data", str(shared_bottle), "--category", "bottle", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["train"], out["test"], out["test_good"], out["test_defect"], out["masks"]) == (209, 83, 20, 63, 63)


def test_wrong_category_names_path_and_lists_categories(tiny_mvtec, capsys):
    with pytest.raises(DatasetError, match="category 'nope' not found.*widget"):
        scan_mvtec(tiny_mvtec, "nope")
    assert main(["inspect", "--data", str(tiny_mvtec), "--category", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_empty_train_folder(tiny_mvtec):
    for p in (tiny_mvtec / "widget" / "train" / "good").iterdir():
        p.unlink()
    index = validate(scan_mvtec(tiny_mvtec, "widget"))
    assert any("no images" in p for p in index.problems)
    with pytest.raises(DatasetError, match="empty"):
        TrainDataset([], 64, Normalize((0.5,) * 3, (0.5,) * 3))


def test_truncated_image_named(tiny_mvtec):
    path = tiny_mvtec / "widget" / "train" / "good" / "000.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="000.png.*(truncated|corrupt)"):
        read_rgb(path)
    problems = validate(scan_mvtec(tiny_mvtec, "widget")).problems
    assert any("000.png" in p for p in problems)
    with pytest.raises(ImageError, match="000.png"):
        TrainDataset(scan_mvtec(tiny_mvtec, "widget").train, 64, Normalize((0.5,) * 3, (0.5,) * 3))


def test_non_image_file(tmp_path, tiny_mvtec):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a png")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        read_rgb(bad)
    (tiny_mvtec / "widget" / "train" / "good" / "readme.txt").write_text("x")
    assert any("readme.txt: not an image file" in p for p in scan_mvtec(tiny_mvtec, "widget").problems)


def test_mode_conversions(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(gray)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.full((8, 8, 4), 200, np.uint8), mode="RGBA").save(rgba)
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(deep)
    for p, value in ((gray, 100), (rgba, 200), (deep, 255)):
        img = read_rgb(p)
        assert img.mode == "RGB"
        assert np.asarray(img)[0, 0].tolist() == [value] * 3


def test_narrow_16bit_frame_is_reported_once(tmp_path, monkeypatch):
    import destseg.data.images as images

    monkeypatch.setattr(images, "_noted_narrow_16bit", False)
    frames = []
    for i, top in enumerate((4095, 1000)):  # a 12-bit and a 10-bit camera frame stored as 16-bit PNGs
        frames.append(tmp_path / f"cam{i}.png")
        Image.fromarray(np.linspace(0, top, 64, dtype=np.uint16).reshape(8, 8)).save(frames[-1])
    with pytest.warns(UserWarning, match=r"cam0.png: 16-bit image whose values reach only 4095.*16 grey level") as seen:
        assert np.asarray(read_rgb(frames[0])).max() == 15
        read_rgb(frames[1])
    assert len(seen) == 1
    from destseg.cli import _format_warning  # the CLI prints it like its errors

    assert _format_warning("m", UserWarning, seen[0].filename, seen[0].lineno) == "destseg: warning: m\n"
    monkeypatch.setattr(images, "_noted_narrow_16bit", False)
    full = tmp_path / "full.png"
    Image.fromarray(np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)).save(full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_rgb(full)


def test_huge_header_refused_without_decoding(tmp_path):
    # A valid PNG header claiming 20000 x 20000 pixels, no image data.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    path = tmp_path / "huge.png"
    path.write_bytes(png)
    with pytest.raises(ImageError, match="huge.png.*too large"):
        read_rgb(path)


def test_defect_without_mask(tiny_mvtec):
    (tiny_mvtec / "widget" / "ground_truth" / "spot" / "001_mask.png").unlink()
    index = scan_mvtec(tiny_mvtec, "widget")
    assert any("001.png: defect image has no mask" in p for p in index.problems)


def test_btad_layout_ok_folders_and_masks_named_like_their_images(tiny_mvtec, capsys):
    """BTAD: train/ok, test/ok, test/ko, ground_truth/ko/<stem>.png (here as .bmp images)."""
    base = tiny_mvtec / "widget"
    for split in ("train", "test"):
        (base / split / "good").rename(base / split / "ok")
    (base / "test" / "spot").rename(base / "test" / "ko")
    (base / "ground_truth" / "spot").rename(base / "ground_truth" / "ko")
    for mask in (base / "ground_truth" / "ko").iterdir():
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))
    for img in (base / "test" / "ko").iterdir():
        Image.open(img).save(img.with_suffix(".bmp"))
        img.unlink()
    index = scan_mvtec(tiny_mvtec, "widget")
    assert not index.problems and len(index.train) == 6
    assert sorted((s.label, s.path.name, s.mask.name if s.mask else None) for s in index.test) == [
        (0, "000.png", None), (0, "001.png", None), (1, "000.bmp", "000.png"), (1, "001.bmp", "001.png")]
    assert main(["inspect", "--data", str(tiny_mvtec), "--category", "widget", "--layout", "btad", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["name"], out["train"], out["test_good"], out["test_defect"], out["masks"]) == ("btad/widget", 6, 2, 2, 2)
    (base / "ground_truth" / "ko" / "001.png").unlink()
    assert any("001.bmp: defect image has no mask" in p for p in scan_mvtec(tiny_mvtec, "widget").problems)


def test_mask_size_mismatch(tiny_mvtec):
    mask = tiny_mvtec / "widget" / "ground_truth" / "spot" / "000_mask.png"
    Image.fromarray(np.zeros((64, 40), np.uint8)).save(mask)
    problems = validate(scan_mvtec(tiny_mvtec, "widget")).problems
    assert any("000_mask.png: mask is 40x64" in p and "aspect ratio" in p for p in problems)
    # Same aspect ratio at another size (MVTec's full-size masks beside resized images) is accepted.
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(mask)
    assert validate(scan_mvtec(tiny_mvtec, "widget")).problems == []


def test_mask_resize_rule():
    mask = np.zeros((900, 900), bool)
    mask[0:450, :] = True
    small = resize_mask(mask, 256)
    assert small.shape == (256, 256) and small[:127].all() and not small[129:].any()


def test_read_mask_binarises(tmp_path):
    p = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [128, 255]], np.uint8)).save(p)
    assert read_mask(p).tolist() == [[False, True], [True, True]]


def test_visa_layout(tmp_path):
    root = tmp_path / "visa"
    (root / "split_csv").mkdir(parents=True)
    (root / "candle" / "Data" / "Images").mkdir(parents=True)
    (root / "candle" / "Data" / "Masks").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "candle" / "Data" / "Images" / f"{name}.JPG")
    Image.fromarray(np.array([[0, 3], [0, 0]], np.uint8)).save(root / "candle" / "Data" / "Masks" / "c.png")
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/a.JPG,\n"
        "candle,test,normal,candle/Data/Images/b.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/c.JPG,candle/Data/Masks/c.png\n"
        "other,train,normal,x.JPG,\n")
    s = scan_visa(root, "candle").summary()
    assert (s["train"], s["test_good"], s["test_defect"], s["masks"]) == (1, 1, 1, 1)
    assert read_mask(root / "candle" / "Data" / "Masks" / "c.png").sum() == 1  # > 0 binarisation


def test_folder_dataset(tmp_path):
    for d in ("ok", "bad", "masks"):
        (tmp_path / d).mkdir()
    for i in range(10):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok" / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "bad" / "x.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "masks" / "x_mask.png")
    s = scan_folder(tmp_path / "ok", tmp_path / "bad", tmp_path / "masks").summary()
    assert (s["train"], s["test_good"], s["test_defect"], s["masks"]) == (8, 2, 1, 1)


def test_synthesis_is_a_function_of_the_seed():
    synth = AnomalySynthesizer(64)
    img = np.full((64, 64, 3), 0.5, np.float32)
    a1, m1 = synth(img, np.random.default_rng([1, 2]))
    a2, m2 = synth(img, np.random.default_rng([1, 2]))
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    # Outside the mask the image is untouched; inside it is blended with the source.
    assert np.array_equal(a1[~m1], img[~m1])


def test_perlin_mask_covers_varied_areas():
    rng = np.random.default_rng(0)
    areas = [perlin_mask(64, rng).mean() for _ in range(50)]
    assert min(areas) < 0.05 and max(areas) > 0.05  # sometimes small/empty, sometimes large
    tex = GeneratedTextures(32)(rng)
    assert tex.shape == (32, 32, 3) and tex.min() >= 0 and tex.max() <= 1


@pytest.mark.parametrize("shape", [(64, 64), (50, 75), (7, 5)])
def test_perlin_noise_equals_the_per_point_lattice_lookup(shape):
    # The reference: every grid point indexes its cell's four corner gradients (a full (H, W) index grid per
    # corner), as the noise was computed until 2026-12; the cells-repeated form must give the same bits, so
    # that a seed draws the same anomalies as before.
    def reference(res, rng):
        (h, w), (ry, rx) = shape, res
        dy, dx = -(-h // ry), -(-w // rx)
        gy, gx = np.meshgrid(np.arange(ry * dy) / dy, np.arange(rx * dx) / dx, indexing="ij")
        cy, cx = gy.astype(np.int64), gx.astype(np.int64)
        angles = rng.uniform(0, 2 * np.pi, size=(ry + 1, rx + 1))
        gyr, gxr = np.sin(angles), np.cos(angles)
        noise = gradient_noise(lambda oy, ox: (gyr[cy + oy, cx + ox], gxr[cy + oy, cx + ox]), gy - cy, gx - cx)
        return noise[:h, :w].astype(np.float32)

    for ty in range(6):
        for tx in range(6):
            got = perlin_noise(shape, (2**ty, 2**tx), np.random.default_rng([ty, tx]))
            assert np.array_equal(got, reference((2**ty, 2**tx), np.random.default_rng([ty, tx]))), (ty, tx)


def test_step_sampler_deterministic_and_resumable():
    full = list(StepSampler(10, 4, seed=3, total_steps=7))
    resumed = list(StepSampler(10, 4, seed=3, total_steps=7, start_step=4))
    assert full[4:] == resumed
    # Every epoch visits every image once.
    indices = [i for batch in full for i, _ in batch][:10]
    assert sorted(indices) == list(range(10))
    # Two ranks each take half of every global batch.
    r0 = list(StepSampler(10, 4, 3, 7, rank=0, world_size=2))
    r1 = list(StepSampler(10, 4, 3, 7, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == full


def test_train_batches_identical_across_worker_counts(tiny_mvtec):
    index = scan_mvtec(tiny_mvtec, "widget")
    ds = TrainDataset(index.train, 64, Normalize((0.5,) * 3, (0.5,) * 3), "rot90", AnomalySynthesizer(64))

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=StepSampler(len(ds), 3, 0, 3), num_workers=workers)
        return [b["augmented"] for b in loader]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


def test_gray_anomalies_carry_no_colour_on_both_synthesis_paths():
    from destseg.data.device_synthesis import DeviceAugment, texture_bank
    from destseg.data.images import is_grayscale
    from destseg.data.synthesis import AnomalySynthesizer, to_gray

    rng = np.random.default_rng(0)
    gray_img = np.repeat(rng.uniform(0, 1, (32, 32, 1)).astype(np.float32), 3, axis=2)
    np.testing.assert_allclose(to_gray(gray_img), gray_img, atol=1e-6)  # luminance weights sum to 1
    for gray in (False, True):
        aug, mask = AnomalySynthesizer(32, gray=gray)(gray_img, np.random.default_rng(3))
        assert mask.any()
        chroma = np.abs(aug - aug.mean(axis=2, keepdims=True)).max()
        assert (chroma < 1e-6) == gray, (gray, chroma)
    bank = texture_bank(32, None, generated=4, gray=True)
    assert torch.allclose(bank[:, 0], bank[:, 1]) and torch.allclose(bank[:, 1], bank[:, 2])
    dev = DeviceAugment(32, Normalize((0, 0, 0), (1, 1, 1)), "none", bank, "cpu")
    u8 = torch.from_numpy(np.round(gray_img * 255).astype(np.uint8)).expand(4, -1, -1, -1).contiguous()
    out = dev(u8, dev.generator(1))
    assert out["mask"].any() and torch.allclose(out["augmented"][:, 0], out["augmented"][:, 2], atol=1e-6)
    u8_np = u8.numpy()
    tinted = u8_np[:1].astype(np.int16)
    tinted[0, 5, 5, 0] += 2 if tinted[0, 5, 5, 0] < 128 else -2  # within the tolerance: still grayscale
    assert is_grayscale(u8_np) and is_grayscale(np.concatenate([u8_np, tinted.astype(np.uint8)]))
    tinted[0, 5, 5, 0] += 1 if tinted[0, 5, 5, 0] < 128 else -1  # one pixel 3 levels off: a colour image
    assert not is_grayscale(np.concatenate([u8_np, tinted.astype(np.uint8)]))


@pytest.mark.parametrize("mode, flag, expected", [("L", None, "gray"), ("RGB", None, "rgb"), ("L", "rgb", "rgb")])
def test_anomaly_colour_follows_the_training_images(tmp_path, mode, flag, expected):
    """Grayscale cameras get grayscale synthetic anomalies unless asked; the choice is in the run config."""
    from conftest import make_mvtec

    root = make_mvtec(tmp_path / "d", n_train=4)
    for p in (root / "widget" / "train" / "good").glob("*.png"):
        Image.open(p).convert(mode).save(p)
    run = tmp_path / "run"
    argv = ["train", "--data", str(root), "--category", "widget", "--out", str(run), "--teacher",
            "efficientnet_lite0", "--image-size", "64", "--batch-size", "2", "--steps", "2", "--student-steps", "1",
            "--precision", "fp32", "--no-progress"] + (["--anomaly-color", flag] if flag else [])
    assert main(argv) == 0
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["anomaly_color"] == expected
    assert resolved["anomaly_color_source"].startswith("--anomaly-color" if flag else "auto")
    assert resolved["train_image_size"] == "64x64" and resolved["shape_note"] is None


def test_shape_note_when_the_model_input_distorts_the_training_images(tmp_path):
    """Images are resized without a crop: a 2.5:1 frame into a square input gets a note with a size that
    keeps its shape (multiples of 32, about the same pixel count); a matching shape gets none."""
    from destseg.data.datasets import shape_note

    wide = []
    for i, (w, h) in enumerate([(1260, 500), (1260, 500), (1250, 510)]):
        wide.append(tmp_path / f"w{i}.png")
        Image.new("RGB", (w, h)).save(wide[-1])
    typical, note = shape_note(wide, 256)
    assert typical == "1260x500 (median of 2 different sizes)"
    assert note is not None and "--image-size 160 416" in note and "2.5x" in note
    assert shape_note(wide, (160, 416))[1] is None
    Image.new("RGB", (64, 64)).save(tmp_path / "sq.png")
    assert shape_note([tmp_path / "sq.png"], 64) == ("64x64", None)
