"""Warnings about a run whose decisions cannot be trusted: undertrained, or scores that tell nothing apart."""

from __future__ import annotations

import numpy as np

from destseg.run import UNDERTRAINED_FRACTION, Run

# Fewer steps than this and a run is called undertrained whatever its plan: the shortest schedule the library
# ships (the demo's, on 128x128 images) trains 450, the cpu schedule at least 900.
MIN_USEFUL_STEPS = 200


def run_warnings(run: Run) -> list[str]:
    """What is wrong with ``run`` for scoring new images, in words (empty when nothing is): trained far less
    than planned or than any useful schedule, or scores on its calibration images (the good images its
    thresholds were set on) that are all equal or have no spread."""
    out = []
    training = run.record.get("training") or {}
    trained, planned = training.get("steps_trained"), training.get("steps_planned")
    if trained is not None and planned and trained < UNDERTRAINED_FRACTION * planned:
        out.append(f"{run.path}: UNDERTRAINED: trained {trained} of {planned} planned steps "
                   f"({trained / planned:.0%}); its scores and decisions are not what the schedule would give")
    elif trained is not None and trained < MIN_USEFUL_STEPS:
        out.append(f"{run.path}: UNDERTRAINED: trained only {trained} steps (the default schedule trains 900 or "
                   "more); its scores may not separate defects from good parts: train it again without --steps")
    scores = np.asarray((run.calibration() or {}).get("scores") or [], dtype=np.float64)
    if len(scores) >= 2:
        spread = float(scores.max() - scores.min())
        if spread <= 1e-6 * max(1.0, float(np.abs(scores).max())):
            out.append(f"{run.path}: the scores of its {len(scores)} calibration images are all equal "
                       f"({scores[0]:.4g}): the model gives every image the same score, so its decisions mean "
                       "nothing; train it longer")
    return out
