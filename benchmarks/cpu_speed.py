"""DeSTSeg on this CPU in one command: the CPU kind, the yardstick (a plain eager fp32 ResNet18 forward, batch
16, 256x256, channels_last), the measured arithmetic peak, and per configuration (student and segmentation
widths) the training images/s of each stage, the inference images/s of the model per engine and precision,
end to end (``destseg test``) on trained runs, and, with ``--accuracy``, the metrics of cpu-schedule runs.

    .venv/bin/python benchmarks/cpu_speed.py [--config 64,256 32,32] [--run RUN ...] \\
        [--accuracy ROOT CATEGORY --texture-dir DIR --seeds 1 --out runs/cpu-acc]

Speed is relative: each inference ratio is to the yardstick timed right before and right after it (end to end:
the median of ``--repeats`` such ratios), not to one timing for the whole run: a shared VM's speed drifts.
Weights are random for the model-only rows (speed does not depend on them); int8 rows (OpenVINO + NNCF,
calibrated on random inputs here) need ``pip install nncf``. ``ONEDNN_MAX_CPU_ISA=AVX2`` (with
``ATEN_CPU_CAPABILITY=avx2``) emulates an AVX2-only CPU for both torch and OpenVINO; the header says so.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from destseg.device import autocast, describe_cpu, prepare_model
from destseg.export import MapAndScore
from destseg.memory import heap_kept
from destseg.models import build_model, model_config
from destseg.models.backbones import ResNet18
from destseg.models.common import fold_batchnorm
from destseg.openvino_ir import import_nncf
from flops import count, measured_peak_gflops  # benchmarks/flops.py, beside this script

BATCH = 16
SEG_BATCH = 8  # the cpu schedule's segmentation-stage batch (destseg/models/destseg.py)


def images_per_s(fn, batch_size: int, warmup: int, iters: int) -> float:
    """Images/s of ``fn`` (one call: one batch of ``batch_size``) over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch_size * iters / (time.perf_counter() - t0)


class Yardstick:
    """Images/s of a plain eager fp32 ResNet18 forward (batch 16, 256x256, channels_last), timed again beside
    every measurement: on a shared VM the machine's speed moved ~20% within an hour (docs/BENCHMARKS.md), so a
    ratio holds only against yardsticks taken right before and right after what it compares."""

    def __init__(self, warmup: int, iters: int):
        self.net = ResNet18().eval().to(memory_format=torch.channels_last)
        self.x = torch.randn(BATCH, 3, 256, 256).contiguous(memory_format=torch.channels_last)
        self.warmup, self.iters, self.rates = warmup, iters, []

    def __call__(self) -> float:
        with torch.no_grad():
            self.rates.append(images_per_s(lambda: self.net(self.x), BATCH, self.warmup, self.iters))
        return self.rates[-1]

    def interleaved(self, measure, repeats: int = 1) -> tuple[float, float]:
        """(median of ``repeats`` calls of ``measure``, median of their ratios to the mean of the yardsticks
        timed just before and just after each)."""
        values, ratios, last = [], [], self()
        for _ in range(repeats):
            values.append(measure())
            now = self()
            ratios.append(values[-1] / ((last + now) / 2))
            last = now
        return statistics.median(values), statistics.median(ratios)


