"""Training a model into a run directory: options, the choices the library makes for them (schedule,
rotation, anomaly colour, synthesis, precision), the image split, and the good-image thresholds at the end.

A model provides ``stages(n_train)`` and ``training_loss(stage, batch)``; the step loop is in
:mod:`destseg.loop`, the run directory in :mod:`destseg.run`, the process group in :mod:`destseg.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from destseg.data.datasets import CATEGORY_ROTATION, DataSource, DatasetIndex, TestDataset, TestSample, shape_note
from destseg.data.device_synthesis import DeviceAugment, texture_bank
from destseg.data.images import is_grayscale
from destseg.data.synthesis import AnomalySynthesizer
from destseg.data.training import TrainDataset, load_resized
from destseg.distributed import Dist, barrier, init_distributed
from destseg.dtd import resolve_texture_dir
from destseg.device import autocast_dtype, default_workers, describe_device, prepare_model, resolve_device
from destseg.errors import DestsegError
from destseg.loop import Loop, TrainingInterrupted
from destseg.memory import heap_kept
from destseg.models import DEFAULT_MODEL, build_model, check_config, model_class, model_config
from destseg.models.backbones import backbone_spec
from destseg.run import Run, training_summary
from destseg.schedules import resolve_schedule_name, schedule_overrides
from destseg.scoring import score_images

__all__ = ["DataSource", "TrainOptions", "TrainingInterrupted", "check_options", "train"]


@dataclass
class TrainOptions:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp32
    num_workers: int = -1  # -1: chosen from the CPU count
    texture_dir: str | None = None  # anomaly sources; None: built-in generator
    rotation: str | None = None  # none | small | rot90; None: the category's default from the paper
    anomaly_color: str = "auto"  # rgb | gray (luminance of the textures); auto: gray for grayscale training images
    checkpoint_every: int = 200  # steps
    checkpoint_minutes: float = 10.0  # also after this much wall time since the last one (single process); 0: off
    log_every: int = 10
    teacher_weights: str | None = None
    progress: bool = True
    schedule: str | None = None  # auto | paper | cpu | a JSON file; applied when train() builds the config
    time_budget_s: float | None = None  # wall-time cap: stage k ends by its cumulative share of it
    synthesis: str = "auto"  # cpu: per sample in NumPy; device: batched on the training device; auto: device on CUDA
    threshold_holdout: float = 0.1  # share of the train images kept aside for the good-image threshold
    threshold_fpr: float = 0.01  # false-positive rate of that threshold


def check_options(o: TrainOptions) -> TrainOptions:
    """Refuse option values that cannot work, naming the flag."""
    rules = [("seed", isinstance(o.seed, int) and 0 <= o.seed < 2**32, "an integer in [0, 2^32)"),
             ("threshold_holdout", 0 <= o.threshold_holdout <= 0.5, "in [0, 0.5]"),
             ("threshold_fpr", 0 < o.threshold_fpr < 1, "in (0, 1)"),
             ("checkpoint_every", o.checkpoint_every >= 1, "at least 1"),
             ("checkpoint_minutes", o.checkpoint_minutes >= 0, "0 (off) or more"),
             ("log_every", o.log_every >= 1, "at least 1"),
             ("num_workers", o.num_workers >= -1, "-1 (automatic) or more")]
    for field, ok, rule in rules:
        if not ok:
            flag = "--workers" if field == "num_workers" else "--" + field.replace("_", "-")
            raise DestsegError(f"{flag} must be {rule} (got {getattr(o, field)!r})")
    choices = {"rotation": ("none", "small", "rot90"), "anomaly_color": ("auto", "rgb", "gray"),
               "synthesis": ("auto", "cpu", "device"), "precision": ("auto", "bf16", "fp32")}
    for field, allowed in choices.items():
        value = getattr(o, field)
        if value not in allowed and not (field == "rotation" and value is None):
            raise DestsegError(f"--{field.replace('_', '-')} must be {', '.join(allowed[:-1])} or {allowed[-1]} "
                               f"(got {value!r})")
    if o.texture_dir not in (None, "dtd") and not Path(o.texture_dir).is_dir():
        raise DestsegError(f"--texture-dir {o.texture_dir}: folder not found")
    return o


# ------------------------------------------------------------------------------------- what trains on what

@dataclass
class Split:
    """The training images, a model's own validation images, and the good images held out for thresholds."""

    train: list[Path]
    validation: list[Path]
    threshold: list[Path]


