"""Throughput of DeSTSeg at 256x256: stage-1 training, stage-2 training and inference, fp32 vs bf16
(autocast + channels_last). The metrics are timed by benchmarks/metrics_speed.py.

    .venv/bin/python benchmarks/speed.py [--teacher resnet18] [--batch-size 16] [--threads 2] [--precision fp32]
        [--aspp-by-definition] [--seg-width 256 128]

``--aspp-by-definition`` adds rows timed with the ASPP fusion computed as the SPEC writes it (a 3x3 conv
over the concatenation of all four branches, the pooled one broadcast to a map) instead of with the
pooled branch's closed form: the two compute the same function. ``--seg-width`` times segmentation networks of
other widths (``destseg train --seg-width``; the paper's is 256).

Weights are random (speed does not depend on them), so this needs no download. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from destseg.device import describe_cpu
from destseg.models import build_model, model_config
from destseg.models.common import ASPP, cat_channels, fold_batchnorm
from destseg.device import autocast, prepare_model


def images_per_s(fn, batch_size: int, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch_size * iters / (time.perf_counter() - t0)


def aspp_by_definition(self, x):
    """ASPP.forward as the SPEC defines it, for comparison."""
    pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
    return self.project(cat_channels([b(x) for b in self.branches] + [pooled]))


def bench_model(teacher: str, batch_size: int, dtype, warmup: int, iters: int, seg_width: int = 256) -> dict:
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = prepare_model(build_model("destseg", model_config("destseg", teacher=teacher, seg_width=seg_width), pretrained=False),
                          device, dtype)
    x = torch.randn(batch_size, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    batch = {"image": x, "augmented": x + 0.1 * torch.randn_like(x),
             "mask": (torch.rand(batch_size, 1, 256, 256) > 0.7).float()}
    results = {}
    for stage in model.stages(100):
        opt = torch.optim.SGD(stage.param_groups, lr=1e-3, momentum=0.9)
        stage.train_mode(model)

        def step():
            with autocast(device, dtype):
                loss = model.training_loss(stage.name, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()

        results[f"train_{stage.name}"] = images_per_s(step, batch_size, warmup, iters)
    model.eval()

    @torch.no_grad()
    def infer():
        with autocast(device, dtype):
            model(x)

    fold_batchnorm(model)  # as the inference paths (destseg test, Detector) do
    results["inference"] = images_per_s(infer, batch_size, warmup, iters)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", nargs="+", default=["resnet18", "efficientnet_lite0"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--aspp-by-definition", action="store_true",
                   help="also time the ASPP computed as a conv over the broadcast pooled map")
    p.add_argument("--seg-width", type=int, nargs="+", default=[256], help="segmentation network widths to time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {describe_cpu()}, "
          f"batch {args.batch_size}, 256x256\n")
    print("| teacher | precision | seg. width | ASPP pooled branch | stage-1 train img/s | stage-2 train img/s | "
          "inference img/s |")
    print("|---|---|---|---|---|---|---|")
    closed_form = ASPP.forward
    for teacher in args.teacher:
        for name in args.precision:
            dtype = torch.bfloat16 if name == "bf16" else None
            for width in args.seg_width:
                for aspp in ["closed form"] + (["broadcast map"] if args.aspp_by_definition else []):
                    ASPP.forward = closed_form if aspp == "closed form" else aspp_by_definition
                    r = bench_model(teacher, args.batch_size, dtype, args.warmup, args.iters, width)
                    print(f"| {teacher} | {name} | {width} | {aspp} | {r['train_student']:.2f} | "
                          f"{r['train_segmentation']:.2f} | {r['inference']:.2f} |", flush=True)
    ASPP.forward = closed_form


if __name__ == "__main__":
    main()
