"""Training schedules: the paper's (each model config's defaults), the model's own named schedules (``cpu``;
DeSTSeg's ``cpu-wide``), ``auto`` (cpu on a CPU, paper on a GPU), or a JSON file ``{model: {config field: value}}``.
Earlier names are aliases (``fast`` = ``cpu``, ``cpu-paper-widths`` = ``cpu-wide``).

A schedule maps to config overrides; explicit command-line flags override it. ``--time-budget``
(TrainOptions.time_budget_s) can cap any schedule by wall time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from destseg.errors import DestsegError
from destseg.models import model_class

SCHEDULE_NAMES = ("auto", "paper", "cpu", "cpu-wide")
ALIASES = {"fast": "cpu", "cpu-paper-widths": "cpu-wide"}  # earlier names, still accepted


def resolve_schedule_name(name: str, device_type: str) -> str:
    """``auto``: the cpu schedule on a CPU, the paper's on a GPU; an earlier name as its current one; any other
    name as it is."""
    if name == "auto":
        return "cpu" if device_type == "cpu" else "paper"
    return ALIASES.get(name, name)


def schedule_overrides(name: str, model: str, n_train: int) -> tuple[dict, str]:
    """(config overrides for ``model``, a one-line description) of the schedule ``name``: ``paper``,
    ``cpu`` or a JSON file ``{model: {config field: value}}``; ``n_train``: the images that train."""
    name = ALIASES.get(name, name)
    if name == "paper":
        return {}, "the paper's schedule"
    if name in SCHEDULE_NAMES[2:]:
        schedules = model_class(model).schedules
        if name in schedules:
            return schedules[name](n_train)
        if "cpu" in schedules:  # the other names fall back to cpu
            overrides, words = schedules["cpu"](n_train)
            return overrides, f"{words} (model '{model}' has no {name} schedule)"
        return {}, f"the paper's schedule (model '{model}' has no {name} schedule)"
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DestsegError(f"{path}: invalid schedule JSON ({exc})") from None
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise DestsegError(f"{path}: a schedule file maps model names to {{config field: value}} objects")
        return dict(table.get(model, {})), f"schedule file {path}"
    raise DestsegError(f"--schedule '{name}': not {', '.join(SCHEDULE_NAMES)} or an existing .json file")


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