def training_rates(config, warmup: int, iters: int) -> dict[str, float]:
    """Images/s of a training step of each stage (fp32), at the stage's own batch size."""
    model = prepare_model(build_model("destseg", config, pretrained=False), torch.device("cpu"), None)
    x = torch.randn(BATCH, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    full = {"image": x, "augmented": x + 0.1 * torch.randn_like(x),
            "mask": (torch.rand(BATCH, 1, 256, 256) > 0.7).float()}
    rates = {}
    for stage in model.stages(100):
        n = stage.batch_size or BATCH
        batch = {k: v[:n] for k, v in full.items()}
        opt = torch.optim.SGD(stage.param_groups, lr=1e-3, momentum=0.9)
        stage.freeze_others(model)
        stage.train_mode(model)

        def step():
            loss = model.training_loss(stage.name, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()

        rates[stage.name] = images_per_s(step, n, warmup, iters)
    return rates


def inference_rates(config, warmup: int, iters: int, int8: bool, yard: Yardstick) -> dict[str, tuple[float, float]]:
    """Model-only (images/s, x yardstick) per engine and precision."""
    torch.manual_seed(0)
    model = fold_batchnorm(build_model("destseg", config, pretrained=False)).eval()
    x = torch.randn(BATCH, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    rates = {}
    cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        rates["torch fp32"] = yard.interleaved(lambda: images_per_s(lambda: cl(x), BATCH, warmup, iters))
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            def bf16():
                with autocast(torch.device("cpu"), torch.bfloat16):
                    cl(x)
            rates["torch bf16"] = yard.interleaved(lambda: images_per_s(bf16, BATCH, warmup, iters))
    try:
        import openvino as ov
    except ImportError:
        return rates
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MapAndScore(model).eval(), (torch.zeros(2, 3, 256, 256),), buf, input_names=["images"],
                          output_names=["anomaly_map", "score"], dynamic_axes={"images": {0: "batch"}},
                          opset_version=17, dynamo=False)
    core, xn = ov.Core(), x.contiguous().numpy()
    ir = core.read_model(buf.getvalue())
    threads = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **threads})
    rates["openvino fp32"] = yard.interleaved(lambda: images_per_s(lambda: compiled(xn), BATCH, warmup, iters))
    # Under an ISA cap OpenVINO still lists the CPU's BF16 but cannot compile for it: no bf16 row there.
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", **threads})
        rates["openvino bf16"] = yard.interleaved(lambda: images_per_s(lambda: compiled(xn), BATCH, warmup, iters))
    if int8:
        nncf = import_nncf()
        calibration = [torch.randn(1, 3, 256, 256).numpy() for _ in range(16)]
        quantized = nncf.quantize(ir, nncf.Dataset(calibration), subset_size=16)
        compiled = core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **threads})
        rates["openvino int8"] = yard.interleaved(lambda: images_per_s(lambda: compiled(xn), BATCH, warmup, iters))
    return rates


def end_to_end(run: str, backends: list[str], precision: str, yard: Yardstick,
               repeats: int) -> dict[str, tuple[float, float]]:
    """``destseg test`` (images/s, x yardstick) end to end (reading, decoding, resizing, the model) per backend,
    medians of ``repeats`` calls between yardsticks, on a copy of the run (its own metrics stay as they are),
    default options otherwise."""
    rates = {}
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "run"
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("openvino"))
            cmd = [sys.executable, "-m", "destseg", "test", "--run", str(copy), "--json", "--no-progress",
                   "--no-report", "--backend", backend, "--precision", precision]

            def call() -> dict:
                return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

            first = call()  # exports the IR (and quantises), untimed; names the engine auto chose
            label = first["precision"]  # OpenVINO's names its engine ("openvino int8"), torch's does not ("bf16")
            if not label.startswith(first["backend"]):
                label = f"{first['backend']} {label}"
            rates[f"{backend}: {label}"] = yard.interleaved(lambda: call()["images_per_s"], repeats)
    return rates


