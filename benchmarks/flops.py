"""Arithmetic per image of each model: a training step of each stage (forward + backward) and inference,
counted by torch.utils.flop_counter (convolutions and matrix products), at 256x256.

    .venv/bin/python benchmarks/flops.py [--model destseg tesd stfpm] [--teacher efficientnet_lite0]
        [--peak-gflops 190 | --measure-peak [--peak-precision bf16]] [--seg-width 256 128]

With ``--peak-gflops`` (the machine's peak in the precision used), also the images/s that arithmetic alone
would allow: the ceiling any engine can reach there. ``--measure-peak`` takes as peak what a 256-channel
3x3 convolution at 64x64 (batch 16, channels_last, eval; fp32, or bf16 autocast with ``--peak-precision
bf16``) reaches here, and prints it. ``--seg-width`` counts DeSTSeg and TESD with segmentation networks of
those widths (``destseg train --seg-width``). Weights are random; no download needed.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from destseg.device import describe_cpu, prepare_model
from destseg.models import build_model, model_config


def count(model_name: str, teacher: str, n: int = 2, **config) -> dict[str, float | None]:
    """GFLOP per image: ``train_<stage>`` for each stage, and ``inference``. None where a trained module has
    grouped convolutions: torch's counter (2.13) counts their backward ``groups`` times too high (a 64-channel
    depthwise 3x3: 76.7 MFLOP backward for 1.2 MFLOP forward)."""
    torch.manual_seed(0)
    model = prepare_model(build_model(model_name, model_config(model_name, teacher=teacher, **config), pretrained=False),
                          torch.device("cpu"), None)
    x = torch.randn(n, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    batch = {"image": x, "augmented": x + 0.1 * torch.randn_like(x),
             "mask": (torch.rand(n, 1, 256, 256) > 0.7).float()}
    out = {}
    for stage in model.stages(100):
        stage.freeze_others(model)
        stage.train_mode(model)
        with FlopCounterMode(display=False) as fc:
            model.training_loss(stage.name, batch).backward()
        grouped = any(isinstance(c, torch.nn.Conv2d) and c.groups > 1 for m in stage.train_modules for c in m.modules())
        out[f"train_{stage.name}"] = None if grouped else fc.get_total_flops() / n / 1e9
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    out["inference"] = fc.get_total_flops() / n / 1e9
    return out


def measured_peak_gflops(iters: int = 3, precision: str = "fp32") -> float:
    """GFLOP/s of the segmentation network's commonest layer alone: a 256 -> 256 3x3 conv at 64x64, in fp32
    or under bf16 autocast (as training and inference run with ``--precision auto`` on a bf16 CPU)."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(16, 256, 64, 64).contiguous(memory_format=torch.channels_last)
    bf16 = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), bf16:
        for _ in range(2):
            conv(x)
        t0 = time.perf_counter()
        for _ in range(iters):
            conv(x)
        seconds = time.perf_counter() - t0
    return iters * 2 * 16 * 256 * 256 * 9 * 64 * 64 / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["destseg", "tesd", "stfpm"])
    p.add_argument("--teacher", default="efficientnet_lite0")
    p.add_argument("--peak-gflops", type=float, default=None, help="machine peak, for the ceiling column")
    p.add_argument("--measure-peak", action="store_true", help="measure the peak with one convolution")
    p.add_argument("--peak-precision", choices=["fp32", "bf16"], default="fp32", help="of --measure-peak")
    p.add_argument("--seg-width", type=int, nargs="+", default=[256], help="segmentation widths (destseg, tesd)")
    args = p.parse_args()
    if args.measure_peak:
        args.peak_gflops = measured_peak_gflops(precision=args.peak_precision)
    peak = ""
    if args.peak_gflops:
        how = f" (measured, {args.peak_precision})" if args.measure_peak else ""
        peak = f"; ceiling at {args.peak_gflops:.0f} GFLOP/s{how}"
    print(f"{describe_cpu()}; teacher {args.teacher}, 256x256, GFLOP per image{peak}\n")
    print("| model | part | GFLOP / image | ceiling img/s |")
    print("|---|---|---|---|")
    for name in args.model:
        for width in args.seg_width if name != "stfpm" else [None]:
            label = name if width in (None, 256) else f"{name} (seg. width {width})"
            for part, g in count(name, args.teacher, **({"seg_width": width} if width else {})).items():
                if g is None:
                    print(f"| {label} | {part} | n/a (grouped convolutions trained) | - |", flush=True)
                    continue
                ceiling = f"{args.peak_gflops / g:.1f}" if args.peak_gflops else "-"
                print(f"| {label} | {part} | {g:.1f} | {ceiling} |", flush=True)


if __name__ == "__main__":
    main()
