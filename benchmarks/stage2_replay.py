"""Stage 2 again, with other settings, from a finished two-stage run: a new run folder that resumes at the start
of the segmentation stage with the finished run's student and the segmentation network as a fresh run of the
same seed initialises it. The data stream is seeded per stage and step, so with unchanged settings the replay
gives the finished run's weights bit for bit; with changed ones, a seed-paired comparison at the cost of stage 2.

    .venv/bin/python benchmarks/stage2_replay.py RUN NEW '{"seg_lr_decay": "cosine", "lr_res": 0.2}'
    .venv/bin/python -m destseg train --out NEW --resume && .venv/bin/python -m destseg test --run NEW --json

Changes of the student's fields (widths, steps) make no sense here and are refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from destseg.checkpoint import load_checkpoint, save_checkpoint
from destseg.errors import DestsegError
from destseg.models import build_model
from destseg.run import typed_config

STUDENT_FIELDS = {"teacher", "image_size", "student_steps", "student_width", "student_arch", "lr_student",
                  "denoising", "batch_size"}


def replay(old: Path, new: Path, changes: dict) -> None:
    if new.exists():
        raise DestsegError(f"{new}: exists; give a new folder")
    if STUDENT_FIELDS & changes.keys():
        raise DestsegError(f"{sorted(STUDENT_FIELDS & changes.keys())}: the student is reused, not retrained")
    ckpt = load_checkpoint(old / "checkpoint.pt")
    record = json.loads((old / "config.json").read_text())
    if record["model"] != "destseg" or not ckpt.get("finished"):
        raise DestsegError(f"{old}: not a finished DeSTSeg run")  # TESD keeps stage-2 weights elsewhere too
    record["config"].update(changes)
    record.pop("training", None)
    config = typed_config(record["model"], record["config"], old / "config.json")  # checks the changed fields
    new.mkdir(parents=True)
    (new / "config.json").write_text(json.dumps(record, indent=2))
    torch.manual_seed(record["options"]["seed"])  # as train() seeds the weight initialisation
    state = build_model(record["model"], config, pretrained=True).state_dict()
    state.update({k: v for k, v in ckpt["model_state"].items() if not k.startswith("segmentation.")})
    student = config.student_steps
    # the finished run's checkpoint, wound back to the end of stage 1 (its other entries kept as they are)
    save_checkpoint(new / "checkpoint.pt", {
        **ckpt, "config": record["config"], "step": student, "stage": "student", "finished": False,
        "elapsed_s": 0.0, "model_state": state, "optimizer_state": None, "best": None,
        "stages": [{"name": "student", "planned": student, "trained": student},
                   {"name": "segmentation", "planned": config.steps - student, "trained": 0}]})


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    try:
        changes = json.loads(sys.argv[3]) if len(sys.argv) == 4 else {}
        if not isinstance(changes, dict):
            raise DestsegError(f"{sys.argv[3]}: not a JSON object of config fields")
        replay(Path(sys.argv[1]), Path(sys.argv[2]), changes)
    except json.JSONDecodeError as exc:
        sys.exit(f"stage2_replay: {sys.argv[3]}: invalid JSON ({exc})")
    except DestsegError as exc:
        sys.exit(f"stage2_replay: {exc}")