def accuracy(root: str, category: str, widths: tuple[int, int], args) -> dict:
    """Mean metrics of ``--seeds`` cpu-schedule runs of one configuration (``destseg benchmark``; the widths
    given, the rest of the cpu schedule's stage 2 as it is: batches of 8 from twice the paper's rates, decayed)."""
    out = Path(args.out) / f"sw{widths[0]}-gw{widths[1]}"
    cmd = [sys.executable, "-m", "destseg", "benchmark", "--data", root, "--categories", category, "--models",
           "destseg", "--seeds", str(args.seeds), "--schedule", "cpu", "--out", str(out), "--no-progress"]
    if args.texture_dir:
        cmd += ["--texture-dir", args.texture_dir]
    subprocess.run(cmd + ["--", "--student-width", str(widths[0]), "--seg-width", str(widths[1])], check=True,
                   capture_output=True)
    rows = json.loads((out / "results.json").read_text())["runs"]
    keys = ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90", "train_minutes")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="*", default=["64,256", "32,48", "32,32"],
                   help="student width,segmentation width pairs (64,256 is the paper's architecture)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-int8", action="store_true", help="skip the OpenVINO int8 rows")
    p.add_argument("--run", action="append", default=[], help="a trained run for the end-to-end rows")
    p.add_argument("--backends", nargs="+", default=["auto", "torch", "openvino"])
    p.add_argument("--repeats", type=int, default=3, help="timed `destseg test` calls per end-to-end row, each "
                                                         "between two yardsticks")
    p.add_argument("--precision", default="auto", help="of the end-to-end rows (auto: destseg test's default, "
                                                        "int8 with OpenVINO on a CPU without native bf16)")
    p.add_argument("--accuracy", nargs=2, metavar=("ROOT", "CATEGORY"), help="train and test each configuration")
    p.add_argument("--texture-dir")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", default="runs/cpu-speed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import_nncf()
        int8 = not args.no_int8
    except ImportError:
        int8 = False
    cap = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    yard = Yardstick(args.warmup + 1, args.iters + 2)
    first = yard()
    peak = measured_peak_gflops()
    print(f"{describe_cpu()}{' with ' + ', '.join(f'{k}={v}' for k, v in cap.items()) if cap else ''}; "
          f"torch {torch.__version__}, {args.threads} threads, batch {BATCH} (training stage 2: {SEG_BATCH}), "
          "256x256, Lite0 teacher\n")
    print(f"yardstick (ResNet18 eager fp32 forward, timed again before and after each inference row; each ratio is to "
          f"the mean of the two): {first:.1f} img/s at the start; fp32 peak (256-channel 3x3 conv at 64x64): "
          f"{peak:.0f} GFLOP/s\n")
    print("| student, seg. width | GFLOP/img inference | stage-1 train img/s | stage-2 train img/s | inference img/s "
          "(x yardstick) |")
    print("|---|---|---|---|---|")
    for spec in args.config:
        sw, gw = (int(v) for v in spec.split(","))
        config = model_config("destseg", teacher="efficientnet_lite0", student_width=sw, seg_width=gw,
                              seg_batch_size=SEG_BATCH)
        flops = count("destseg", "efficientnet_lite0", student_width=sw, seg_width=gw)["inference"]
        with heap_kept():  # as `destseg train` steps
            train = training_rates(config, args.warmup, args.iters)
        infer = inference_rates(config, args.warmup, args.iters, int8, yard)
        cells = ", ".join(f"{k} {v:.1f} ({r:.2f})" for k, (v, r) in infer.items())
        print(f"| {sw}, {gw} | {flops:.1f} | {train['student']:.1f} | {train['segmentation']:.1f} | {cells} |",
              flush=True)
        if args.accuracy:
            acc = accuracy(*args.accuracy, (sw, gw), args)
            print(f"|   accuracy ({args.accuracy[1]}, {args.seeds} seed(s)) | " + " / ".join(
                f"{100 * acc[k]:.1f}" for k in ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90"))
                + f" | train {acc['train_minutes']:.1f} min | | |", flush=True)
    for run in args.run:
        t0 = time.perf_counter()
        rates = end_to_end(run, args.backends, args.precision, yard, args.repeats)
        cells = ", ".join(f"{k} {v:.1f} ({r:.2f} x yardstick)" for k, (v, r) in rates.items())
        print(f"\nend to end, `destseg test --run {run}`, medians of {args.repeats}: {cells} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nyardstick over this run: {min(yard.rates):.1f}-{max(yard.rates):.1f} img/s ({len(yard.rates)} timings)")


if __name__ == "__main__":
    main()
