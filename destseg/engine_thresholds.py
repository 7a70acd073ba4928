"""Good-image thresholds and calibration scores of the engine that decides (OpenVINO int8, torch bf16...).

Training sets the good-image thresholds with the model in its training precision (``engine`` in
thresholds.json, e.g. "torch bf16"), but another engine may decide: on a CPU without native bf16, OpenVINO
int8. Its scores differ a little, so a threshold (and the false-positive bound it states) is only true of the
engine whose scores set it. At its first use by another engine, the calibration images (and the false alarms a
recalibration added) are scored again by that engine, the same rule sets its thresholds, and the result is kept
in RUN/engines/<engine>.json, tied to the thresholds.json it derives from (a digest of its content): a
recalibration, or an edit, makes each engine derive its own again. Thresholds a person set (any other
``source``, e.g. "manual"), that a labelled test split set, or that name no engine are used as they are.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from destseg.checkpoint import atomic_write_text
from destseg.run import calibration_unseen
from destseg.scoring import score_files
from destseg.thresholds import good_image_thresholds

ENGINES_DIR = "engines"


def engine_file(run_path: Path, engine: str) -> Path:
    return Path(run_path) / ENGINES_DIR / (engine.replace(" ", "-") + ".json")


def for_engine(run, engine: str, predict_batch, batch: int = 16) -> tuple[dict | None, dict | None]:
    """(the thresholds in force for ``engine``, the calibration record of its scores): the stored ones where
    they were set by this engine or not from good images; else those of this engine, derived once and kept.
    ``predict_batch``: images -> Predictions, by the engine."""
    stored, calibration = run.thresholds(), run.calibration()
    if stored is None or calibration is None or stored.get("source") != "good_images" or not stored.get("engine"):
        return stored, calibration  # set by a person, a test split, or a version that did not name its engine
    path = engine_file(run.path, engine)
    if path.is_file():
        try:
            kept = json.loads(path.read_text())
            if kept.get("for") == _key(stored):
                return kept["thresholds"], kept["calibration"]
        except (json.JSONDecodeError, KeyError):
            pass  # remade below
    if stored.get("engine") == engine:
        return stored, calibration
    files = [Path(f) for f in calibration["files"]]
    extra = _false_alarm_images(run, stored)
    if not files or not all(f.is_file() for f in files + extra):
        warnings.warn(f"{run.path}: the thresholds were set by {stored.get('engine', 'the training model')}, and "
                      f"{engine} decides here; its calibration images are not here to score them again, so its "
                      "decisions use thresholds of slightly different scores", stacklevel=3)
        return stored, calibration
    scores, peaks = score_files(predict_batch, files + extra, batch)
    what = calibration["what"] + (f" and {len(extra)} false alarms marked by a person" if extra else "")
    unseen = calibration_unseen(calibration)
    derived = good_image_thresholds(scores, peaks, stored.get("fpr_target") or 0.01, f"{what}, scored by {engine}",
                                    unseen)
    derived.update(engine=engine, since=stored.get("since"),
                   derived_from=f"thresholds.json of {stored.get('since')} ({stored.get('engine', 'training model')})")
    record = keep(run, engine, derived, calibration["what"], unseen, files, scores[:len(files)], peaks[:len(files)])
    return derived, record


def _key(stored: dict) -> str:
    """What a kept engine record derives from: the digest of RUN/thresholds.json's content (what `destseg test`
    records beside the thresholds in force left out: it does not change them)."""
    in_force = {k: v for k, v in stored.items() if k != "measured_on_test"}
    return hashlib.sha256(json.dumps(in_force, sort_keys=True).encode()).hexdigest()[:16]


def keep(run, engine: str, thresholds: dict, what: str, unseen: bool, files, scores, peaks) -> dict:
    """Keep ``engine``'s thresholds and its scores of the calibration images in RUN/engines/, tied to the
    thresholds.json in force now; returns the calibration record."""
    record = {"what": f"{what}, scored by {engine}", "unseen": unseen, "files": [str(f) for f in files],
              "scores": [float(s) for s in scores], "peaks": [float(p) for p in peaks]}
    atomic_write_text(engine_file(run.path, engine), json.dumps(
        {"for": _key(run.thresholds() or {}), "engine": engine, "thresholds": thresholds, "calibration": record},
        indent=1) + "\n")
    return record


def _false_alarm_images(run, stored: dict) -> list[Path]:
    if not (stored.get("feedback") or {}).get("false_alarms"):
        return []
    from destseg.feedback import read_feedback

    return [run.path / "feedback" / e["image"] for e in read_feedback(run.path) if e["kind"] == "false_alarm"]