def _hold_out(paths: list[Path], share: float, seed: int) -> tuple[list[Path], list[Path]]:
    if share <= 0:
        return paths, []
    n_val = max(1, int(round(share * len(paths))))
    if n_val >= len(paths):
        raise DestsegError(f"{len(paths)} training images are too few to hold out {share:.0%} for validation")
    perm = np.random.default_rng([seed, 7]).permutation(len(paths))
    val = set(perm[:n_val].tolist())
    return [p for i, p in enumerate(paths) if i not in val], [p for i, p in enumerate(paths) if i in val]


def split_images(paths: list[Path], validation_share: float, options: TrainOptions) -> Split:
    """Good images for the decision threshold: half of the model's validation images where it has them (the
    other half picks its best weights: images that chose the weights score low on them, so they would bias the
    threshold), else a seeded hold-out of ``--threshold-holdout`` (none with fewer than 10 images)."""
    train_paths, val_paths = _hold_out(paths, validation_share, options.seed)
    threshold_paths: list[Path] = []
    if len(val_paths) >= 2:
        keep = (len(val_paths) + 1) // 2
        val_paths, threshold_paths = val_paths[:keep], val_paths[keep:]
    if not threshold_paths and options.threshold_holdout > 0 and len(train_paths) >= 10:
        train_paths, threshold_paths = _hold_out(train_paths, options.threshold_holdout, options.seed + 1)
    return Split(train_paths, val_paths, threshold_paths)


def resolve_config(model_name: str, overrides: dict, schedule: str | None, device: torch.device, paths: list[Path],
                   options: TrainOptions):
    """(config, schedule in words, split): the schedule's overrides for the images that will really train
    (after the hold-outs), under the explicitly given ``overrides``."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    split = split_images(paths, _validation_share(model_name, overrides), options)
    name = resolve_schedule_name(schedule or "auto", device.type)
    scheduled, words = schedule_overrides(name, model_name, len(split.train))
    config = model_config(model_name, explicit=frozenset(overrides), **{**scheduled, **overrides})
    if overrides:  # what was trained: the flags given win over the schedule's values
        words += "; set by flags: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(overrides.items()))
    return config, words, split


def _validation_share(model_name: str, overrides: dict) -> float:
    """The model's hold-out share from the explicit fields (no schedule sets it)."""
    cls = model_class(model_name).Config
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in overrides.items() if k in known}).validation_share
    except (TypeError, ValueError):
        return model_config(model_name, **overrides).validation_share  # the clear error, naming the flag


def synthesis_on_device(choice: str, device: torch.device) -> bool:
    """--synthesis (checked in :func:`check_options`): device, or auto on CUDA."""
    return choice == "device" or (choice == "auto" and device.type == "cuda")


def resolve_anomaly_color(choice: str, images_u8) -> tuple[bool, str]:
    """(gray, why): --anomaly-color, or auto: gray anomalies when every training image is grayscale."""
    if choice != "auto":
        return choice == "gray", "--anomaly-color"
    if is_grayscale(images_u8):
        return True, (f"auto: all {len(images_u8)} training images are grayscale, so the anomaly textures are "
                      "turned grayscale too (--anomaly-color rgb keeps their colours)")
    return False, "auto: colour training images"


def resolve_rotation(category: str, config, options: TrainOptions) -> tuple[str, str]:
    """(rotation, why): the --rotation flag, else the category's setting from the paper (none for a model whose
    references do not augment, ``category_rotation=False``), else none for a category the library does not know."""
    if options.rotation:
        return options.rotation, "--rotation"
    if not config.category_rotation:
        return "none", "this model trains without augmentation (category_rotation=False)"
    if category in CATEGORY_ROTATION:
        return CATEGORY_ROTATION[category], f"the paper's setting for category '{category}'"
    if not category:
        return "none", ("a plain folder of good images: no rotation augmentation by default (parts that come in "
                        "any orientation train better with --rotation rot90)")
    return "none", (f"unknown category '{category}': no rotation augmentation by default "
                    "(choose one with --rotation none|small|rot90)")


