"""Feedback on decisions, kept in the run, and recalibration of the thresholds with it.

A person marks a decision as a ``false_alarm`` (a good image called defect) or a ``missed_defect`` (a defect
called OK). The image is kept in RUN/feedback/<kind>/ under its content hash (marking it twice keeps one copy)
and listed in RUN/feedback/feedback.jsonl. :func:`recalibrate` refits the image and pixel thresholds under the
rule training uses (split conformal at the run's false-positive target, destseg.thresholds) on the good
images' calibration scores (RUN/calibration.json) plus the false alarms, scored again by the model in use;
the thresholds replaced stay in RUN/thresholds-history/. Missed defects cannot move a good-image threshold:
they are counted, and the new thresholds say how many of them they would catch.

The false alarms are good images the thresholds in force called defects when they were marked: an image they
call OK is refused as a false alarm (:func:`check_false_alarm`; the entry keeps the threshold it was checked
against). They scored above the threshold, so adding them can only raise it: the false-positive bound stays
valid (it only gets more conservative) and the miss rate can grow; ``destseg recalibrate`` prints the
thresholds before and after.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from destseg.checkpoint import atomic_write
from destseg.errors import DestsegError
from destseg.run import Run, calibration_unseen
from destseg.scoring import score_files
from destseg.thresholds import good_image_thresholds, utc_now

KINDS = ("false_alarm", "missed_defect")


def _dir(run: Run) -> Path:
    return run.path / "feedback"


def read_feedback(run_dir) -> list[dict]:
    """The feedback entries of a run, oldest first (a line cut by a crash is ignored)."""
    path = _dir(Run(run_dir)) / "feedback.jsonl"
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def check_false_alarm(score: float | None, thresholds: dict | None, name: str = "the image") -> None:
    """A false alarm is a good image the thresholds in force called a defect: refuse one they called OK (or whose
    score is not known), with the reason. Marks on OK images would pull the refitted threshold down, below what
    its false-positive bound promises."""
    threshold = (thresholds or {}).get("image")
    if score is None:
        raise DestsegError(f"{name}: a false alarm needs the image's score under the thresholds in force "
                           "(add_feedback(..., score=detector.predict(image).score))")
    if threshold is not None and score < threshold:
        raise DestsegError(f"{name}: not a false alarm: the thresholds in force call it OK (score {score:.4g} < "
                           f"threshold {threshold:.4g}); only an image called a defect can be marked as a false "
                           "alarm (marking OK images would lower the threshold below its stated bound)")


def add_feedback(run_dir, image, kind: str, name: str = "", score: float | None = None,
                 in_force: dict | None = None) -> dict:
    """Keep ``image`` (PIL image, uint8 array or path) in the run as ``kind``; returns its entry. An image
    already marked with the same kind is not added again (``entry["new"]`` is False). A false alarm needs its
    ``score``, at or above the image threshold in force (``in_force``: the thresholds of the engine that scored
    it; default: the run's thresholds.json; :func:`check_false_alarm`)."""
    if kind not in KINDS:
        raise DestsegError(f"feedback kind must be one of {', '.join(KINDS)} (got {kind!r})")
    run = Run(run_dir)
    in_force = (in_force if in_force is not None else run.thresholds()) or {}
    if kind == "false_alarm":
        check_false_alarm(score, in_force, name or (str(image) if isinstance(image, (str, Path)) else "the image"))
    if isinstance(image, (str, Path)):
        from destseg.data.images import read_rgb

        name = name or str(image)
        image = read_rgb(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:16]
    for entry in read_feedback(run.path):
        if entry["id"] == digest and entry["kind"] == kind:
            return {**entry, "new": False}
    rel = f"{kind}/{digest}.png"
    atomic_write(_dir(run) / rel, lambda f: f.write(data))
    entry = {"id": digest, "kind": kind, "image": rel, "name": name, "score": score,
             "threshold": in_force.get("image"), "time": utc_now()}
    _append_line(_dir(run) / "feedback.jsonl", json.dumps(entry))
    return {**entry, "new": True}


def _append_line(path: Path, line: str) -> None:
    """One line appended in a single write and synced: a crash leaves the line whole or cut, never two
    lines mixed (readers skip a cut line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and not _ends_with_newline(path):
            line = "\n" + line  # a line cut by a crash stays alone on its line
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def recalibrate(detector, fpr: float | None = None, predict=None, batch: int = 16) -> dict:
    """Refit the run's thresholds on its good calibration images plus the false alarms marked so far,
    write them (the previous ones go to the history) and set them on ``detector``. Returns
    ``{"before", "after", "n_calibration", "n_false_alarms", "n_missed_defects", "missed_caught"}``.

    The images are scored ``batch`` at a time by ``predict`` (a list of images -> their Predictions;
    ``detector.predict_batch`` by default): the service passes one that runs each batch on its model thread,
    so that requests are answered between the batches rather than after the whole recalibration."""
    predict = predict or detector.predict_batch
    run: Run = detector.run
    calibration = run.calibration()
    if calibration is None:
        raise DestsegError(f"{run.path}: no calibration.json (the run was trained before this version kept the "
                           "good images' scores): run `destseg test` on a split of good images, or train again")
    before = run.thresholds() or {}
    fpr = fpr if fpr is not None else (before.get("fpr_target") or (before.get("good_images") or {}).get(
        "fpr_target") or 0.01)
    entries = read_feedback(run.path)
    scored = {kind: score_files(predict, [_dir(run) / e["image"] for e in entries if e["kind"] == kind], batch)
              for kind in KINDS}
    files = [Path(f) for f in calibration["files"]]
    if files and all(f.is_file() for f in files):  # scored again by the model in use, as the feedback images
        cal_scores, cal_peaks = score_files(predict, files, batch)
        what = calibration["what"]
    else:
        cal_scores, cal_peaks = np.asarray(calibration["scores"]), np.asarray(calibration["peaks"])
        what = calibration["what"] + " (their scores from training: the images are no longer there)"
    scores = np.concatenate([cal_scores, scored["false_alarm"][0]])
    peaks = np.concatenate([cal_peaks, scored["false_alarm"][1]])
    n_fa = len(scored["false_alarm"][0])
    what += f" and {n_fa} false alarms marked by a person" if n_fa else ""
    unseen = calibration_unseen(calibration)
    after = good_image_thresholds(scores, peaks, fpr, what, unseen)
    after["feedback"] = {"false_alarms": n_fa, "missed_defects": len(scored["missed_defect"][0])}
    after["engine"] = detector.engine  # every score above is this engine's
    after = run.write_thresholds(after)
    detector.thresholds = after
    if detector.engine and files and all(f.is_file() for f in files):  # its calibration scores, for drift
        from destseg.engine_thresholds import keep

        detector.calibration = keep(run, detector.engine, after, calibration["what"], unseen, files, cal_scores,
                                    cal_peaks)
    missed = scored["missed_defect"][0]
    return {"before": before, "after": after, "n_calibration": len(calibration["scores"]), "n_false_alarms": n_fa,
            "n_missed_defects": len(missed), "missed_caught": int((missed >= after["image"]).sum())}
