"""Command line: ``destseg COMMAND``, one function per command (``cmd_*``) and one parser builder each
(``_*_parser``), listed in ``COMMANDS``. The model options of ``train`` (``--steps``, ``--seg-width``...) come from
the registered models' config fields (:mod:`destseg.models.base`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from destseg import __version__
from destseg.errors import DestsegError


# ------------------------------------------------------------------------------------------ model flags

@dataclass
class ModelFlag:
    """One ``train`` flag and the config field it sets in each model that has it."""

    flag: str
    field: dataclasses.Field  # the first model's declaration: help, type, choices
    fields: dict[str, str]  # model name -> config field name

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser, all_models: list[str], here: dict | None = None) -> None:
        meta, cli = self.field.metadata, dict(self.field.metadata["cli"])
        cli.pop("parse", None)
        help_text = meta["help"] + ("" if len(self.fields) == len(all_models) else f" ({', '.join(self.fields)})")
        if here:
            help_text += f"; {here['what']}: " + ", ".join(
                f"{model} {here['values'][model][name]}" for model, name in self.fields.items()
                if name in here["values"].get(model, {}))
        if "const" in cli:
            parser.add_argument(self.flag, dest=self.dest, action="store_const", default=None, help=help_text, **cli)
            return
        if "type" not in cli:
            cli["type"] = type(self.field.default)
        parser.add_argument(self.flag, dest=self.dest, default=None, help=help_text, **cli)

    def value(self, args):
        value = getattr(args, self.dest)
        parse = self.field.metadata["cli"].get("parse")
        return parse(value) if parse is not None and value is not None else value


def model_flags() -> dict[str, ModelFlag]:
    """The ``train`` flags of every registered model's config fields, by flag."""
    from destseg.models import MODELS, flag_of

    flags: dict[str, ModelFlag] = {}
    for name, cls in MODELS.items():
        for f in dataclasses.fields(cls.Config):
            flag = flag_of(f)
            if flag:
                flags.setdefault(flag, ModelFlag(flag, f, {})).fields[name] = f.name
    return flags


def defaults_here() -> dict:
    """What ``--schedule auto`` sets on this machine, for the help texts: ``what`` (in words) and, per model,
    the config fields the schedule sets (a value that follows the training set is said so)."""
    import torch

    from destseg.models import MODELS
    from destseg.schedules import resolve_schedule_name, schedule_overrides

    name = resolve_schedule_name("auto", "cuda" if torch.cuda.is_available() else "cpu")
    values: dict[str, dict] = {}
    for model in MODELS:
        small, _ = schedule_overrides(name, model, 100)
        large, _ = schedule_overrides(name, model, 400)
        values[model] = {k: (v if large.get(k) == v else "(follows the number of training images)")
                         for k, v in small.items()}
    where = "this CPU" if name == "cpu" else "this GPU"
    return {"what": f"what runs here (--schedule auto is {name} on {where})", "values": values}


def model_overrides(args) -> dict:
    """The config fields the ``train`` flags given set for ``args.model``; a flag of another model only is
    refused, naming it."""
    overrides = {}
    for flag in model_flags().values():
        value = flag.value(args)
        if value is None:
            continue
        if args.model not in flag.fields:
            raise DestsegError(f"{flag.flag} does not apply to --model {args.model} (an option of "
                               f"{', '.join(flag.fields)})")
        overrides[flag.fields[args.model]] = value
    return overrides


# ---------------------------------------------------------------------------------------------- commands

def cmd_inspect(args) -> int:
    from destseg.data import validate
    from destseg.data.datasets import shape_note, train_color

    data = data_source(args)
    if data is None:
        raise DestsegError("nothing to inspect: pass --data DIR (good images, or a dataset root with --category) "
                           "or --good/--defect folders")
    index = validate(data.scan())
    summary = index.summary()
    if index.gray_train:  # the readable training images: what the default 256x256 input does to them
        summary["train_image_size"], summary["shape_note"] = shape_note(list(index.gray_train), 256)
        summary["train_color"] = train_color(list(index.gray_train.values()))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k in ("name", "train", "test", "test_good", "test_defect", "masks"):
            print(f"{k:>12}: {summary[k]}")
        for name, count in summary["defect_types"].items():
            print(f"{'':>12}  {name}: {count}")
        for key, label in (("train_image_size", "train size"), ("train_color", "colour"), ("shape_note", "note")):
            if summary.get(key):
                print(f"{label:>12}: {summary[key]}")
        if summary["defects_without_mask"]:
            print(f"{'':>12}  {summary['defects_without_mask']} defect image(s) without a mask: judged by their "
                  "label (image metrics), left out of the pixel metrics")
        print(f"{'problems':>12}: {len(summary['problems'])}")
        for p in summary["problems"]:
            print(f"  - {p}")
    return 1 if summary["problems"] else 0