def precision_in_words(device: torch.device, dtype, asked: str) -> str:
    """What ``--precision`` resolved to on this device, e.g. 'bf16 autocast (--precision auto)'."""
    if dtype is not None:
        return f"bf16 autocast (--precision {asked})"
    return f"fp32{' with TF32' if device.type == 'cuda' else ''} (--precision {asked})"


def anomaly_source_in_words(synthesis: bool, texture_dir) -> str:
    if not synthesis:
        return "none (this model trains on normal images only)"
    if texture_dir:
        return f"textures from {texture_dir}"
    return ("WARNING: built-in procedural textures (the offline fallback; the paper uses DTD: "
            "--texture-dir dtd downloads it once, or pass a folder of texture images)")


def check_per_process_batch(stages, batch_size: int, world_size: int) -> None:
    """--batch-size (and a stage's own batch size) is global: each process must get a whole, large enough share
    of it for every stage."""
    for stage in stages:
        batch = stage.batch_size or batch_size
        what = f"--batch-size {batch}" if batch == batch_size else f"the {stage.name} stage's batch size {batch}"
        if batch % world_size:
            raise DestsegError(f"{what} (global) is not divisible by the {world_size} processes")
        if batch // world_size < stage.min_batch:
            raise DestsegError(
                f"{what} leaves {batch // world_size} image per step to each of {world_size} process(es); the "
                f"{stage.name} stage needs at least {stage.min_batch} per process: use "
                f"{'--batch-size' if batch == batch_size else 'a batch size of'} {stage.min_batch * world_size} "
                "or more")


# ------------------------------------------------------------------------------------------- training

