"""The training step loop shared by every model: SGD over each of the model's stages, progress, logging,
checkpoints, interruption, the time budget, and the record of the steps each stage planned and trained."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from destseg.checkpoint import save_checkpoint
from destseg.data.training import StepSampler, seed_worker
from destseg.device import autocast, to_device
from destseg.distributed import Dist, all_reduce, ddp_stage, unwrapped_state
from destseg.errors import DestsegError
from destseg.run import Run
from destseg.scoring import mean_map


class TrainingInterrupted(DestsegError):
    """Raised after a signal stopped training and a resumable checkpoint was written."""


class StopFlag:
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


def stage_records(stages, ckpt: dict | None) -> dict[str, dict]:
    """Per stage: steps ``planned`` and ``trained`` so far (from the checkpoint resumed from; a checkpoint
    of an earlier version counts the stages before its step as fully trained unless it recorded a cut)."""
    saved = {r["name"]: r for r in (ckpt or {}).get("stages") or []}
    cuts = (ckpt or {}).get("time_budget_cuts") or {}
    step, offset, records = (ckpt or {}).get("step", 0), 0, {}
    for s in stages:
        done = min(max(step - offset, 0), s.steps)
        trained = saved[s.name]["trained"] if s.name in saved else cuts.get(s.name, done)
        records[s.name] = {"name": s.name, "planned": s.steps, "trained": trained}
        offset += s.steps
    return records


ELAPSED_EVERY_S = 30.0  # train.log gets the elapsed time at least this often (a line per --log-every steps too)
LONG_RUN_S = 1800  # a plan expected to take longer (no --time-budget) gets a line on how to cap it


def logged_elapsed(path) -> float:
    """The last elapsed time (``time_s``) train.log recorded, 0 without one."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return 0.0
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "time_s" in entry:
            return float(entry["time_s"])
    return 0.0