def data_source(args):
    """The data a command was pointed at: ``--data ROOT --category C`` (a benchmark layout), ``--data DIR``
    alone (a plain folder of good images), or (test, inspect) ``--good``/``--defect``/``--masks`` folders;
    None when nothing was given."""
    from destseg.data import DataSource, TestFolders

    folders = [getattr(args, k, None) for k in ("good", "defect", "masks")]
    if any(folders):
        if args.data or args.category:
            raise DestsegError("give either --data (with --category for a benchmark layout) or --good/--defect "
                               "folders, not both")
        return TestFolders(*(str(f) if f else None for f in folders))
    if not args.data:
        if args.category:
            raise DestsegError("--category needs --data ROOT (the dataset root that holds the category)")
        return None
    if args.category or args.layout not in ("auto", "folder"):
        if not args.category:
            raise DestsegError(f"--layout {args.layout} needs --category")
        return DataSource(args.data, args.category, args.layout)
    return DataSource.folder(args.data)


def cmd_train(args) -> int:
    from destseg.schedules import parse_duration
    from destseg.train import TrainingInterrupted, TrainOptions, train

    options = TrainOptions(seed=args.seed, device=args.device, precision=args.precision,
                           num_workers=args.workers, texture_dir=args.texture_dir, rotation=args.rotation,
                           anomaly_color=args.anomaly_color, synthesis=args.synthesis,
                           checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
                           log_every=args.log_every, teacher_weights=args.teacher_weights,
                           threshold_holdout=args.threshold_holdout, threshold_fpr=args.threshold_fpr,
                           progress=not args.no_progress)
    if args.time_budget is not None:
        options.time_budget_s = parse_duration(args.time_budget)
    if args.resume:
        call = {"resume": True}
    else:
        data = data_source(args)
        if data is None:
            raise DestsegError("--data is required (a folder of good images, or a dataset root with --category; "
                               "unless --resume)")
        overrides = model_overrides(args)
        options.schedule = args.schedule
        call = {"data": data, "overrides": overrides, "overwrite": args.overwrite}
    try:
        path = train(args.out, args.model, options=options, **call)
    except TrainingInterrupted as exc:
        print(f"destseg: {exc}", file=sys.stderr)
        return 130
    print(f"saved {path}")
    print(next_steps(args.out))
    return 0


def next_steps(run_dir: Path) -> str:
    """What to run after ``train``: a test on labelled images, then scoring new ones."""
    from destseg.run import Run

    data, run = Run(run_dir).data, shlex.quote(str(run_dir))
    if data is not None and data.layout == "folder":
        test = (f"destseg test --run {run} --defect DEFECT_PHOTOS/ [--good OTHER_GOOD_PHOTOS/]"
                "   # how well it tells them apart")
    else:
        test = f"destseg test --run {run}   # metrics on the dataset's test split"
    return ("next:\n  " + test + f"\n  destseg predict --run {run} --input NEW_IMAGES/ --out results/"
            f"   # score images: results.csv, heat maps\n  destseg watch --run {run} --input CAMERA_FOLDER/ "
            "--out results/   # or score every new image as it arrives")


