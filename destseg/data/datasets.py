"""Dataset layouts (MVTec AD, MPDD, VisA, plain folders) and the test dataset built on them.

A layout is scanned into a :class:`DatasetIndex` (lists of files, no pixels read); ``validate`` opens
every file and reports problems; :class:`TestDataset` loads images and masks lazily. The training datasets
(augmentation, synthesis, the step sampler) are in :mod:`destseg.data.training`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from destseg.data.images import (
    IMAGE_EXTENSIONS, Normalize, hw, is_grayscale, is_image_file, list_images, read_mask, read_rgb, resize_mask,
    resize_rgb,
)
from destseg.errors import DatasetError, ImageError

# The paper's per-category train-time rotation applied to the clean image before synthesis.
CATEGORY_ROTATION = {
    **dict.fromkeys(["capsule", "metal_nut", "pill", "toothbrush", "transistor"], "none"),
    **dict.fromkeys(["wood", "zipper", "cable"], "small"),
    **dict.fromkeys(["bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw"], "rot90"),
}


def default_rotation(category: str) -> str:
    return CATEGORY_ROTATION.get(category, "none")


@dataclass
class TestSample:
    path: Path
    label: int  # 1 = from a defect folder
    mask: Path | None
    defect: str


@dataclass
class DatasetIndex:
    name: str
    train: list[Path]
    test: list[TestSample]
    problems: list[str] = field(default_factory=list)
    gray_train: dict[Path, bool] = field(default_factory=dict)  # readable training image -> grayscale (validate)
    test_only: bool = False  # a test split of its own (--good/--defect folders): no training folder expected

    def summary(self) -> dict:
        defects: dict[str, int] = {}
        for s in self.test:
            if s.label:
                defects[s.defect] = defects.get(s.defect, 0) + 1
        return {
            "name": self.name,
            "train": len(self.train),
            "test": len(self.test),
            "test_good": sum(1 for s in self.test if not s.label),
            "test_defect": sum(1 for s in self.test if s.label),
            "masks": sum(1 for s in self.test if s.mask is not None),
            "defects_without_mask": sum(1 for s in self.test if s.label and s.mask is None),
            "defect_types": dict(sorted(defects.items())),
            "problems": list(self.problems),
        }


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{path}: {what} not found")
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} is not a directory")
    return path


def _non_image_problems(folder: Path, recursive: bool = False) -> list[str]:
    return [f"{p}: not an image file (ignored)" for p in sorted(folder.glob("**/*" if recursive else "*"))
            if p.is_file() and not is_image_file(p) and not p.name.startswith(".")]


GOOD_FOLDERS = ("good", "ok")  # MVTec AD, MPDD: good; BTAD: ok


def _find_mask(folder: Path, stem: str) -> Path | None:
    """MVTec/MPDD name a mask <stem>_mask.png; BTAD names it like its image (<stem>.png or .bmp)."""
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            if (folder / (name + ext)).is_file():
                return folder / (name + ext)
    return None


def scan_mvtec(root: Path | str, category: str, name: str = "mvtec") -> DatasetIndex:
    """MVTec AD / MPDD / BTAD layout: <root>/<category>/{train/good, test/<type>, ground_truth/<type>}, where
    the good folders may be called ``ok`` (BTAD) and a mask ``<stem>_mask.<ext>`` or ``<stem>.<ext>``. Without a
    ground_truth folder the defect images have no masks (judged by their labels); with one, a missing mask is a
    problem."""
    root = Path(root)
    _require_dir(root, "dataset root")
    base = root / category
    if not base.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        hint = f"; categories found: {', '.join(found)}" if found else ""
        raise DatasetError(f"{base}: category '{category}' not found under {root}{hint}")
    good = next((g for g in GOOD_FOLDERS if (base / "train" / g).is_dir()), GOOD_FOLDERS[0])
    train_dir = _require_dir(base / "train" / good, "training folder train/good (or train/ok)")
    test_dir = _require_dir(base / "test", "test folder")
    problems = _non_image_problems(train_dir)
    train = list_images(train_dir)
    test: list[TestSample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        problems += _non_image_problems(defect_dir)
        defect = defect_dir.name
        for img in list_images(defect_dir):
            if defect in GOOD_FOLDERS:
                test.append(TestSample(img, 0, None, "good"))
                continue
            mask = _find_mask(base / "ground_truth" / defect, img.stem)
            if mask is None and (base / "ground_truth").is_dir():  # without ground_truth/: judged by labels only
                expected = base / "ground_truth" / defect / f"{img.stem}_mask.png"
                problems.append(f"{img}: defect image has no mask (expected {expected} or "
                                f"{expected.with_name(img.stem + '.png')})")
            test.append(TestSample(img, 1, mask, defect))
    return DatasetIndex(f"{name}/{category}", train, test, problems)


def scan_visa(root: Path | str, category: str) -> DatasetIndex:
    """VisA with its split_csv/1cls.csv (columns object,split,label,image,mask; paths relative to root)."""
    root = Path(root)
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: VisA split file not found")
    train: list[Path] = []
    test: list[TestSample] = []
    problems: list[str] = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {sorted(missing)}")
        for row in reader:
            if row["object"] != category:
                continue
            img = root / row["image"]
            if row["split"] == "train":
                train.append(img)
            else:
                label = int(row["label"] == "anomaly")
                mask = root / row["mask"] if label and row["mask"] else None
                if label and (mask is None or not mask.is_file()):
                    problems.append(f"{img}: defect image has no mask ({mask})")
                    mask = None
                test.append(TestSample(img, label, mask, "anomaly" if label else "good"))
    if not train and not test:
        raise DatasetError(f"{csv_path}: no rows for category '{category}'")
    return DatasetIndex(f"visa/{category}", sorted(train), test, problems)


def _mask_index(mask_dir: Path) -> dict[str, Path]:
    """Masks under ``mask_dir`` (recursively) by the stem of the image they belong to (``x.png`` or
    ``x_mask.png`` -> ``x``)."""
    return {m.stem.removesuffix("_mask"): m for m in list_images(mask_dir, recursive=True)}


def scan_folder(normal_dir: Path | str, abnormal_dir: Path | str | None = None,
                mask_dir: Path | str | None = None, normal_test_dir: Path | str | None = None,
                test_split: float = 0.2) -> DatasetIndex:
    """Users' own data: a folder of normal images (recursively), optionally abnormal images and masks.

    Masks are optional and matched by stem (``x.png`` -> ``x.png`` or ``x_mask.png`` anywhere under
    ``mask_dir``); a defect image without one is judged by its label only. Without ``normal_test_dir``,
    every fifth normal image (a fixed ``test_split`` share) is held out for testing when abnormal images
    are given, so that the test split has both classes.
    """
    normal_dir = _require_dir(Path(normal_dir), "good image folder")
    normals = list_images(normal_dir, recursive=True)
    problems = _non_image_problems(normal_dir, recursive=True)
    test: list[TestSample] = []
    if normal_test_dir is not None:
        folder = _require_dir(Path(normal_test_dir), "good test image folder")
        test += [TestSample(p, 0, None, "good") for p in list_images(folder, recursive=True)]
        train = normals
    elif abnormal_dir is not None:
        step = max(2, round(1 / test_split))
        held = set(normals[::step])
        train = [p for p in normals if p not in held]
        test += [TestSample(p, 0, None, "good") for p in sorted(held)]
    else:
        train = normals
    if abnormal_dir is not None:
        test += _defect_samples(abnormal_dir, mask_dir, problems)
    return DatasetIndex(f"folder/{normal_dir.name}", train, test, problems)


def _defect_samples(defect_dir, mask_dir, problems: list[str]) -> list[TestSample]:
    defect_dir = _require_dir(Path(defect_dir), "defect image folder")
    problems += _non_image_problems(defect_dir, recursive=True)
    masks = _mask_index(_require_dir(Path(mask_dir), "mask folder")) if mask_dir is not None else {}
    return [TestSample(img, 1, masks.get(img.stem), img.parent.name if img.parent != defect_dir else "defect")
            for img in list_images(defect_dir, recursive=True)]


def scan_test_folders(good: Path | str | None, defect: Path | str | None = None,
                      masks: Path | str | None = None) -> DatasetIndex:
    """A test split from plain folders (``destseg test --good DIR --defect DIR [--masks DIR]``): good images,
    defect images (each subfolder name is its defect type), and optional masks matched by stem. Either
    folder may be missing (None), not both."""
    if masks is not None and defect is None:
        raise DatasetError("--masks needs --defect: masks belong to defect images")
    if good is None and defect is None:
        raise DatasetError("a test split needs --good DIR and/or --defect DIR")
    problems: list[str] = []
    test: list[TestSample] = []
    if good is not None:
        folder = _require_dir(Path(good), "good image folder (--good)")
        problems += _non_image_problems(folder, recursive=True)
        test += [TestSample(p, 0, None, "good") for p in list_images(folder, recursive=True)]
    if defect is not None:
        test += _defect_samples(defect, masks, problems)
    name = Path(defect if defect is not None else good).name
    return DatasetIndex(f"folders/{name}", [], test, problems, test_only=True)


def looks_like_layout(folder: Path) -> str | None:
    """Why ``folder`` looks like a benchmark dataset (MVTec layout) rather than a plain folder of good
    images, or None: training on all its images would train on its defect images too."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return (f"{folder} holds train/ and test/ folders (a category of an MVTec-layout dataset): pass "
                f"--data {folder.parent} --category {folder.name}, or point --data at a folder of good images only")
    categories = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "train").is_dir())
    if categories:
        return (f"{folder} is a dataset root with categories {', '.join(categories[:8])}"
                f"{'...' if len(categories) > 8 else ''}: pass --category NAME, or point --data at a folder of "
                "good images only")
    if (folder / "split_csv" / "1cls.csv").is_file():
        return f"{folder} is a VisA dataset root: pass --category NAME"
    return None