class Loop:
    """The step loop over a model's stages, and the state a checkpoint keeps between steps: the position in
    the plan (``step``: a stage cut short by the time budget jumps to the next stage's first step), the steps
    each stage trained, the best validation weights, and the elapsed time."""

    def __init__(self, run: Run, model_name: str, model, config, options, device: torch.device, dtype,
                 dist: Dist, ckpt: dict | None):
        self.run_dir, self.model_name, self.model, self.config, self.options = run.path, model_name, model, config, options
        self.device, self.dtype, self.dist = device, dtype, dist
        self.ckpt = ckpt  # the checkpoint resumed from, if any
        self.step = ckpt["step"] if ckpt else 0
        self.best = ckpt.get("best") if ckpt else None
        self.records: dict[str, dict] = {}
        # resumed: the time spent counts, up to the last train.log line (a kill -9 loses at most ELAPSED_EVERY_S of
        # it, where the checkpoint alone would lose up to --checkpoint-minutes)
        spent = max(ckpt.get("elapsed_s", 0.0), logged_elapsed(run.path / "train.log")) if ckpt else 0.0
        self.t_start = time.time() - spent
        self.t_logged = time.time()
        self.t_saved = time.time()  # last checkpoint (or start)
        self.log_file = open(run.path / "train.log", "a") if dist.main else open(os.devnull, "w")
        self.bar = None
        self._pace_t0: float | None = None  # start of the steps a stage's pace is measured on

    def log(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log_file.close()

    def checkpoint(self, stage_name: str, optimizer, finished: bool = False) -> None:
        self.t_saved = time.time()
        if not self.dist.main:
            return
        device = self.device
        save_checkpoint(self.run_dir / "checkpoint.pt", {
            "model": self.model_name, "config": dataclasses.asdict(self.config), "teacher": self.config.teacher,
            "step": self.step, "stage": stage_name, "finished": finished, "seed": self.options.seed,
            "elapsed_s": time.time() - self.t_start, "model_state": unwrapped_state(self.model),
            "optimizer_state": None if finished else optimizer.state_dict(), "best": self.best,
            "stages": list(self.records.values()),
            # peak of this process (since a resume, after one), for the benchmark's table
            "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        })

    def run(self, stages, train_ds, workers: int, augment, val_ds) -> None:
        """Every stage from the current step on, then the final checkpoint (the best validation weights, for
        a model that keeps them)."""
        self.records = stage_records(stages, self.ckpt)
        self.total = total = sum(s.steps for s in stages)
        trained = sum(r["trained"] for r in self.records.values())
        cut_before = sum(r["planned"] - r["trained"] for r in self.records.values()) - (total - self.step)
        self.bar = tqdm(total=total - cut_before, initial=trained, desc=f"train {self.model_name}", unit="step",
                        dynamic_ncols=True, disable=not self.options.progress or not self.dist.main,
                        file=sys.stderr)
        with StopFlag() as stop:
            offset = 0
            for index, stage in enumerate(stages):
                if self.step < offset + stage.steps:
                    self.run_stage(index, stage, offset, self._deadline(stages, index), train_ds, workers,
                                   augment, val_ds, stop)
                offset += stage.steps
            if self.best is not None:  # keep the weights with the lowest validation anomaly map
                self.model.load_state_dict(self.best["model_state"])
                self.best = {k: v for k, v in self.best.items() if k != "model_state"}
            self.checkpoint(stages[-1].name, None, finished=True)

    def _deadline(self, stages, index: int) -> float | None:
        """When stage ``index`` must end under --time-budget: its share of the budget, with what the stages
        before it left unused, counted from the start of training (a resumed run's time already spent counts)."""
        if not self.options.time_budget_s:
            return None
        through = sum(s.steps for s in stages[: index + 1])
        return self.t_start + self.options.time_budget_s * through / sum(s.steps for s in stages)

    def run_stage(self, index: int, stage, offset: int, deadline: float | None, train_ds, workers: int, augment,
                  val_ds, stop: StopFlag) -> None:
        """Steps ``step .. offset + stage.steps`` of training (fewer when the deadline passes), then a checkpoint."""
        model, d = self.model, self.dist
        stage.freeze_others(model)
        base_lrs = [g["lr"] for g in stage.param_groups]  # the optimizer shares these dicts, and a resumed one
        optimizer = self._optimizer(stage)                 # holds the rates of its last step
        loader = self._loader(stage, index, offset, train_ds, workers)
        self.bar.set_description(f"{self.model_name}:{stage.name}")
        self.loss_avg = None
        with ddp_stage(model, stage, self.device, d):
            stage.train_mode(model)
            for batch in loader:
                if augment is not None:  # per-step generator: reproducible, identical after a resume
                    batch = augment(batch["raw"], augment.generator(self.options.seed, index, self.step, d.rank))
                else:
                    batch = to_device(batch, self.device)
                with autocast(self.device, self.dtype):
                    loss = model.training_loss(stage.name, batch)
                optimizer.zero_grad(set_to_none=True)
                (loss * (d.world_size if stage.sums_batch else 1)).backward()
                for group, lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = lr * stage.lr_factor(self.step - offset)
                optimizer.step()
                self.step += 1
                self.records[stage.name]["trained"] += 1
                self.bar.update(1)
                self._pace(stage, offset)
                if self._after_step(stage, offset, loss, optimizer, val_ds, workers, stop, deadline):
                    break
        self.checkpoint(stage.name, optimizer)

    # The expected wall time is measured on the steps after the first two of each stage (which warm up).
    PACE_FROM, PACE_STEPS = 2, 8

    def _pace(self, stage, offset: int) -> None:
        """Once per stage, after its first few steps: the stage's pace and the expected wall time of the rest of
        the plan at it (stderr and train.log; the progress bar shows its own estimate)."""
        done = self.step - offset
        if done == self.PACE_FROM:
            self._pace_t0 = time.perf_counter()
        elif done == self.PACE_FROM + self.PACE_STEPS and self._pace_t0 is not None:
            per_step = (time.perf_counter() - self._pace_t0) / self.PACE_STEPS
            left = self.total - self.step
            self._pace_t0 = None
            budget_end = self.t_start + self.options.time_budget_s if self.options.time_budget_s else None
            note = pace_note(stage.name, per_step, left, time.time(), budget_end, offset == 0, self.run_dir)
            self.log({"step": self.step, "stage": stage.name, "pace_s_per_step": round(per_step, 4),
                      "expected_s_left": round(per_step * left, 1)})
            if self.dist.main:
                tqdm.write(f"destseg: {note}", file=sys.stderr)

    def _optimizer(self, stage) -> torch.optim.Optimizer:
        """SGD over the stage's parameter groups; its state restored when resuming inside this stage."""
        c = self.config
        optimizer = torch.optim.SGD(stage.param_groups, lr=stage.param_groups[0]["lr"], momentum=c.momentum,
                                    weight_decay=c.weight_decay)
        if self.ckpt is not None and self.ckpt.get("stage") == stage.name and self.ckpt.get("optimizer_state"):
            optimizer.load_state_dict(self.ckpt["optimizer_state"])
        return optimizer

    def _loader(self, stage, index: int, offset: int, train_ds, workers: int):
        """The batches of the stage's remaining steps (one seeded sample stream per stage)."""
        d = self.dist
        batch_size = stage.batch_size or self.config.batch_size
        sampler = StepSampler(len(train_ds), batch_size, self.options.seed, stage.steps, start_step=self.step - offset,
                              stream=index, rank=d.rank, world_size=d.world_size)
        return torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=workers,
                                           worker_init_fn=seed_worker, persistent_workers=False,
                                           pin_memory=self.device.type == "cuda")

    def _after_step(self, stage, offset: int, loss, optimizer, val_ds, workers: int, stop: StopFlag,
                    deadline: float | None) -> bool:
        """Logging, validation, checkpoints, signals and the time budget after a step; True ends the stage."""
        options, d, end = self.options, self.dist, offset + stage.steps
        log_now = self.step % options.log_every == 0 or self.step == end
        checkpoint_now = self.step % options.checkpoint_every == 0 or self._checkpoint_due()
        validate_now = val_ds is not None and bool(stage.validate_every) and (self.step - offset) % stage.validate_every == 0
        stop_now = stop.signum is not None
        if d.active:  # all ranks stop at the same step when any was signalled
            stop_now = all_reduce([float(stop_now)], d)[0] > 0
        # Reading the loss waits for the device: on a GPU only at the steps that need it, so that the next batch
        # is queued while this one computes. Non-finite weights keep the loss non-finite, so it is still caught
        # before any checkpoint.
        if self.device.type == "cpu" or log_now or checkpoint_now or validate_now or stop_now or deadline is not None:
            value = self._global_loss(loss, stage)
            self.loss_avg = value if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * value
            self.bar.set_postfix(loss=f"{self.loss_avg:.4f}")
        if log_now:
            self.log({"step": self.step, "stage": stage.name, "loss": value,
                      "time_s": round(time.time() - self.t_start, 2)})
            self.t_logged = time.time()
        elif time.time() - self.t_logged >= ELAPSED_EVERY_S:  # the time spent, for a resume after a kill -9
            self.log({"step": self.step, "stage": stage.name, "time_s": round(time.time() - self.t_start, 2)})
            self.t_logged = time.time()
        if validate_now:
            value = mean_map(self.model, val_ds, self.device, self.dtype, self.config.batch_size, workers)
            if self.best is None or value < self.best["value"]:
                self.best = {"value": value, "step": self.step, "model_state": unwrapped_state(self.model)}
        if stop_now:
            self.checkpoint(stage.name, optimizer)
            raise TrainingInterrupted(
                f"training stopped by signal {stop.signum or 'on another rank'} at step {self.step}/{self.total}; "
                f"checkpoint saved, continue with: destseg train --out {shlex.quote(str(self.run_dir))} --resume")
        if checkpoint_now:
            self.checkpoint(stage.name, optimizer)
        if deadline is not None and self.step < end and self._out_of_time(deadline):
            self._cut(stage, end)
            return True
        return False

    def _cut(self, stage, end: int) -> None:
        """The time budget ends this stage early: say so (stderr, train.log), shorten the progress bar to the
        steps that will really run, and move to the next stage's first step."""
        rec = self.records[stage.name]
        note = (f"time budget: stage {stage.name} stopped after {rec['trained']} of {rec['planned']} steps "
                f"({rec['trained'] / rec['planned']:.0%} of the plan)")
        self.log({"step": self.step, "stage": stage.name, "time_budget": note, "steps_trained": rec["trained"],
                  "steps_planned": rec["planned"]})
        if self.dist.main:
            tqdm.write(f"destseg: {note}", file=sys.stderr)
        self.bar.total -= end - self.step
        self.bar.refresh()
        self.step = end

    def _global_loss(self, loss: torch.Tensor, stage) -> float:
        """The step's loss over all processes (sum or mean, as the stage's loss reduces the batch); refuses
        a non-finite value before it can reach a checkpoint."""
        value = float(loss.detach())
        if self.dist.active:
            total = all_reduce([value], self.dist)[0]
            value = total if stage.sums_batch else total / self.dist.world_size
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
        """This stage's deadline has passed (on any process)."""
        over = time.time() > deadline
        if self.dist.active:
            over = all_reduce([float(over)], self.dist)[0] > 0
        return over


def pace_note(stage: str, per_step: float, left: int, now: float, budget_end: float | None, first_stage: bool,
              run_dir) -> str:
    """What train prints once a stage's pace is known: the expected wall time of the ``left`` steps at it; the
    time --time-budget ends training where that comes first; without a budget, at the first stage of a plan
    expected to take over LONG_RUN_S, the command that caps it."""
    def clock(t: float) -> str:
        return time.strftime("%H:%M", time.localtime(t))

    note = (f"{stage} stage: {per_step:.2f} s/step; at this pace the {left} steps left take about "
            f"{_minutes(per_step * left)} (done near {clock(now + per_step * left)}; the pace of a later stage may "
            "differ)")
    if budget_end is not None:
        if budget_end < now + per_step * left:
            note += f"; --time-budget ends it near {clock(budget_end)}"
    elif first_stage and per_step * left > LONG_RUN_S:
        minutes = f"{LONG_RUN_S / 60:g}"
        note += (f"\ndestseg: to end training {minutes} minutes after its start, with fewer steps, press Ctrl-C and "
                 f"run: destseg train --out {shlex.quote(str(run_dir))} --resume --time-budget {minutes}m (what "
                 "fewer steps give: docs/RESULTS.md, \"Shorter training\")")
    return note


def _minutes(seconds: float) -> str:
    """A duration in words: '45 s', '12 min', '1 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