def cmd_test(args) -> int:
    from destseg.data import DataSource
    from destseg.infer import evaluate_run, metrics_table
    from destseg.run import Run

    saved = Run(args.run).record.get("data") or {}
    benchmark_run = saved.get("root") and saved.get("layout") != "folder"
    if args.data and not args.category and benchmark_run:  # another copy of the run's dataset: its category
        layout = args.layout if args.layout != "auto" else saved.get("layout", "auto")
        data = DataSource(args.data, saved["category"], layout)
    elif args.category and not args.data:  # another category of the run's own dataset root
        if not benchmark_run:
            raise DestsegError(f"{args.run}: the run does not record a dataset root; pass --data ROOT with --category")
        data = DataSource(saved["root"], args.category, saved.get("layout", "auto"))
    elif args.data and not args.category:
        raise DestsegError("test needs labelled images: --good DIR and --defect DIR (plain folders), or --data ROOT "
                           "--category NAME (a dataset in the MVTec layout)")
    else:
        data = data_source(args)
    if not 0 < args.fpr < 1:
        raise DestsegError(f"--fpr must be in (0, 1) (got {args.fpr})")
    result = evaluate_run(args.run, data, device=args.device, precision=args.precision,
                          progress=not args.no_progress, fpr=args.fpr, report=not args.no_report,
                          backend=args.backend, compile=args.compile, workers=args.workers,
                          adopt_thresholds=args.adopt_thresholds)
    result.pop("_outputs")
    print(json.dumps(result, indent=2) if args.json else metrics_table(result))
    return 0


def cmd_predict(args) -> int:
    from destseg.predict import run_predict

    return run_predict(args.run, args.input, args.out, threshold=args.threshold,
                       pixel_threshold=args.pixel_threshold, batch_size=args.batch_size, device=args.device,
                       precision=args.precision, overwrite=args.overwrite, progress=not args.no_progress,
                       backend=args.backend, compile=args.compile, workers=args.workers,
                       output_size=args.output_size)


def cmd_export(args) -> int:
    if args.out.exists() and not args.overwrite:
        raise DestsegError(f"{args.out}: exists; pass --overwrite to replace it")
    if args.format == "openvino":
        from destseg.openvino_ir import export_openvino

        path = export_openvino(args.run, args.out)
    else:
        from destseg.export import export_onnx

        path = export_onnx(args.run, args.out)
    print(f"saved {path}")
    return 0


def cmd_serve(args) -> int:
    from destseg.serve import serve

    return serve(args.run, host=args.host, port=args.port, device=args.device, precision=args.precision,
                 max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_bytes=args.max_mb * 1024 * 1024,
                 backend=args.backend, compile=args.compile, drift_window=args.drift_window)


def cmd_watch(args) -> int:
    from destseg.watch import watch

    return watch(args.run, args.input, args.out, once=args.once, interval=args.interval, settle_s=args.settle,
                 retry_s=args.retry, batch_size=args.batch_size, device=args.device, precision=args.precision,
                 backend=args.backend, compile=args.compile, workers=args.workers,
                 output_size=args.output_size, drift_window=args.drift_window)


def cmd_feedback(args) -> int:
    from destseg.feedback import add_feedback
    from destseg.infer import Detector

    marks = [(f, "false_alarm") for f in args.false_alarm] + [(f, "missed_defect") for f in args.missed_defect]
    if not marks:
        raise DestsegError("nothing to mark: pass --false-alarm FILE... and/or --missed-defect FILE...")
    for f, _ in marks:
        if not Path(f).is_file():
            raise DestsegError(f"{f}: no such file")
    det = Detector.load(args.run, device=args.device)
    refused = 0
    for f, kind in marks:
        try:
            entry = add_feedback(args.run, f, kind, score=det.predict(f).score, in_force=det.thresholds)
        except DestsegError as exc:
            print(f"destseg: refused: {exc}", file=sys.stderr)
            refused += 1
            continue
        print(f"{f}: {kind.replace('_', ' ')}{'' if entry['new'] else ' (already marked)'} "
              f"(score {entry['score']:.4g})")
    print(f"kept in {Path(args.run) / 'feedback'}; `destseg recalibrate --run {shlex.quote(str(args.run))}` "
          "refits the thresholds")
    return 1 if refused else 0