def scan_dataset(root: Path | str, category: str, layout: str = "auto") -> DatasetIndex:
    root = Path(root)
    if layout == "auto":
        layout = "visa" if (root / "split_csv" / "1cls.csv").is_file() else "mvtec"
    if layout in ("mvtec", "mpdd", "btad"):
        return scan_mvtec(root, category, name=layout)
    if layout == "visa":
        return scan_visa(root, category)
    raise DatasetError(f"unknown dataset layout '{layout}' (expected mvtec, mpdd, btad, visa or auto)")


def validate(index: DatasetIndex, check_pixels: bool = True) -> DatasetIndex:
    """Open every file and add what is wrong to ``index.problems`` (in place; also returned)."""
    problems = index.problems
    if not index.train and not index.test_only:
        problems.append(f"{index.name}: training folder has no images")
    if check_pixels:
        for path in index.train:
            try:
                index.gray_train[path] = is_grayscale(np.asarray(read_rgb(path))[None])
            except ImageError as exc:
                problems.append(str(exc))
        for s in index.test:
            try:
                w, h = read_rgb(s.path).size
            except ImageError as exc:
                problems.append(str(exc))
                continue
            if s.mask is None:
                continue
            try:
                mh, mw = read_mask(s.mask).shape
            except ImageError as exc:
                problems.append(str(exc))
                continue
            # Same size, or the same aspect ratio (masks are resized to the model input anyway, and some
            # datasets ship pre-resized images beside full-size masks): anything else is a wrong pairing.
            if (mw, mh) != (w, h) and abs(mw * h - mh * w) > max(mw, w):
                problems.append(f"{s.mask}: mask is {mw}x{mh} but its image {s.path.name} is {w}x{h} "
                                "(different aspect ratio)")
    return index


