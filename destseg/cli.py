"""Command line: ``destseg {inspect,train,test,predict,export,serve,evaluate,demo,benchmark}``.

Each subcommand's options: ``destseg CMD --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from destseg import __version__
from destseg.errors import DestsegError

def _image_size(values: list[int] | None):
    if values is None:
        return None
    if len(values) > 2:
        raise DestsegError(f"--image-size takes one size or a height and a width, not {len(values)} numbers")
    return values[0] if len(values) == 1 else list(values)


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--backend", default="torch", choices=["torch", "openvino"],
                   help="inference engine (openvino: CPU only, the run's IR is exported on first use)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on CUDA only; falls back to eager with a warning)")


def _add_workers_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=int, default=-1, metavar="N",
                   help=f"{what}; -1 (default): 2 on a small CPU, up to 8 with a GPU; 0: all on the main "
                        "process")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="dataset root (MVTec/MPDD/BTAD layout, or VisA with split_csv)")
    p.add_argument("--category", required=required, help="category folder name, e.g. bottle")
    p.add_argument("--layout", default="auto", choices=["auto", "mvtec", "mpdd", "btad", "visa"])


def cmd_inspect(args) -> int:
    from destseg.data import scan_dataset, validate
    from destseg.data.datasets import shape_note, train_color

    index = validate(scan_dataset(args.data, args.category, args.layout))
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
        if "train_image_size" in summary:
            print(f"{'train size':>12}: {summary['train_image_size']}")
        if "train_color" in summary:
            print(f"{'colour':>12}: {summary['train_color']}")
        if summary.get("shape_note"):
            print(f"{'note':>12}: {summary['shape_note']}")
        print(f"{'problems':>12}: {len(summary['problems'])}")
        for p in summary["problems"]:
            print(f"  - {p}")
    return 1 if summary["problems"] else 0


def cmd_train(args) -> int:
    from destseg.data import DataSource
    from destseg.models import model_config
    from destseg.schedules import parse_duration, schedule_overrides
    from destseg.train import TrainOptions, TrainingInterrupted, train

    options = TrainOptions(seed=args.seed, device=args.device, precision=args.precision,
                           num_workers=args.workers, texture_dir=args.texture_dir, rotation=args.rotation,
                           anomaly_color=args.anomaly_color, synthesis=args.synthesis,
                           checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
                           log_every=args.log_every,
                           teacher_weights=args.teacher_weights, threshold_holdout=args.threshold_holdout,
                           threshold_fpr=args.threshold_fpr, progress=not args.no_progress)
    if args.time_budget is not None:
        options.time_budget_s = parse_duration(args.time_budget)
    index = None
    if args.resume:
        config, data = None, None
    else:
        if not args.data or not args.category:
            raise DestsegError("--data and --category are required (unless --resume)")
        data = DataSource(args.data, args.category, args.layout)
        index = data.scan()
        overrides, options.schedule = schedule_overrides(args.schedule, args.model, len(index.train))
        overrides.update({k: v for k, v in {
            "teacher": args.teacher, "steps": args.steps, "student_steps": args.student_steps,
            "batch_size": args.batch_size, "epochs": args.epochs, "image_size": _image_size(args.image_size),
            "lr": args.lr, "weight_decay": args.weight_decay, "batch_reduction": args.batch_reduction,
            "val_split": args.val_split, "seg_width": args.seg_width}.items()
            if v is not None})
        if args.no_denoising:
            overrides["denoising"] = False
        if args.identical_student:
            overrides["student_arch"] = "identical"
        if args.no_segmentation:
            overrides["segmentation"] = False
        config = model_config(args.model, **overrides)
    try:
        path = train(args.out, args.model, config, data, index=index, options=options, resume=args.resume,
                     overwrite=args.overwrite)
    except TrainingInterrupted as exc:
        print(f"destseg: {exc}", file=sys.stderr)
        return 130
    print(f"saved {path}")
    return 0


def cmd_test(args) -> int:
    from destseg.data import DataSource
    from destseg.infer import metrics_table, evaluate_run
    from destseg.train import read_run_config

    data = None
    if args.data or args.category:  # what is not given comes from the run's own config
        saved = (read_run_config(args.run).get("data") or {})
        root, category = args.data or saved.get("root"), args.category or saved.get("category")
        if not root or not category:
            raise DestsegError(f"{args.run}: the run does not record its data; pass both --data and --category")
        data = DataSource(root, category, args.layout if args.layout != "auto" else saved.get("layout", "auto"))
    result = evaluate_run(args.run, data, device=args.device, precision=args.precision,
                          progress=not args.no_progress, fpr=args.fpr, report=not args.no_report,
                          backend=args.backend, compile=args.compile, workers=args.workers)
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
                 backend=args.backend, compile=args.compile)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="destseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"destseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="validate a dataset and print its counts")
    _add_data_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train a model into a run directory")
    _add_data_args(p, required=False)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--model", default="destseg", choices=["destseg", "stfpm", "tesd"])
    p.add_argument("--teacher", choices=["resnet18", "efficientnet_lite0"], help="default: resnet18 (paper)")
    p.add_argument("--teacher-weights", help="explicit teacher weights file (ResNet18: torchvision's)")
    p.add_argument("--schedule", default="paper",
                   help="paper: the SPEC's schedule; cpu: batch 16 and a number of epochs that follows the "
                        "training set, sized for a 2-core CPU; or a JSON file {model: {field: value}}. "
                        "Explicit flags override it")
    p.add_argument("--time-budget", help="cap training by wall time, e.g. 30m or 1.5h (each stage gets its "
                                         "share of the budget; the steps reached are logged)")
    p.add_argument("--steps", type=int, help="total steps, both stages (destseg, tesd)")
    p.add_argument("--student-steps", type=int, help="steps of stage 1 (destseg, tesd)")
    p.add_argument("--epochs", type=int, help="epochs (stfpm)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, nargs="+", metavar="SIZE",
                   help="model input size: S (square) or H W, multiples of 32 (default 256)")
    p.add_argument("--lr", type=float, help="learning rate (stfpm)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-reduction", choices=["mean", "sum"],
                   help="stfpm loss over the batch: mean (official code) or 0.5 x sum (anomalib)")
    p.add_argument("--val-split", type=float, help="stfpm: held-out share of the train images for checkpoint "
                                                   "selection (0: keep the last weights)")
    p.add_argument("--texture-dir", help="anomaly source images: a folder (DTD layout or flat), or dtd to download "
                                         "the DTD release once into the cache (the paper's source); default: a "
                                         "built-in procedural generator (offline fallback, flagged in the run)")
    p.add_argument("--rotation", choices=["none", "small", "rot90"],
                   help="train-time rotation; default: the category's SPEC setting (none for STFPM and for a "
                        "category the library does not know)")
    p.add_argument("--anomaly-color", default="auto", choices=["auto", "rgb", "gray"],
                   help="colour of the synthetic anomalies: rgb (the textures as they are), gray (their "
                        "luminance); auto (default): gray when every training image is grayscale")
    p.add_argument("--seg-width", type=int,
                   help="channels of the segmentation network (destseg, tesd; default 256 as the paper): 128 "
                        "trained stage 2 3.4x and inferred 2.8x faster on a 2-core CPU with the same metrics "
                        "within seed noise (docs/RESULTS.md)")
    p.add_argument("--no-denoising", action="store_true", help="ablation: student sees clean images")
    p.add_argument("--identical-student", action="store_true", help="ablation: student = teacher architecture")
    p.add_argument("--no-segmentation", action="store_true", help="ablation: DeST product map, no seg. network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: automatic)")
    p.add_argument("--synthesis", default="auto", choices=["auto", "cpu", "device"],
                   help="where augmentation and anomaly synthesis run: cpu (per sample, NumPy), device "
                        "(batched tensor operations on the training device), auto: device on CUDA, else cpu")
    p.add_argument("--threshold-holdout", type=float, default=0.1,
                   help="share of the training images kept aside to set the decision threshold from good "
                        "images (default 0.1; stfpm uses its validation images; 0: score the training images)")
    p.add_argument("--threshold-fpr", type=float, default=0.01,
                   help="false-positive rate of that threshold on good images (default 0.01)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="also checkpoint after this many minutes without one, so that a killed run (power loss, "
                        "a preempted machine) loses at most that much work (default 10; 0: off; one process only)")
    p.add_argument("--log-every", type=int, default=10, help="steps between train.log lines")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="evaluate a run on its test split; writes RUN/metrics.json")
    p.add_argument("--run", required=True, type=Path)
    _add_data_args(p, required=False)
    _add_inference_args(p)
    p.add_argument("--fpr", type=float, default=0.01,
                   help="false-positive rate for thresholds when the test split has no defects")
    p.add_argument("--no-report", action="store_true", help="skip RUN/report.html")
    _add_workers_arg(p, "DataLoader worker processes that read, decode and resize the test images")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("predict", help="score images (file, folder or glob): overlays, masks, CSV, JSON")
    p.add_argument("--run", required=True, type=Path)
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
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a run to ONNX or OpenVINO: normalised images -> (anomaly map, score)")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                   help="onnx: one .onnx file; openvino: a folder with model.xml and model.bin")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP service and web page for a run: POST /predict, GET /health, GET /")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _add_inference_args(p)
    p.add_argument("--max-batch", type=int, default=16, help="largest micro-batch of concurrent requests")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a micro-batch to fill")
    p.add_argument("--max-mb", type=int, default=20, help="largest accepted upload, in MiB")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("evaluate", help="metrics of any method's outputs saved as .npz")
    p.add_argument("--predictions", required=True, help="npz with maps, masks, labels[, scores]")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="build the embedded demo dataset, train, test and write heat maps")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=int, help="override the demo's total steps")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("benchmark", help="train and test (category, model, seed) runs; results table")
    p.add_argument("--data", required=True, action="append",
                   help="dataset root, or name=root; repeat for several datasets (e.g. --data mvtec=ROOT1 "
                        "--data mpdd=ROOT2)")
    p.add_argument("--categories", default="all",
                   help="comma-separated category names (or dataset:category), or all: every category folder "
                        "with a train/ folder under each root")
    p.add_argument("--models", default="destseg,stfpm,tesd")
    p.add_argument("--schedule", default="cpu", help="paper, cpu, or a JSON file (see train --help)")
    p.add_argument("--teacher", default="efficientnet_lite0", choices=["resnet18", "efficientnet_lite0"])
    p.add_argument("--texture-dir")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per (category, model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_OPTIONS",
                   help="train options for every run, after --, e.g. -- --anomaly-color rgb --image-size 224")
    p.set_defaults(func=cmd_benchmark)
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