def cmd_recalibrate(args) -> int:
    from destseg.feedback import recalibrate
    from destseg.infer import Detector

    if args.fpr is not None and not 0 < args.fpr < 1:
        raise DestsegError(f"--fpr must be in (0, 1) (got {args.fpr})")
    det = Detector.load(args.run, device=args.device, precision=args.precision, backend=args.backend,
                        compile=args.compile)
    r = recalibrate(det, args.fpr)
    before, after = r["before"], r["after"]

    def fmt(v):
        return "none" if v is None else f"{v:.4g}"

    bound = ("no false-positive bound: its good images were seen in training" if after["fpr_bound"] is None
             else f"false-positive rate at most {after['fpr_bound']:.3g}")
    print(f"image threshold {fmt(before.get('image'))} -> {fmt(after['image'])}, pixel threshold "
          f"{fmt(before.get('pixel'))} -> {fmt(after['pixel'])} ({bound}; {r['n_calibration']} calibration images "
          f"+ {r['n_false_alarms']} false alarms)")
    if r["n_missed_defects"]:
        print(f"{r['missed_caught']} of {r['n_missed_defects']} missed defects marked so far score above the new "
              "image threshold (good-image thresholds cannot be set from defects)")
    print(f"written to {Path(args.run) / 'thresholds.json'} (the previous one kept in thresholds-history/)")
    return 0


def cmd_evaluate(args) -> int:
    from destseg.metrics import evaluate, format_table

    path = Path(args.predictions)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DestsegError(f"{path}: cannot read predictions ({exc})") from None
    missing = {"maps", "masks", "labels"} - set(npz.files)
    if missing:
        raise DestsegError(f"{path}: missing array(s) {sorted(missing)} (needs maps, masks, labels[, scores])")
    scores = npz["scores"] if "scores" in npz.files else None
    metrics = evaluate(npz["maps"], npz["masks"], npz["labels"], scores)
    print(json.dumps(metrics, indent=2) if args.json else format_table({path.stem: metrics}))
    return 0


def cmd_demo(args) -> int:
    from destseg.demo import run_demo

    return run_demo(Path(args.out), overwrite=args.overwrite, steps=args.steps)


# Set by `benchmark` itself for every run (or by its own flag of the same name): not train options to pass.
BENCHMARK_OWNS = ("data", "category", "model", "out", "seed", "schedule", "teacher", "texture_dir", "device",
                  "resume", "overwrite", "no_progress")


def check_train_args(extra: list[str]) -> list[str]:
    """The train options given to ``benchmark`` after ``--``, checked as ``train`` would parse them."""
    import contextlib
    import io

    extra = extra[1:] if extra[:1] == ["--"] else extra
    if extra and not extra[0].startswith("-"):
        raise DestsegError(f"benchmark: unexpected argument '{extra[0]}' (train options go after --, e.g. "
                           "-- --anomaly-color rgb)")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = vars(build_parser().parse_args(["train", "--out", "x", *extra]))
    except SystemExit as exc:
        if not exc.code:  # -- --help: train's help was printed
            raise
        msg = (err.getvalue().strip().splitlines() or ["invalid"])[-1].split("error: ", 1)[-1]
        raise DestsegError(f"benchmark: train options after --: {msg}") from None
    default = vars(build_parser().parse_args(["train", "--out", "x"]))
    owned = [f"--{k.replace('_', '-')}" for k in BENCHMARK_OWNS if parsed[k] != default[k]]
    if owned:  # compared after parsing, so that abbreviations (--mod) are caught too
        raise DestsegError(f"benchmark: {', '.join(owned)} after -- is set by benchmark for each run; use "
                           "benchmark's own flag where it has one (--data, --schedule, --teacher, --texture-dir, "
                           "--device, --seeds, --out)")
    return extra


def cmd_benchmark(args) -> int:
    from destseg.benchmark import run_benchmark

    args.train_args = check_train_args(args.train_args)
    return run_benchmark(args)


# ------------------------------------------------------------------------------------------------ parser

def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "int8"],
                   help="auto: bf16 where the CPU or GPU runs it natively; on another CPU, for DeSTSeg, int8 with "
                        "OpenVINO where NNCF is installed and the run's int8 copy is cached or its training images "
                        "are here; else fp32; int8: OpenVINO with NNCF's post-training quantisation, calibrated "
                        "on the run's good training images and synthetic anomalies on them (made once, kept in "
                        "RUN/openvino/int8; docs/RESULTS.md gives its accuracy)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                   help="inference engine: auto (default) = openvino on a CPU where it is installed, else torch; "
                        "openvino: CPU only, the run's IR is exported into RUN/openvino on first use")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on CUDA only; falls back to eager with a warning)")


