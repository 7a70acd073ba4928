"""The pretrained Lite0 teacher of this tree against the one of another tree (e.g. a checkout of an older
commit), in one process and timed alternately, so that a drifting machine moves both alike: the teacher's
forward (batch 16, 256x256, channels_last) and a DeSTSeg training step of each stage with either teacher.

    git worktree add /tmp/old a9de0b1
    .venv/bin/python benchmarks/teacher_ab.py /tmp/old [--widths 32,64] [--rounds 12]

Prints medians and the largest difference between the two teachers' outputs (0.0 when the change is exact).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import os
import time
from pathlib import Path

import torch

from destseg.device import describe_cpu, prepare_model
from destseg.models import build_model, model_config
from destseg.models.backbones import Teacher


def old_teacher_class(tree: Path):
    """``Teacher`` from ``tree``'s destseg/models/backbones.py (the rest of destseg from this tree)."""
    spec = importlib.util.spec_from_file_location("old_backbones", tree / "destseg" / "models" / "backbones.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module.Teacher


def alternate(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``rounds`` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old_tree", type=Path)
    p.add_argument("--widths", default="32,64", help="student width,segmentation width of the training step")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    teachers = {"old": prepare_model(old_teacher_class(args.old_tree)("efficientnet_lite0"), cpu, None),
                "new": prepare_model(Teacher("efficientnet_lite0"), cpu, None)}
    x = torch.randn(16, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    cap = ", ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ)
    print(f"{describe_cpu()}{' with ' + cap if cap else ''}; torch {torch.__version__}, {args.threads} threads; "
          f"old = {args.old_tree}\n")
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(teachers["old"](x), teachers["new"](x)))
        forward = alternate({k: (lambda t=t: t(x)) for k, t in teachers.items()}, args.rounds)
    print(f"teacher forward, batch 16: old {forward['old'] * 1e3:.0f} ms, new {forward['new'] * 1e3:.0f} ms "
          f"({forward['old'] / forward['new']:.2f}x); largest output difference {diff}")

    sw, gw = (int(v) for v in args.widths.split(","))
    torch.manual_seed(0)
    model = prepare_model(build_model("destseg", model_config("destseg", teacher="efficientnet_lite0",
                                                                 student_width=sw, seg_width=gw)), cpu, None)
    batch = {"image": x, "augmented": x + 0.1 * torch.randn_like(x),
             "mask": (torch.rand(16, 1, 256, 256) > 0.7).float()}
    for stage in model.stages(100):
        opt = torch.optim.SGD(stage.param_groups, lr=1e-4, momentum=0.9)
        stage.freeze_others(model)
        stage.train_mode(model)

        def step(teacher):
            model.teacher = teacher
            loss = model.training_loss(stage.name, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()

        rates = alternate({k: (lambda t=t: step(t)) for k, t in teachers.items()}, max(3, args.rounds // 2))
        print(f"training step ({sw}, {gw}), {stage.name}: old {rates['old']:.3f} s, new {rates['new']:.3f} s")


if __name__ == "__main__":
    main()
