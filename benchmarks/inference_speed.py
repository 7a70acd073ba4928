"""Inference engines side by side on this machine: PyTorch eager, PyTorch + torch.compile (inductor) and
OpenVINO, model only (random input at batch 16) and end to end (`destseg test`: reading, decoding,
resizing, model, metrics input), with compile/convert time reported apart from steady-state throughput.

    .venv/bin/python benchmarks/inference_speed.py --run runs/stfpm-bottle-mean [--run runs/X ...]

Each run's own weights are used; precision is the default for the machine (bf16 autocast where the CPU
has it, else fp32). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from destseg.data.images import hw
from destseg.device import autocast, describe_cpu
from destseg.infer import evaluate_run, load_inference
from cpu_speed import images_per_s  # benchmarks/cpu_speed.py, beside this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {describe_cpu()}, "
          f"batch {args.batch_size}\n")
    print("| run | engine | precision | setup s | model img/s | end-to-end `destseg test` img/s |")
    print("|---|---|---|---|---|---|")
    for run in args.run:
        for engine in ["torch", "torch.compile", "openvino"]:
            if engine == "torch.compile" and args.no_compile:
                continue
            backend = "openvino" if engine == "openvino" else "torch"
            t0 = time.perf_counter()
            compile_choice = "on" if engine == "torch.compile" else "off"
            inf = load_inference(run, "cpu", "auto", backend, compile_choice)
            model, dev, dtype, precision = inf.model, inf.device, inf.dtype, inf.precision
            h, w = hw(inf.config.image_size)
            x = torch.randn(args.batch_size, 3, h, w).contiguous(memory_format=torch.channels_last)

            @torch.no_grad()
            def call(inp, m=model):
                with autocast(dev, dtype):
                    return m(inp)

            if engine == "torch.compile":
                call(x)  # compilation happens on the first call
                if model.failed:
                    engine += " (failed: eager)"
            setup = time.perf_counter() - t0
            speed = images_per_s(lambda: call(x), x.shape[0], warmup=2, iters=5)
            e2e = "-"
            if engine != "torch.compile":  # the end-to-end path has no compile switch (see BENCHMARKS.md)
                with tempfile.TemporaryDirectory() as tmp:  # a copy: the run's own metrics stay as they are
                    copy = Path(tmp) / "run"
                    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("openvino"))
                    result = evaluate_run(copy, device="cpu", progress=False, backend=backend)
                e2e = f"{result['images_per_s']:.1f}"
            print(f"| {run} | {engine} | {precision} | {setup:.1f} | {speed:.1f} | {e2e} |", flush=True)


if __name__ == "__main__":
    main()