def _add_workers_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=int, default=-1, metavar="N",
                   help=f"{what}; -1 (default): 2 on a small CPU, up to 8 with a GPU; 0: all on the main "
                        "process")


def _add_data_args(p: argparse.ArgumentParser, test_folders: bool = False) -> None:
    p.add_argument("--data", metavar="DIR",
                   help="a folder of good images (every image under it, recursively), or with --category the "
                        "root of a dataset in the MVTec AD layout (MPDD, BTAD alike) or VisA's")
    p.add_argument("--category", help="with --data ROOT: the category folder, e.g. bottle")
    p.add_argument("--layout", default="auto", choices=["auto", "folder", "mvtec", "mpdd", "btad", "visa"],
                   help="auto (default): folder without --category, else mvtec (visa where ROOT has split_csv/)")
    if test_folders:
        p.add_argument("--good", type=Path, metavar="DIR", help="good images to test on (recursively; not the "
                                                               "ones the run trained on)")
        p.add_argument("--defect", type=Path, metavar="DIR",
                       help="images of defective parts (recursively; a subfolder's name is the defect type)")
        p.add_argument("--masks", type=Path, metavar="DIR",
                       help="optional defect masks, matched to --defect images by file name (x.png or "
                            "x_mask.png for x.jpg); defect images without one are judged by their label only")


def _inspect_parser(p) -> None:
    _add_data_args(p, test_folders=True)
    p.add_argument("--json", action="store_true")


def _train_parser(p) -> None:
    from destseg.models import DEFAULT_MODEL, MODELS

    _add_data_args(p)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS))
    p.add_argument("--teacher-weights", help="explicit teacher weights file (ResNet18: torchvision's)")
    p.add_argument("--schedule", default="auto",
                   help="auto (default): cpu on a CPU, paper on a GPU; paper: the paper's schedule (5000 steps of "
                        "32 images, its widths); cpu: sized for a 2-core CPU (Lite0 teacher, batch 16, epochs that "
                        "follow the training set, at least 900 + 900 steps; DeSTSeg and TESD with a segmentation "
                        "network at 48 channels, DeSTSeg a student at 32, 11x less inference arithmetic; "
                        "docs/RESULTS.md); cpu-wide: the paper's widths at the cpu schedule's steps (DeSTSeg, "
                        "TESD); or a JSON file {model: {field: value}}. Flags given override it")
    p.add_argument("--time-budget", help="cap training by wall time, e.g. 30m or 1.5h (stage k ends by its "
                                         "cumulative share of the budget; the steps trained are recorded)")
    here = defaults_here()
    for flag in model_flags().values():
        flag.add_to(p, list(MODELS), here if any(f in here["values"].get(m, {}) for m, f in flag.fields.items())
                    else None)
    p.add_argument("--texture-dir", help="anomaly source images: a folder (DTD layout or flat), or dtd to download "
                                         "the DTD release once into the cache (the paper's source); default: a "
                                         "built-in procedural generator (offline fallback, flagged in the run)")
    p.add_argument("--rotation", choices=["none", "small", "rot90"],
                   help="train-time rotation; default: the category's setting from the paper (none for a model "
                        "that trains "
                        "without augmentation and for a category the library does not know)")
    p.add_argument("--anomaly-color", default="auto", choices=["auto", "rgb", "gray"],
                   help="colour of the synthetic anomalies: rgb (the textures as they are), gray (their "
                        "luminance); auto (default): gray when every training image is grayscale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: automatic)")
    p.add_argument("--synthesis", default="auto", choices=["auto", "cpu", "device"],
                   help="where augmentation and anomaly synthesis run: cpu (per sample, NumPy), device "
                        "(batched tensor operations on the training device), auto: device on CUDA, else cpu")
    p.add_argument("--threshold-holdout", type=float, default=0.1,
                   help="share of the training images kept aside to set the decision threshold from good "
                        "images (default 0.1; a model with validation images of its own, STFPM, uses half of those; 0: "
                        "score the training images)")
    p.add_argument("--threshold-fpr", type=float, default=0.01,
                   help="false-positive rate that threshold guarantees on good images (default 0.01; split "
                        "conformal: with fewer than 1/fpr - 1 good images the bound is 1/(n+1), with a warning)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="also checkpoint after this many minutes without one, so that a killed run (power loss, "
                        "a preempted machine) loses at most that much work (default 10; 0: off; one process only)")
    p.add_argument("--log-every", type=int, default=10, help="steps between train.log lines")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true")


def _test_parser(p) -> None:
    p.add_argument("--run", required=True, type=Path)
    _add_data_args(p, test_folders=True)
    _add_inference_args(p)
    p.add_argument("--fpr", type=float, default=0.01,
                   help="false-positive rate of the thresholds measured on a split without defect images "
                        "(default 0.01)")
    p.add_argument("--adopt-thresholds", action="store_true",
                   help="put the thresholds measured on this split in force (default: recorded beside the ones "
                        "in force, in thresholds.json under measured_on_test)")
    p.add_argument("--no-report", action="store_true", help="skip RUN/report.html")
    _add_workers_arg(p, "DataLoader worker processes that read, decode and resize the test images")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _predict_parser(p) -> None:
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                   help="run directory (under torchrun write --run-dir: torchrun takes --run for its --run-path)")
    p.add_argument("--input", required=True, help="image, folder (recursive) or quoted glob")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threshold", type=float, help="image-score threshold (default: the run's)")
    p.add_argument("--pixel-threshold", type=float, help="mask threshold (default: the run's)")
    p.add_argument("--output-size", default="input", choices=["input", "model"],
                   help="overlays and masks at each input image's size (default; the map resized back "
                        "bilinearly) or at the model's input size")
    p.add_argument("--batch-size", type=int, default=16)
    _add_inference_args(p)
    _add_workers_arg(p, "threads that read, decode and resize the images and write the PNGs")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _export_parser(p) -> None:
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                   help="onnx: one .onnx file; openvino: a folder with model.xml and model.bin")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")


