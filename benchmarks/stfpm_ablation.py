"""STFPM ablation: train with fixed Lite0-student defects put back, then test.

    .venv/bin/python benchmarks/stfpm_ablation.py --variant bn-momentum-0.01 -- \
        --data ../shared/data/mvtec --category bottle --teacher efficientnet_lite0 --schedule cpu --out runs/X

Variants (repeat ``--variant`` to combine; everything after ``--`` goes to ``destseg train``; ``destseg test``
follows):
- ``bn-momentum-0.01``: the student's BatchNorms use TensorFlow's momentum 0.01 (the defect before the fix).
- ``ungrouped-init``: Kaiming init ignores ``groups`` (depthwise kernels ~sqrt(C) times too small).
The other candidates have flags: ``--rotation rot90`` (augmentation), ``--batch-reduction sum
--weight-decay 1e-3`` (anomalib's update size), ``--val-split 0`` (no hold-out, last weights). The
configuration before the fixes: ``--variant bn-momentum-0.01 --variant ungrouped-init -- --rotation rot90 ...``.
"""

from __future__ import annotations

import argparse
import sys

from torch import nn

import destseg.models.backbones as backbones
from destseg.cli import main as cli


def legacy_kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True, action="append", choices=["bn-momentum-0.01", "ungrouped-init"])
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    if "bn-momentum-0.01" in args.variant:
        real_build = backbones.EfficientNetLite0

        class Lite0Momentum001(real_build):
            def __init__(self, num_classes: int = 1000, bn_momentum: float = 0.01):
                super().__init__(num_classes, bn_momentum=0.01)

        backbones.BACKBONES["efficientnet_lite0"] = backbones.BackboneSpec(
            Lite0Momentum001, *[getattr(backbones.BACKBONES["efficientnet_lite0"], f)
                                for f in ("load_weights", "mean", "std", "channels")])
    if "ungrouped-init" in args.variant:
        backbones.kaiming_init = legacy_kaiming_init
    code = cli(["train", "--model", "stfpm", *train_args])
    if code != 0:
        return code
    out = train_args[train_args.index("--out") + 1]
    return cli(["test", "--run", out, "--json", "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
