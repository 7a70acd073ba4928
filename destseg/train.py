"""The one training loop shared by every model.

A model provides ``stages(n_train)`` (which parameters learn, at what rates, for how many steps) and
``training_loss(stage, batch)``; this module does the rest: data, precision, SGD, progress, logging,
checkpoints, interruption and resume. Run directory layout::

    RUN/config.json     model name and config, data source, training options
    RUN/checkpoint.pt   the one self-describing checkpoint (latest state; final weights when finished)
    RUN/train.log       one JSON line per logged step
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from destseg import __version__
from destseg.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from destseg.data import AnomalySynthesizer, StepSampler, TrainDataset
from destseg.data.datasets import (
    CATEGORY_ROTATION, DataSource, DatasetIndex, TestDataset, TestSample, load_resized, seed_worker, shape_note,
)
from destseg.data.device_synthesis import DeviceAugment, texture_bank
from destseg.data.synthesis import is_grayscale
from destseg.dtd import resolve_texture_dir
from destseg.device import (
    autocast, autocast_dtype, default_workers, describe_device, prepare_model, resolve_device, to_device,
)
from destseg.errors import DestsegError
from destseg.models import MODELS, build_model, check_config, has_segmentation_stage, model_config
from destseg.models.backbones import backbone_spec
from destseg.models.common import fold_batchnorm
from destseg.thresholds import fpr_thresholds, score_good_images, write_thresholds


class TrainingInterrupted(DestsegError):
    """Raised after a signal stopped training and a resumable checkpoint was written."""


@dataclass
class TrainOptions:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp32
    num_workers: int = -1  # -1: chosen from the CPU count
    texture_dir: str | None = None  # anomaly sources; None: built-in generator
    rotation: str | None = None  # none | small | rot90; None: the category's SPEC default
    anomaly_color: str = "auto"  # rgb | gray (luminance of the textures); auto: gray for grayscale training images
    checkpoint_every: int = 200  # steps
    checkpoint_minutes: float = 10.0  # also after this much wall time since the last one (single process); 0: off
    log_every: int = 10
    teacher_weights: str | None = None
    progress: bool = True
    schedule: str | None = None  # how the config's schedule was chosen, in words (recorded)
    time_budget_s: float | None = None  # wall-time cap: each stage stops when its share is used
    synthesis: str = "auto"  # cpu: per sample in NumPy; device: batched on the training device; auto: device on CUDA
    threshold_holdout: float = 0.1  # share of the train images kept aside for the good-image threshold
    threshold_fpr: float = 0.01  # false-positive rate of that threshold


# ------------------------------------------------------------------------------------------ distributed

@dataclass
class Dist:
    """Process group facts. Under torchrun (WORLD_SIZE > 1) training is data-parallel: --batch-size is the
    GLOBAL batch, each process takes batch_size / world_size samples of every step's batch."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), local_rank, dist.get_world_size())


def _all_reduce(values: list[float], d: Dist) -> list[float]:
    if not d.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------- run config