@dataclass
class DataSource:
    """Where a run's data comes from (recorded in the run config): a dataset root, a category and a layout,
    or (``layout="folder"``) a plain folder of good images, every image under it (recursively) for training
    and no test split (``category`` empty: no category-specific settings)."""

    root: str
    category: str = ""
    layout: str = "auto"

    def scan(self) -> DatasetIndex:
        if self.layout == "folder":
            return scan_folder(self.root)
        return scan_dataset(self.root, self.category, self.layout)

    @classmethod
    def folder(cls, path: Path | str) -> "DataSource":
        """A plain folder of good images; refused (with what to pass instead) where it is a dataset root."""
        path = _require_dir(Path(path), "good image folder (--data)")
        why = looks_like_layout(path)
        if why:
            raise DatasetError(why)
        return cls(str(path), "", "folder")


@dataclass
class TestFolders:
    """A test split from plain folders: good images, defect images and (optional) masks."""

    good: str | None = None
    defect: str | None = None
    masks: str | None = None

    def scan(self) -> DatasetIndex:
        return scan_test_folders(self.good, self.defect, self.masks)


# ------------------------------------------------------------------------------------------ torch datasets

def shape_note(paths: list[Path], size) -> tuple[str, str | None]:
    """(the training images' typical size, a note when their aspect ratio is far from the model input's):
    images are resized without a crop, so a 2:1 frame into a square input is squashed 2x in width. Reads
    image headers only."""
    def size_of(path):
        with Image.open(path) as im:
            return im.size  # (width, height)

    sizes = np.array([size_of(p) for p in paths], dtype=np.float64)
    w, h = (int(v) for v in np.median(sizes, axis=0))
    distinct = len({tuple(s) for s in sizes.astype(int).tolist()})
    typical = f"{w}x{h}" + (f" (median of {distinct} different sizes)" if distinct > 1 else "")
    mh, mw = hw(size)
    stretch = (w / h) / (mw / mh)
    if max(stretch, 1 / stretch) < 1.3:
        return typical, None
    new_h = max(32, round(np.sqrt(mh * mw * h / w) / 32) * 32)
    new_w = max(32, round(new_h * w / h / 32) * 32)
    factor = max(stretch, 1 / stretch)
    return typical, (f"the training images are {typical}, width/height {w / h:.2f}, but the model input is "
                     f"{mw}x{mh} ({mw / mh:.2f}): resizing without a crop distorts them {factor:.1f}x; "
                     f"--image-size {new_h} {new_w} (height width) keeps their shape at about the same cost")


def train_color(gray_flags: list[bool]) -> str:
    """Whether the training images are grayscale (one flag per image), in words, with what
    ``--anomaly-color auto`` makes of it."""
    gray = sum(gray_flags)
    if gray == len(gray_flags):
        return f"grayscale (all {gray} training images): --anomaly-color auto blends gray anomalies"
    if gray:
        return f"mixed ({gray} of {len(gray_flags)} training images grayscale): --anomaly-color auto keeps colour anomalies"
    return "colour"


class TestDataset(torch.utils.data.Dataset):
    """Test images with labels and ground-truth masks at ``size`` (the rule in docs/REFERENCE.md), loaded lazily."""

    def __init__(self, samples: list[TestSample], size, normalize: Normalize):
        self.samples, self.size, self.normalize = list(samples), size, normalize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        img = resize_rgb(read_rgb(s.path), self.size).astype(np.float32) / 255.0
        if s.mask is not None:
            mask = resize_mask(read_mask(s.mask), self.size)
        else:
            mask = np.zeros(hw(self.size), dtype=bool)
        return {"image": self.normalize.hwc(img), "mask": torch.from_numpy(mask),
                "label": s.label, "index": i}