def train(run_dir: Path | str, model_name: str | None = None, config=None, data: DataSource | None = None,
          index: DatasetIndex | None = None, options: TrainOptions | None = None, resume: bool = False,
          overwrite: bool = False, overrides: dict | None = None) -> Path:
    """Train ``model_name`` on ``data`` (or a pre-scanned ``index``) into ``run_dir``.

    The config is ``config`` as given, or else built from ``options.schedule`` (auto: cpu on a CPU, paper on a
    GPU) for the images that will train, under the explicit field values in ``overrides``. With ``resume``
    the run's own config and checkpoint are used and training continues from the last saved step. Returns
    the checkpoint path. Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM.
    """
    run = Run(run_dir)
    dist = init_distributed((options or TrainOptions()).device)
    if dist.main:
        run.prepare(resume, overwrite)
    barrier(dist)
    ckpt = None
    if resume:
        model_name, config, options, data, ckpt = _saved_run(run, options, data)
    options = check_options(options or TrainOptions())
    model_name = model_name or DEFAULT_MODEL
    if config is not None and (overrides or options.schedule):
        raise DestsegError("train(): give either a config, or a schedule and overrides, not both")
    if index is None:
        if data is None:
            raise DestsegError("train() needs a data source or a dataset index")
        index = data.scan()
    if not index.train:
        raise DestsegError(f"{index.name}: the training folder has no images")
    device = resolve_device(options.device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    config, schedule_words, split = _config_and_split(run, model_name, config, overrides, options, device,
                                                      index.train, resume)
    dtype = autocast_dtype(device, options.precision)
    torch.manual_seed(options.seed)  # weight initialisation
    model = build_model(model_name, config, teacher_weights=options.teacher_weights, pretrained=ckpt is None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
    model = prepare_model(model, device, dtype)
    stages = model.stages(len(split.train))
    check_per_process_batch(stages, config.batch_size, dist.world_size)
    category = data.category if data else index.name.split("/")[-1]
    setup = _TrainingData(config, options, device, stages, split, category, dist)
    resolved = {"schedule": schedule_words, **setup.resolved, "device": str(device),
                "hardware": describe_device(device), "precision": precision_in_words(device, dtype, options.precision)}
    if dist.main:
        run.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            run.write_config(model_name, config, data, dataclasses.asdict(options), resolved)
            _announce(run, resolved)
        print(f"destseg: plan: {plan_in_words(stages, config.batch_size, len(split.train))}", file=sys.stderr)

    loop = Loop(run, model_name, model, config, options, device, dtype, dist, ckpt)
    try:
        with heap_kept():
            loop.run(stages, setup.train_dataset(), setup.workers, setup.augment(), setup.validation_dataset())
        if dist.main:
            thresholds = _thresholds(run, model, split, config, device, dtype, options.threshold_fpr)
            run.write_thresholds(thresholds)
            loop.log({"step": loop.step, "thresholds": thresholds})
            _record_training(run, loop)
    finally:
        loop.close()
    barrier(dist)
    return run.checkpoint_path


def _config_and_split(run: Run, model_name: str, config, overrides, options: TrainOptions, device, paths,
                      resume: bool):
    """(config, its schedule in words, the image split): a given (or resumed) config as it is, else the
    schedule's for the images that will train, under the explicit ``overrides``."""
    if config is None:
        return resolve_config(model_name, overrides or {}, options.schedule, device, paths, options)
    if resume:
        words = run.record["resolved"].get("schedule", "as resumed")
    else:
        config, words = check_config(config), "the config given"
    return config, words, split_images(paths, config.validation_share, options)


class _TrainingData:
    """The training images and what the library resolved about them: rotation, anomaly source and colour,
    where synthesis runs; and the datasets (and device-side augmentation) built from them."""

    def __init__(self, config, options: TrainOptions, device, stages, split: Split, category: str, dist: Dist):
        self.config, self.options, self.device, self.split = config, options, device, split
        self.spec = backbone_spec(config.teacher)
        self.rotation, rotation_why = resolve_rotation(category, config, options)
        self.synthesis = any(s.needs_synthesis for s in stages)
        self.texture_dir = resolve_texture_dir(options.texture_dir, progress=options.progress and dist.main) \
            if self.synthesis else None
        self.on_device = synthesis_on_device(options.synthesis, device)
        self.images = load_resized(split.train, config.image_size)
        self.gray, gray_why = resolve_anomaly_color(options.anomaly_color, self.images) if self.synthesis \
            else (False, "no synthesis")
        typical_size, shape_why = shape_note(split.train, config.image_size)
        self.workers = default_workers(device) if options.num_workers < 0 else options.num_workers
        self.resolved = {
            "rotation": self.rotation, "rotation_source": rotation_why,
            "anomaly_source": anomaly_source_in_words(self.synthesis, self.texture_dir),
            "anomaly_color": ("gray" if self.gray else "rgb") if self.synthesis else "none",
            "anomaly_color_source": gray_why,
            "synthesis": "batched on " + device.type if self.on_device else "per sample on the CPU (NumPy)",
            "train_images": len(split.train), "train_image_size": typical_size, "shape_note": shape_why,
            "threshold_images": len(split.threshold) or len(split.train),
            "threshold_images_source": "held out of training" if split.threshold else
            "the training images themselves ("
            + ("--threshold-holdout 0" if options.threshold_holdout <= 0 else "too few to hold any out")
            + "): optimistic"}

    def train_dataset(self) -> TrainDataset:
        c = self.config
        if self.on_device:
            return TrainDataset(self.split.train, c.image_size, self.spec.normalize, self.rotation, images=self.images,
                                raw=True)
        synth = AnomalySynthesizer(c.image_size, self.texture_dir, gray=self.gray) if self.synthesis else None
        return TrainDataset(self.split.train, c.image_size, self.spec.normalize, self.rotation, synth, images=self.images)

    def augment(self) -> DeviceAugment | None:
        """Batched augmentation and synthesis on the training device (``--synthesis device``), else None."""
        if not self.on_device:
            return None
        textures = texture_bank(self.config.image_size, self.texture_dir, seed=self.options.seed, gray=self.gray) \
            if self.synthesis else None
        self.workers = 0 if self.options.num_workers < 0 else self.workers  # nothing left to do on the CPU
        return DeviceAugment(self.config.image_size, self.spec.normalize, self.rotation, textures, self.device)

    def validation_dataset(self) -> TestDataset | None:
        if not self.split.validation:
            return None
        return TestDataset([TestSample(p, 0, None, "good") for p in self.split.validation], self.config.image_size,
                           self.spec.normalize)


def plan_in_words(stages, batch_size: int, n_train: int) -> str:
    """'student 600 steps of 16 images + segmentation 600 steps of 8 = 1200 steps on 188 training images'."""
    parts = [f"{s.name} {s.steps} steps of {s.batch_size or batch_size} images" for s in stages]
    total = sum(s.steps for s in stages)
    return (" + ".join(parts) + (f" = {total} steps" if len(stages) > 1 else "")
            + f" on {n_train} training images; the expected time follows after the first steps")


def _saved_run(run: Run, options: TrainOptions | None, data: DataSource | None):
    """(model name, config, options, data source, checkpoint) of the run to resume; only the progress-bar
    choice comes from the caller."""
    saved = run.record
    model_name = saved["model"]
    config = run.config
    saved_options = dict(saved["options"])
    saved_options.setdefault("anomaly_color", "rgb")  # runs started before the option: colour anomalies
    if saved_options.get("schedule") not in (None, "auto", "paper", "cpu") and not str(
            saved_options.get("schedule")).endswith(".json"):
        saved_options["schedule"] = None  # an earlier version recorded the schedule in words here
    given = options
    options = TrainOptions(**{**saved_options, **({"progress": given.progress} if given else {})})
    options.schedule = None  # the saved config is used as it is
    if given is not None and given.time_budget_s and given.time_budget_s != options.time_budget_s:
        was = "none" if not options.time_budget_s else f"{options.time_budget_s / 60:g} min"
        print(f"destseg: note: --time-budget {given.time_budget_s / 60:g} min for this run from now on (was {was}); "
              "the time already spent counts against it", file=sys.stderr)
        options.time_budget_s = given.time_budget_s
        run.update_record(options={**saved["options"], "time_budget_s": given.time_budget_s})
    data = run.data or data
    ckpt = run.checkpoint(expected_model=model_name)
    if ckpt.get("finished"):
        raise DestsegError(f"{run.path}: training already finished; nothing to resume")
    return model_name, config, options, data, ckpt


def _announce(run: Run, resolved: dict) -> None:
    """The choices a user should see on stderr, and the train.log header."""
    if resolved["rotation_source"].startswith(("unknown", "a plain folder")):
        print(f"destseg: note: {resolved['rotation_source']}", file=sys.stderr)
    if resolved["anomaly_color_source"].startswith("auto: all"):
        print(f"destseg: note: {resolved['anomaly_color_source']}", file=sys.stderr)
    if resolved["shape_note"]:
        print(f"destseg: note: {resolved['shape_note']}", file=sys.stderr)
    if resolved["anomaly_source"].startswith("WARNING"):
        print(f"destseg: {resolved['anomaly_source']}", file=sys.stderr)
    with open(run.path / "train.log", "a") as f:
        f.write(json.dumps({"resolved": resolved, "schedule": resolved["schedule"]}) + "\n")


def _thresholds(run: Run, model, split: Split, config, device, dtype, fpr: float) -> dict:
    """Thresholds at false-positive rate ``fpr`` from the final model's scores of good images, which are kept
    in RUN/calibration.json (for recalibration and the drift check)."""
    held_out = bool(split.threshold)
    paths = split.threshold or split.train
    dataset = TestDataset([TestSample(p, 0, None, "good") for p in paths], config.image_size,
                          backbone_spec(config.teacher).normalize)
    scores, maps = score_images(model, dataset, device, dtype, config.batch_size)
    what = "good training images held out of training" if held_out else "training images (seen in training)"
    thresholds = run.calibrate(paths, scores, maps, fpr, what, unseen=held_out)
    return {**thresholds, "engine": f"torch {'fp32' if dtype is None else 'bf16'}"}  # the scorer they are true of


def _record_training(run: Run, loop: Loop) -> None:
    """config.json's ``training`` block: the steps each stage planned and trained; a line on stderr when the
    time budget cut the run below its plan."""
    summary = training_summary({"stages": list(loop.records.values()), "step": loop.step, "finished": True})
    run.update_record(training={**summary, "elapsed_s": round(time.time() - loop.t_start, 1)})
    if summary["steps_trained"] < summary["steps_planned"]:
        kind = "UNDERTRAINED: " if summary["undertrained"] else ""
        tqdm.write(f"destseg: {kind}trained {summary['steps_trained']} of {summary['steps_planned']} planned steps "
                   f"({summary['steps_trained'] / summary['steps_planned']:.0%}; "
                   + ", ".join(f"{s['name']} {s['trained']}/{s['planned']}" for s in summary["stages"])
                   + ") within --time-budget", file=sys.stderr)