def write_run_config(run_dir: Path, model_name: str, config, data: DataSource | None, options: TrainOptions,
                     resolved: dict | None = None):
    """``resolved``: what the options left to the library and what it chose (rotation, threshold images)."""
    payload = {"library_version": __version__, "model": model_name, "config": dataclasses.asdict(config),
               "data": dataclasses.asdict(data) if data else None, "options": dataclasses.asdict(options),
               "resolved": resolved or {}}
    atomic_write_text(run_dir / "config.json", json.dumps(payload, indent=2) + "\n")


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DestsegError(f"{run_dir}: not a run directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DestsegError(f"{path}: invalid JSON ({exc})") from None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Existing results are never replaced unless asked: --resume continues, --overwrite starts anew."""
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise DestsegError(f"{run_dir}: nothing to resume (no checkpoint.pt)")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise DestsegError(f"{run_dir}: run directory exists and is not empty; pass --resume to continue "
                               "it or --overwrite to replace it")
        for name in ("checkpoint.pt", "train.log", "metrics.json", "thresholds.json", "config.json"):
            (run_dir / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- training

class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _split_validation(paths: list[Path], share: float, seed: int) -> tuple[list[Path], list[Path]]:
    if share <= 0:
        return paths, []
    n_val = max(1, int(round(share * len(paths))))
    if n_val >= len(paths):
        raise DestsegError(f"{len(paths)} training images are too few to hold out {share:.0%} for validation")
    perm = np.random.default_rng([seed, 7]).permutation(len(paths))
    val = set(perm[:n_val].tolist())
    return [p for i, p in enumerate(paths) if i not in val], [p for i, p in enumerate(paths) if i in val]


@torch.no_grad()
def mean_map(model, loader, device, dtype) -> float:
    total, count = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            m = model(batch["image"])["map"].float()
        total += float(m.sum())
        count += m.numel()
    return total / max(count, 1)


def train(run_dir: Path | str, model_name: str, config=None, data: DataSource | None = None,
          index: DatasetIndex | None = None, options: TrainOptions | None = None, resume: bool = False,
          overwrite: bool = False) -> Path:
    """Train ``model_name`` on ``data`` (or a pre-scanned ``index``) into ``run_dir``.

    With ``resume`` the run's own config and checkpoint are used and training continues from the last
    saved step. Returns the checkpoint path. Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM.
    """
    run_dir = Path(run_dir)
    dist_info = init_distributed((options or TrainOptions()).device)
    if dist_info.main:
        check_run_dir(run_dir, resume, overwrite)
    _barrier(dist_info)
    ckpt = None
    if resume:
        model_name, config, options, data, ckpt = _saved_run(run_dir, options, data)
    options = check_options(options or TrainOptions())
    config = check_config(config or model_config(model_name))
    if index is None:
        if data is None:
            raise DestsegError("train() needs a data source or a dataset index")
        index = data.scan()
    if not index.train:
        raise DestsegError(f"{index.name}: the training folder has no images")

    device = resolve_device(options.device)
    if dist_info.active and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    check_per_process_batch(config, dist_info.world_size)
    dtype = autocast_dtype(device, options.precision)
    torch.manual_seed(options.seed)  # weight initialisation
    model = build_model(model_name, config, teacher_weights=options.teacher_weights, pretrained=ckpt is None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
    model = prepare_model(model, device, dtype)
    spec = backbone_spec(config.teacher)
    train_paths, val_paths = _split_validation(index.train, getattr(config, "val_split", 0.0), options.seed)
    # Good images for the decision threshold: STFPM's validation images, else a seeded hold-out.
    threshold_paths = val_paths
    if not threshold_paths and options.threshold_holdout > 0 and len(train_paths) >= 10:
        train_paths, threshold_paths = _split_validation(train_paths, options.threshold_holdout, options.seed + 1)
    stages = model.stages(len(train_paths))
    category = data.category if data else index.name.split("/")[-1]
    rotation, rotation_why = resolve_rotation(category, config, options)
    synthesis = any(s.needs_synthesis for s in stages)
    texture_dir = resolve_texture_dir(options.texture_dir, progress=options.progress and dist_info.main) \
        if synthesis else None
    on_device = synthesis_on_device(options.synthesis, device)
    images = load_resized(train_paths, config.image_size)
    gray, gray_why = resolve_anomaly_color(options.anomaly_color, images) if synthesis else (False, "no synthesis")
    typical_size, shape_why = shape_note(train_paths, config.image_size)
    resolved = {"rotation": rotation, "rotation_source": rotation_why,
                "anomaly_source": _anomaly_source(synthesis, texture_dir),
                "anomaly_color": ("gray" if gray else "rgb") if synthesis else "none",
                "anomaly_color_source": gray_why,
                "synthesis": "batched on " + device.type if on_device else "per sample on the CPU (NumPy)",
                "device": str(device), "hardware": describe_device(device),
                "precision": _precision_in_words(device, dtype, options.precision),
                "train_images": len(train_paths), "train_image_size": typical_size, "shape_note": shape_why,
                "threshold_images": len(threshold_paths) or len(train_paths),
                "threshold_images_source": "held out of training" if threshold_paths else
                "the training images themselves (too few to hold any out): optimistic"}
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            _start_run_files(run_dir, model_name, config, data, options, resolved)

    augment = None
    if on_device:
        textures = texture_bank(config.image_size, texture_dir, seed=options.seed, gray=gray) if synthesis else None
        augment = DeviceAugment(config.image_size, spec.mean, spec.std, rotation, textures, device)
        train_ds = TrainDataset(train_paths, config.image_size, spec.mean, spec.std, rotation, images=images,
                                raw=True)
    else:
        synth = AnomalySynthesizer(config.image_size, texture_dir, gray=gray) if synthesis else None
        train_ds = TrainDataset(train_paths, config.image_size, spec.mean, spec.std, rotation, synth, images=images)
    workers = default_workers(device) if options.num_workers < 0 else options.num_workers
    val_loader = None
    if val_paths:
        val_ds = TestDataset([TestSample(p, 0, None, "good") for p in val_paths], config.image_size, spec.mean, spec.std)
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=config.batch_size, num_workers=workers)
    train_workers = 0 if on_device and options.num_workers < 0 else workers  # nothing left to do on the CPU

    loop = _Loop(run_dir, model_name, model, config, options, device, dtype, dist_info, ckpt)
    try:
        loop.run(stages, train_ds, train_workers, augment, val_loader)
        if dist_info.main:
            thresholds = good_image_thresholds(model, threshold_paths or train_paths, config, spec, device,
                                               dtype, options.threshold_fpr, bool(threshold_paths))
            write_thresholds(run_dir, thresholds)
            loop.log({"step": loop.step, "thresholds": thresholds})
    finally:
        loop.close()
    _barrier(dist_info)
    return run_dir / "checkpoint.pt"


def _saved_run(run_dir: Path, options: TrainOptions | None, data: DataSource | None):
    """(model name, config, options, data source, checkpoint) of the run to resume; only the progress-bar
    choice comes from the caller."""
    saved = read_run_config(run_dir)
    model_name = saved["model"]
    config = model_config(model_name, **saved["config"])
    saved["options"].setdefault("anomaly_color", "rgb")  # runs started before the option: colour anomalies
    options = TrainOptions(**{**saved["options"], **({"progress": options.progress} if options else {})})
    data = DataSource(**saved["data"]) if saved["data"] else data
    ckpt = load_checkpoint(run_dir / "checkpoint.pt", expected_model=model_name)
    if ckpt.get("finished"):
        raise DestsegError(f"{run_dir}: training already finished; nothing to resume")
    return model_name, config, options, data, ckpt


def _precision_in_words(device: torch.device, dtype, asked: str) -> str:
    """What ``--precision`` resolved to on this device, e.g. 'bf16 autocast (--precision auto)'."""
    if dtype is not None:
        return f"bf16 autocast (--precision {asked})"
    return f"fp32{' with TF32' if device.type == 'cuda' else ''} (--precision {asked})"


def _anomaly_source(synthesis: bool, texture_dir) -> str:
    if not synthesis:
        return "none (this model trains on normal images only)"
    if texture_dir:
        return f"textures from {texture_dir}"
    return ("WARNING: built-in procedural textures (the offline fallback; the paper uses DTD: "
            "--texture-dir dtd downloads it once, or pass a folder of texture images)")


def _start_run_files(run_dir: Path, model_name: str, config, data, options: TrainOptions, resolved: dict) -> None:
    """config.json, the train.log header, and the choices a user should see on stderr."""
    write_run_config(run_dir, model_name, config, data, options, resolved)
    if resolved["rotation_source"].startswith("unknown"):
        print(f"destseg: note: {resolved['rotation_source']}", file=sys.stderr)
    if resolved["anomaly_color_source"].startswith("auto: all"):
        print(f"destseg: note: {resolved['anomaly_color_source']}", file=sys.stderr)
    if resolved["shape_note"]:
        print(f"destseg: note: {resolved['shape_note']}", file=sys.stderr)
    if resolved["anomaly_source"].startswith("WARNING"):
        print(f"destseg: {resolved['anomaly_source']}", file=sys.stderr)
    with open(run_dir / "train.log", "a") as f:
        f.write(json.dumps({"resolved": resolved, "schedule": options.schedule}) + "\n")


def _ddp_children(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The children of ``model`` that a stage has wrapped in DistributedDataParallel, by attribute name."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return {name: child for name, child in model.named_children() if isinstance(child, DDP)}


@contextlib.contextmanager
def _ddp_stage(model: torch.nn.Module, stage, device: torch.device, d: Dist):
    """Under torchrun, for the length of a stage: the stage's trainable children of ``model`` replaced by
    DistributedDataParallel wrappers (BatchNorm statistics stay local), the plain children put back
    afterwards. A no-op in a single process."""
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name, child in list(model.named_children()):
            if any(child is m for m in stage.train_modules):
                setattr(model, name, DDP(child, device_ids=[device.index] if device.type == "cuda" else None))
    try:
        yield
    finally:
        for name, ddp in _ddp_children(model).items():
            setattr(model, name, ddp.module)


class _Loop:
    """The step loop over a model's stages, and the state a checkpoint keeps between steps: the step, the
    best validation weights (STFPM), the stages cut short by --time-budget, and the elapsed time."""

    def __init__(self, run_dir: Path, model_name: str, model, config, options: TrainOptions,
                 device: torch.device, dtype, dist_info: Dist, ckpt: dict | None):
        self.run_dir, self.model_name, self.model, self.config, self.options = run_dir, model_name, model, config, options
        self.device, self.dtype, self.dist = device, dtype, dist_info
        self.ckpt = ckpt  # the checkpoint resumed from, if any
        self.step = ckpt["step"] if ckpt else 0
        self.best = ckpt.get("best") if ckpt else None
        self.cuts: dict[str, int] = dict(ckpt.get("time_budget_cuts") or {}) if ckpt else {}  # stage -> steps done
        self.t_start = time.time() - (ckpt.get("elapsed_s", 0.0) if ckpt else 0.0)
        self.t_saved = time.time()  # last checkpoint (or start)
        self.log_file = open(run_dir / "train.log", "a") if dist_info.main else open(os.devnull, "w")
        self.bar = None

    def log(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log_file.close()

    def model_state(self) -> dict:
        """The weights on the CPU, under the plain module names even while a stage is DDP-wrapped."""
        wrapped = _ddp_children(self.model)
        for name, ddp in wrapped.items():
            setattr(self.model, name, ddp.module)
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        for name, ddp in wrapped.items():
            setattr(self.model, name, ddp)
        return state

    def checkpoint(self, stage_name: str, optimizer, finished: bool = False) -> None:
        self.t_saved = time.time()
        if not self.dist.main:
            return
        device = self.device
        save_checkpoint(self.run_dir / "checkpoint.pt", {
            "model": self.model_name, "config": dataclasses.asdict(self.config), "teacher": self.config.teacher,
            "step": self.step, "stage": stage_name, "finished": finished, "seed": self.options.seed,
            "elapsed_s": time.time() - self.t_start, "model_state": self.model_state(),
            "optimizer_state": None if finished else optimizer.state_dict(), "best": self.best,
            "time_budget_cuts": self.cuts,
            # peak of this process (since a resume, after one), for the benchmark's table
            "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        })

    def run(self, stages, train_ds, workers: int, augment, val_loader) -> None:
        total = sum(s.steps for s in stages)
        self.bar = tqdm(total=total, initial=self.step, desc=f"train {self.model_name}", unit="step",
                        dynamic_ncols=True, disable=not self.options.progress or not self.dist.main, file=sys.stderr)
        with _StopFlag() as stop:
            offset = 0
            for stage_index, stage in enumerate(stages):
                if self.step < offset + stage.steps:
                    deadline = (time.time() + self.options.time_budget_s * stage.steps / total
                                if self.options.time_budget_s else None)
                    self.run_stage(stage_index, stage, offset, total, train_ds, workers, augment, val_loader,
                                   stop, deadline)
                offset += stage.steps
            if self.best is not None:  # STFPM: keep the weights with the lowest validation anomaly map
                self.model.load_state_dict(self.best["model_state"])
                self.best = {k: v for k, v in self.best.items() if k != "model_state"}
            self.checkpoint(stages[-1].name, None, finished=True)

    def run_stage(self, stage_index: int, stage, offset: int, total: int, train_ds, workers: int, augment,
                  val_loader, stop: _StopFlag, deadline: float | None) -> None:
        """Steps ``offset + (done so far) .. offset + stage.steps`` of training, then a checkpoint."""
        model, options, config, device, d = self.model, self.options, self.config, self.device, self.dist
        end = offset + stage.steps
        stage.freeze_others(model)
        optimizer = torch.optim.SGD(stage.param_groups, lr=stage.param_groups[0]["lr"],
                                    momentum=config.momentum, weight_decay=config.weight_decay)
        if self.ckpt is not None and self.ckpt.get("stage") == stage.name and self.ckpt.get("optimizer_state"):
            optimizer.load_state_dict(self.ckpt["optimizer_state"])
        sampler = StepSampler(len(train_ds), config.batch_size, options.seed, stage.steps,
                              start_step=self.step - offset, stream=stage_index, rank=d.rank, world_size=d.world_size)
        loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=sampler, num_workers=workers, worker_init_fn=seed_worker,
            persistent_workers=False, pin_memory=device.type == "cuda")
        loss_scale = d.world_size if stage.extra.get("batch_sum") else 1
        validate_every = stage.extra.get("validate_every") if val_loader is not None else None
        self.bar.set_description(f"{self.model_name}:{stage.name}")
        loss_avg = None
        with _ddp_stage(model, stage, device, d):
            stage.train_mode(model)
            for batch in loader:
                if augment is not None:  # per-step generator: reproducible, identical after a resume
                    batch = augment(batch["raw"], augment.generator(options.seed, stage_index, self.step, d.rank))
                else:
                    batch = to_device(batch, device)
                with autocast(device, self.dtype):
                    loss = model.training_loss(stage.name, batch)
                optimizer.zero_grad(set_to_none=True)
                (loss * loss_scale).backward()
                optimizer.step()
                self.step += 1
                self.bar.update(1)
                log_now = self.step % options.log_every == 0 or self.step == end
                checkpoint_now = self.step % options.checkpoint_every == 0 or self._checkpoint_due()
                validate_now = bool(validate_every) and (self.step - offset) % validate_every == 0
                stop_now = stop.signum is not None
                if d.active:  # all ranks stop at the same step when any was signalled
                    stop_now = _all_reduce([float(stop_now)], d)[0] > 0
                # Reading the loss waits for the device: on a GPU only at the steps that need it, so that the
                # next batch is queued while this one computes. Non-finite weights keep the loss non-finite,
                # so it is still caught before any checkpoint.
                if (device.type == "cpu" or log_now or checkpoint_now or validate_now or stop_now
                        or deadline is not None):
                    value = self._global_loss(loss, stage)
                    loss_avg = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
                    self.bar.set_postfix(loss=f"{loss_avg:.4f}")
                if log_now:
                    self.log({"step": self.step, "stage": stage.name, "loss": value,
                              "time_s": round(time.time() - self.t_start, 2)})
                if validate_now:
                    value = mean_map(model, val_loader, device, self.dtype)
                    stage.train_mode(model)
                    if self.best is None or value < self.best["value"]:
                        self.best = {"value": value, "step": self.step, "model_state": self.model_state()}
                if stop_now:
                    self.checkpoint(stage.name, optimizer)
                    raise TrainingInterrupted(
                        f"training stopped by signal {stop.signum or 'on another rank'} at step {self.step}/{total}; "
                        f"checkpoint saved, continue with: destseg train --out {self.run_dir} --resume")
                if checkpoint_now:
                    self.checkpoint(stage.name, optimizer)
                if deadline is not None and self.step < end and self._out_of_time(deadline):
                    self.cuts[stage.name] = self.step - offset
                    note = f"time budget: stage {stage.name} stopped at {self.step - offset} of {stage.steps} steps"
                    self.log({"step": self.step, "stage": stage.name, "time_budget": note})
                    if d.main:
                        tqdm.write(f"destseg: {note}", file=sys.stderr)
                    self.bar.update(end - self.step)
                    self.step = end
                    break
        self.checkpoint(stage.name, optimizer)

    def _global_loss(self, loss: torch.Tensor, stage) -> float:
        """The step's loss over all processes (sum or mean, as the stage's loss reduces the batch); refuses
        a non-finite value before it can reach a checkpoint."""
        value = float(loss.detach())
        if self.dist.active:
            total = _all_reduce([value], self.dist)[0]
            value = total if stage.extra.get("batch_sum") else total / self.dist.world_size
        if not math.isfinite(value):
            raise DestsegError(f"loss became {value} by step {self.step} ({stage.name}); "
                               "try a lower learning rate or --precision fp32")
        return value

    def _checkpoint_due(self) -> bool:
        """--checkpoint-minutes have passed since the last checkpoint. Single process only: under torchrun the
        ranks' clocks could disagree about the step, and a checkpoint step reads the loss collectively."""
        minutes = self.options.checkpoint_minutes
        return not self.dist.active and minutes > 0 and time.time() - self.t_saved >= 60 * minutes

    def _out_of_time(self, deadline: float) -> bool:
        """This stage's share of --time-budget is used up (on any process)."""
        over = time.time() > deadline
        if self.dist.active:
            over = _all_reduce([float(over)], self.dist)[0] > 0
        return over


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
    if o.rotation is not None and o.rotation not in ("none", "small", "rot90"):
        raise DestsegError(f"--rotation must be none, small or rot90 (got {o.rotation!r})")
    if o.anomaly_color not in ("auto", "rgb", "gray"):
        raise DestsegError(f"--anomaly-color must be auto, rgb or gray (got {o.anomaly_color!r})")
    if o.synthesis not in ("auto", "cpu", "device"):
        raise DestsegError(f"--synthesis must be auto, cpu or device (got {o.synthesis!r})")
    if o.precision not in ("auto", "bf16", "fp32"):
        raise DestsegError(f"--precision must be auto, bf16 or fp32 (got {o.precision!r})")
    if o.texture_dir not in (None, "dtd") and not Path(o.texture_dir).is_dir():
        raise DestsegError(f"--texture-dir {o.texture_dir}: folder not found")
    return o


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
    """(rotation, why): the --rotation flag, else the category's SPEC setting (none for STFPM, whose
    references do not augment), else none for a category the library does not know."""
    if options.rotation:
        return options.rotation, "--rotation"
    if not getattr(config, "category_rotation", True):
        return "none", "this model trains without augmentation (category_rotation=False)"
    if category in CATEGORY_ROTATION:
        return CATEGORY_ROTATION[category], f"SPEC setting for category '{category}'"
    return "none", (f"unknown category '{category}': no rotation augmentation by default "
                    "(choose one with --rotation none|small|rot90)")


def good_image_thresholds(model, paths, config, spec, device, dtype, fpr: float, held_out: bool) -> dict:
    """Thresholds at false-positive rate ``fpr`` from the final model's scores of good images."""
    scores, maps = score_good_images(model, paths, config.image_size, spec.mean, spec.std, device, dtype,
                                     config.batch_size)
    what = "good training images held out of training" if held_out else "training images (seen in training)"
    return fpr_thresholds(scores, maps, fpr, what)


def check_per_process_batch(config, world_size: int) -> None:
    """--batch-size is global: each process must get a whole, large enough share of it. The segmentation
    network's global-pool branch normalises one value per channel and image, which BatchNorm refuses for
    a single image, so segmentation training needs 2 images per process."""
    bs = config.batch_size
    if bs % world_size:
        raise DestsegError(f"--batch-size {bs} (global) is not divisible by the {world_size} processes")
    minimum = 2 if has_segmentation_stage(config) else 1
    if bs // world_size < minimum:
        raise DestsegError(
            f"--batch-size {bs} leaves {bs // world_size} image per step to each of {world_size} process(es); "
            f"the segmentation stage needs at least {minimum} per process: use --batch-size {minimum * world_size} "
            "or more")


def _barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def load_model(run_dir: Path | str, device: str = "cpu", fold_bn: bool = True):
    """(model in eval mode, checkpoint dict) of a finished or partial run. ``fold_bn`` folds the batch
    norms into the convolutions (same outputs, 15-20% faster inference; the model can no longer train)."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint.pt" if run_dir.is_dir() else run_dir
    ckpt = load_checkpoint(path)
    name = ckpt["model"]
    if name not in MODELS:
        raise DestsegError(f"{path}: unknown model '{name}'")
    try:
        config = model_config(name, **ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise DestsegError(f"{path}: config does not fit model '{name}' of destseg {__version__} ({exc})") from None
    model = build_model(name, config, pretrained=False)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise DestsegError(f"{path}: weights do not fit model '{name}' ({str(exc).splitlines()[0]})") from None
    dev = resolve_device(device)
    model.eval()
    if fold_bn:
        fold_batchnorm(model)
    return model.to(dev), ckpt