def _serve_parser(p) -> None:
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _add_inference_args(p)
    p.add_argument("--max-batch", type=int, default=16, help="largest micro-batch of concurrent requests")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a micro-batch to fill")
    p.add_argument("--max-mb", type=int, default=20, help="largest accepted upload, in MiB")
    p.add_argument("--drift-window", type=int, default=200, help="recent scores the drift check looks at")


def _watch_parser(p) -> None:
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path, help="folder to watch (recursively)")
    p.add_argument("--out", required=True, type=Path,
                   help="journal.sqlite (the journal: one row per image content) and its export results.csv, "
                        "skipped.csv, overlays/, masks/, drift.json")
    p.add_argument("--once", action="store_true", help="score what is there and exit (for cron)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scans of --input (default 1)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds a file must stay unchanged before it is scored (default 1)")
    p.add_argument("--retry", type=float, default=30.0,
                   help="seconds an unchanged file may stay undecodable before it is skipped (default 30)")
    p.add_argument("--output-size", default="input", choices=["input", "model"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--drift-window", type=int, default=200, help="recent scores the drift check looks at")
    _add_inference_args(p)
    _add_workers_arg(p, "threads that read the images and write the PNGs")


def _feedback_parser(p) -> None:
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--false-alarm", nargs="+", default=[], metavar="FILE", help="good images called defect")
    p.add_argument("--missed-defect", nargs="+", default=[], metavar="FILE", help="defect images called OK")
    p.add_argument("--device", default="auto")


def _recalibrate_parser(p) -> None:
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--fpr", type=float, help="false-positive target (default: the one the thresholds were set at)")
    _add_inference_args(p)


def _evaluate_parser(p) -> None:
    p.add_argument("--predictions", required=True, help="npz with maps, masks, labels[, scores]")
    p.add_argument("--json", action="store_true")


def _demo_parser(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=int, help="override the demo's total steps")
    p.add_argument("--overwrite", action="store_true")


def _benchmark_parser(p) -> None:
    from destseg.models import BACKBONES, MODELS

    p.add_argument("--data", required=True, action="append",
                   help="dataset root, or name=root; repeat for several datasets (e.g. --data mvtec=ROOT1 "
                        "--data mpdd=ROOT2)")
    p.add_argument("--categories", default="all",
                   help="comma-separated category names (or dataset:category), or all: every category folder "
                        "with a train/ folder under each root")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--schedule", default="cpu",
                   help="auto, paper, cpu, cpu-wide, or a JSON file (see train --help); default cpu")
    p.add_argument("--teacher", default="efficientnet_lite0", choices=list(BACKBONES))
    p.add_argument("--texture-dir")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per (category, model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_OPTIONS",
                   help="train options for every run, after --, e.g. -- --anomaly-color rgb --image-size 224")


COMMANDS = {  # name: (help, arguments, action)
    "inspect": ("check images before training or testing: counts, size, colour, problems", _inspect_parser,
                cmd_inspect),
    "train": ("train a detector on good images into a run folder", _train_parser, cmd_train),
    "test": ("measure how well a run separates good and defect images (RUN/metrics.json, report.html)", _test_parser,
             cmd_test),
    "predict": ("score images (file, folder or glob): overlays, masks, CSV, JSON", _predict_parser, cmd_predict),
    "export": ("export a run to ONNX or OpenVINO: normalised images -> (anomaly map, score)", _export_parser,
               cmd_export),
    "serve": ("HTTP service and web page for a run: POST /predict, GET /health, GET /", _serve_parser, cmd_serve),
    "watch": ("score every image that appears in a folder, exactly once per content (journal, drift check)",
              _watch_parser, cmd_watch),
    "feedback": ("mark images as false alarms or missed defects (kept in RUN/feedback/)", _feedback_parser,
                 cmd_feedback),
    "recalibrate": ("refit the thresholds on the good images plus the false alarms marked", _recalibrate_parser,
                    cmd_recalibrate),
    "evaluate": ("metrics of any method's outputs saved as .npz", _evaluate_parser, cmd_evaluate),
    "demo": ("build the embedded demo dataset, train, test and write heat maps", _demo_parser, cmd_demo),
    "benchmark": ("train and test (category, model, seed) runs; results table", _benchmark_parser, cmd_benchmark),
}


DESCRIPTION = """\
Find defects in product images: train a detector on photos of good parts, then score new images (an
anomaly score, a heat map and an OK/defect decision for each).

  destseg train --data GOOD_PHOTOS/ --out runs/part            train on a folder of good images
  destseg test --run runs/part --defect DEFECT_PHOTOS/          how well it separates defects
  destseg predict --run runs/part --input NEW/ --out results/  score images

Each command's options: destseg COMMAND --help."""


# Help for the flags several commands share, where a command gives none of its own.
COMMON_HELP = {
    "--device": "auto (default): the GPU where there is one, else the CPU; or cpu, cuda, cuda:N",
    "--run": "run folder (made by destseg train)",
    "--no-progress": "no progress bars (for logs and CI)",
    "--overwrite": "replace what is already there",
    "--out": "where to write the output",
    "--json": "print JSON instead of a table",
    "--batch-size": "images per batch (default 16)",
    "--texture-dir": "anomaly source images for every run (see train --help)",
    "--teacher": "teacher backbone for every run",
    "--seed": "seed of the weights, the image split and the synthetic anomalies (default 0)",
    "--precision": "auto (default): bf16 autocast where the CPU or GPU runs it natively, else fp32; or bf16, fp32",
    "--port": "TCP port (default 8000)",
    "--output-size": "overlays and masks at each input image's size (default) or at the model's input size",
    "--models": "comma-separated models to run (default: all)",
    "--model": "destseg (default), stfpm or tesd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="destseg", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"destseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for name, (help_text, arguments, action) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        arguments(p)
        for flag in p._actions:
            if flag.help is None and flag.option_strings:
                flag.help = COMMON_HELP.get(flag.option_strings[0])
        p.set_defaults(func=action)
    return parser


_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """The library's own warnings read like its errors; others (torch's...) keep Python's format."""
    if "destseg" in Path(filename).parts:
        return f"destseg: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main(argv=None) -> int:
    warnings.formatwarning = _format_warning
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DestsegError, OSError) as exc:
        print(f"destseg: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # config validation (unknown option values)
        print(f"destseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("destseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
