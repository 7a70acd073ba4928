"""Training schedules: the paper's (SPEC), a CPU one whose length follows the training set, or a JSON file.

A schedule maps a model name to config overrides. The ``cpu`` schedule trains DeSTSeg and TESD for a fixed
number of *epochs* at batch 16 (not a fixed number of steps), so a 54-image set is not seen 180 times
and a 700-image set is not undertrained; the steps are clamped to keep a run between ~8 and ~60 minutes on
a 2-core CPU. ``--time-budget`` (TrainOptions.time_budget_s) can cap any schedule by wall time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from destseg.errors import DestsegError

# cpu schedule for the segmentation-guided models: epochs of each stage at batch 16 and step clamps.
# On MVTec bottle (209 training images) this is 600 + 300 steps, the schedule measured in docs/RESULTS.md.
CPU_BATCH = 16
CPU_STUDENT_EPOCHS = 600 * CPU_BATCH / 209
CPU_SEGMENTATION_EPOCHS = 300 * CPU_BATCH / 209
CPU_STUDENT_STEPS = (300, 2400)
CPU_SEGMENTATION_STEPS = (150, 1200)

SCHEDULE_NAMES = ("paper", "cpu")


def _clamp(value: float, bounds: tuple[int, int]) -> int:
    return int(min(max(round(value), bounds[0]), bounds[1]))


def cpu_steps(n_train: int) -> tuple[int, int]:
    """(student steps, segmentation steps) of the cpu schedule for ``n_train`` training images."""
    student = _clamp(CPU_STUDENT_EPOCHS * n_train / CPU_BATCH, CPU_STUDENT_STEPS)
    segmentation = _clamp(CPU_SEGMENTATION_EPOCHS * n_train / CPU_BATCH, CPU_SEGMENTATION_STEPS)
    return student, segmentation


def schedule_overrides(name: str, model: str, n_train: int) -> tuple[dict, str]:
    """(config overrides for ``model``, a one-line description) of the schedule ``name``: ``paper``,
    ``cpu`` or a JSON file ``{model: {config field: value}}``."""
    if name == "paper":
        return {}, "paper (SPEC) schedule"
    if name == "cpu":
        if model == "stfpm":
            return {"batch_size": CPU_BATCH}, "cpu schedule: batch 16, the paper's 100 epochs"
        student, segmentation = cpu_steps(n_train)
        return ({"batch_size": CPU_BATCH, "student_steps": student, "steps": student + segmentation},
                f"cpu schedule: batch 16, {student} student + {segmentation} segmentation steps for "
                f"{n_train} training images ({CPU_STUDENT_EPOCHS:.1f} + {CPU_SEGMENTATION_EPOCHS:.1f} epochs, "
                f"clamped to {CPU_STUDENT_STEPS} and {CPU_SEGMENTATION_STEPS})")
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DestsegError(f"{path}: invalid schedule JSON ({exc})") from None
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise DestsegError(f"{path}: a schedule file maps model names to {{config field: value}} objects")
        return dict(table.get(model, {})), f"schedule file {path}"
    raise DestsegError(f"--schedule '{name}': not paper, cpu, or an existing .json file")


def parse_duration(text: str) -> float:
    """'90s', '30m', '1.5h' or a bare number of minutes -> seconds (> 0)."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text) * 60
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise DestsegError(f"--time-budget '{text}': expected a positive duration such as 90s, 30m or 1.5h")
    return seconds
