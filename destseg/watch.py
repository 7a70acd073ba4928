"""``destseg watch``: score every image that appears in a folder (recursively) exactly once.

The journal is OUT/results.csv itself: one row per scored image (file, score, decision, threshold, time,
overlay, mask), appended per batch in one write and synced, after the batch's PNGs are on disk. On start the
rows already there are the images already scored (a row cut by a kill is dropped and its image scored again,
its PNGs rewritten), so a restart, Ctrl-C or kill -9 neither loses nor repeats an image. OUT/skipped.csv lists
the files given up on, with the reason, the same way.

Each scan lists every folder but looks only at the names it has not met before (per folder, the names
already scored or of no interest are kept), so a folder that has gathered weeks of scored images costs little
more than its listing (docs/BENCHMARKS.md, "destseg watch": 50,000 scored images, 36 ms of CPU a scan).

A file is scored once it has stopped changing (size and modification time the same over ``settle_s``, or
last modified longer ago than that). One that does not decode yet (a camera still writing it) is tried again
on later scans; only when it has been unchanged for ``retry_s`` and still does not decode is it skipped as
unreadable. ``once``: score what is ready and exit (for cron); files still being written are left for the
next run. The thresholds are read again when RUN/thresholds.json changes (``destseg recalibrate``), and every
batch updates the drift check (destseg.drift) in OUT/drift.json and OUT/watch.log.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from destseg.checkpoint import atomic_write_text
from destseg.data.images import IMAGE_EXTENSIONS, hw
from destseg.device import io_workers
from destseg.drift import DriftMonitor
from destseg.errors import DestsegError
from destseg.infer import Detector
from destseg.predict import load_for_model, write_pngs
from destseg.thresholds import in_force, utc_now

COLUMNS = ["file", "score", "decision", "threshold", "time", "overlay", "mask"]


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time the file was first seen with this size and mtime


@dataclass
class _Folder:
    """The names in one input folder that the last scan sorted out for good."""
    done: set[str] = field(default_factory=set)  # images scored or skipped
    other: set[str] = field(default_factory=set)  # hidden files, not images, links to folders, OUT
    folders: set[str] = field(default_factory=set)  # subfolders, scanned in turn


class Journal:
    """A CSV file of rows appended per batch; the files it names are done. Memory holds the names of the
    files done and the last ``tail`` rows, not every row."""

    def __init__(self, path: Path, columns: list[str], tail: int = 0):
        self.path, self.columns = path, columns
        self.count = 0
        self.files: set[str] = set()
        self.tail: deque[dict] = deque(maxlen=tail)
        if path.is_file() and path.stat().st_size:  # a file of another program is refused before a byte changes
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
            if header != columns:
                raise DestsegError(f"{path}: not written by `destseg watch` (columns {header}, expected "
                                   f"{columns}); choose another --out")
            _drop_cut_line(path)
        if not path.is_file() or path.stat().st_size == 0:
            self._write(",".join(columns) + "\n")
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                self._keep(row)

    def _keep(self, row: dict) -> None:
        self.count += 1
        self.files.add(row["file"])
        self.tail.append(row)

    def append(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for r in rows:
            writer.writerow([r[c] for c in self.columns])
        self._write(buf.getvalue())
        for r in rows:
            self._keep(r)

    def forget_except(self, present: set[str]) -> None:
        """Drop from memory the names of files no longer in the input (a camera folder is cleaned out; a
        file written again later under the same name is then a new image and is scored)."""
        self.files &= present

    def forget(self, name: str) -> None:
        """:meth:`forget_except` for one file that is gone."""
        self.files.discard(name)

    def _write(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            left = memoryview(text.encode())
            while left:  # a short write (a nearly full disk) goes on where it stopped; a full one raises
                left = left[os.write(fd, left):]
            os.fsync(fd)
        finally:
            os.close(fd)


def _drop_cut_line(path: Path) -> None:
    """Truncate a file after its last newline: the line a kill cut short."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())


def output_name(rel: str) -> str:
    """The PNG name of an input, deterministic (a restart writes the same files) and unique per input: ``a.png``
    keeps its name, anything else gets ``.png`` added (``a.jpg`` -> ``a.jpg.png``), and so does a PNG whose
    name without it has an image extension (``a.jpg.png`` -> ``a.jpg.png.png``, not ``a.jpg``'s name)."""
    stem, ext = os.path.splitext(rel)
    if ext.lower() == ".png" and os.path.splitext(stem)[1].lower() not in IMAGE_EXTENSIONS:
        return rel
    return rel + ".png"


class Watcher:
    """The state of one ``watch``: what is done, what is waiting, the model and the outputs."""

    def __init__(self, detector: Detector, input_dir: Path, out: Path, batch_size: int, settle_s: float,
                 retry_s: float, output_size: str, workers: int, drift_window: int, log=print):
        self.det, self.input_dir, self.out = detector, input_dir, out
        self.out_resolved = out.resolve()
        self.batch_size, self.settle_s, self.retry_s, self.output_size = batch_size, settle_s, retry_s, output_size
        self.log = log
        self.stop: threading.Event | None = None  # set by Ctrl-C: stop between batches
        self.results = Journal(out / "results.csv", COLUMNS, tail=drift_window)
        self.skipped = Journal(out / "skipped.csv", ["file", "reason", "time"], tail=1)
        self.seen: dict[str, _Seen] = {}
        self.failed: dict[str, tuple[str, float]] = {}  # file -> (why it did not decode, first failure)
        self.folders: dict[str, _Folder] = {}  # 'sub/dir/' (or '' for --input) -> what the last scan found
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="destseg-watch") if workers > 0 else None
        self.thresholds_mtime = None
        self._reload_thresholds()
        calibration = detector.calibration  # the good images' scores by the engine that decides here
        self.drift = DriftMonitor(calibration["scores"] if calibration else [], window=drift_window)
        for row in self.results.tail:
            self.drift.add(float(row["score"]))
        self.drift_state = self.drift.state()["state"]

    def _reload_thresholds(self) -> None:
        """Pick up RUN/thresholds.json again when it changed (a recalibration)."""
        run = self.det.run
        path = run.path / "thresholds.json" if run else None
        mtime = path.stat().st_mtime_ns if path and path.is_file() else None
        if mtime != self.thresholds_mtime:
            if self.thresholds_mtime is not None:
                self.det.reload_thresholds()
                self.log(f"destseg watch: thresholds reloaded (since {self.det.thresholds.get('since')}; "
                         f"{self.det.engine})")
            self.thresholds_mtime = mtime
        self.image_thr, self.pixel_thr = in_force(self.det.thresholds)
        if self.image_thr is None:
            raise DestsegError(f"{run.path if run else 'run'}: no stored threshold (run `destseg test` first)")

    def scan(self) -> tuple[list[str], int]:
        """(files ready to score, files still settling or retrying). Each folder is listed, but only the names
        not met before are looked at: a scan costs little more than the listing, however many images the
        folder already holds (the names of a folder's scored files are kept per folder, see _Folder)."""
        now, wall = time.monotonic(), time.time()
        ready, pending, first = [], set(), not self.folders
        self._scan_folder("", ready, pending, now, wall)
        if first:  # files scored in an earlier run that are gone now: a new file under that name is new
            present = {prefix + name for prefix, f in self.folders.items() for name in f.done}
            self.results.forget_except(present)
            self.skipped.forget_except(present)
        for gone in set(self.seen) - pending:
            del self.seen[gone]
            self.failed.pop(gone, None)
        return ready, len(pending) - len(ready)

    def _scan_folder(self, prefix: str, ready: list[str], pending: set[str], now: float, wall: float) -> bool:
        """One folder (``prefix``: its path below the input, with a trailing /, or ''), then its subfolders;
        False if it is no longer a folder."""
        path = os.path.join(self.input_dir, prefix)
        try:
            names = set(os.listdir(path))
        except OSError:  # gone (or replaced by a file) since it was listed
            self._forget_folder(prefix)
            return False
        f = self.folders.setdefault(prefix, _Folder())
        for name in f.done - names:  # a scored file removed: the same name written again is a new image
            self.results.forget(prefix + name)
            self.skipped.forget(prefix + name)
        for name in f.folders - names:
            self._forget_folder(prefix + name + "/")
        f.done &= names
        f.other &= names
        f.folders &= names
        for name in sorted(names - f.done - f.other - f.folders):
            full, rel = os.path.join(path, name), prefix + name
            if os.path.isdir(full):
                # not into links (as os.walk) nor into OUT (inside --input, its overlays would come back)
                inside = not os.path.islink(full) and Path(full).resolve() != self.out_resolved
                (f.folders if inside else f.other).add(name)
                continue
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                f.other.add(name)
                continue
            if rel in self.results.files or rel in self.skipped.files:
                f.done.add(name)
                continue
            try:
                st = os.stat(full)
            except OSError:  # gone between the listing and the stat
                continue
            pending.add(rel)
            seen = self.seen.get(rel)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                seen = self.seen[rel] = _Seen(st.st_size, st.st_mtime_ns, now)
                self.failed.pop(rel, None)  # changed since it failed: try again
            settled = now - seen.since >= self.settle_s or wall - st.st_mtime >= self.settle_s
            if not settled:
                continue
            if rel in self.failed and now - self.failed[rel][1] >= self.retry_s:  # unreadable for --retry seconds
                pending.discard(rel)
                self.skipped.append([{"file": rel, "reason": self.failed.pop(rel)[0], "time": utc_now()}])
                self.log(f"destseg watch: skipped {rel}: {self.skipped.tail[-1]['reason']}", file=sys.stderr)
                f.done.add(name)
                continue
            ready.append(rel)
        for name in sorted(f.folders):
            if not self._scan_folder(prefix + name + "/", ready, pending, now, wall):
                f.folders.discard(name)  # looked at afresh next time
        return True

    def _forget_folder(self, prefix: str) -> None:
        """A folder that is gone: its files and subfolders are forgotten."""
        for key in [k for k in self.folders if k.startswith(prefix)]:
            for name in self.folders.pop(key).done:
                self.results.forget(key + name)
                self.skipped.forget(key + name)

    def score(self, files: list[str]) -> int:
        """Score ``files`` in batches, each under the thresholds in force when it starts (a recalibration is taken
        up by the next batch); returns how many were scored (the rest failed to decode)."""
        size = self.det.config.image_size
        done = 0
        for i in range(0, len(files), self.batch_size):
            if self.stop is not None and self.stop.is_set():  # Ctrl-C: the rest is scored by the next run
                break
            self._reload_thresholds()
            chunk = files[i:i + self.batch_size]
            paths = [self.input_dir / rel for rel in chunk]
            loaded = list(self.pool.map(lambda p: load_for_model(p, size), paths)) if self.pool else \
                [load_for_model(p, size) for p in paths]
            good = []
            for rel, (_, img, error, in_hw) in zip(chunk, loaded):
                if error is None:
                    good.append((rel, img, in_hw))
                else:  # tried again at each scan (every --interval) until --retry seconds after the first failure
                    self.failed[rel] = (error, self.failed.get(rel, (None, time.monotonic()))[1])
            if not good:
                continue
            preds = self.det.predict_batch([img for _, img, _ in good], threshold=self.image_thr)
            jobs, rows = [], []
            for (rel, img, in_hw), pred in zip(good, preds):
                name = output_name(rel)
                over, mask = self.out / "overlays" / name, self.out / "masks" / name
                over.parent.mkdir(parents=True, exist_ok=True)
                mask.parent.mkdir(parents=True, exist_ok=True)
                out_hw = in_hw if self.output_size == "input" else hw(size)
                jobs.append((over, mask, self.input_dir / rel, img, pred.map, out_hw, self.pixel_thr))
                rows.append({"file": rel, "score": f"{pred.score:.9g}", "decision": "defect" if pred.is_defect else "ok",
                             "threshold": f"{self.image_thr:.9g}", "time": utc_now(),
                             "overlay": f"overlays/{name}", "mask": f"masks/{name}"})
            if self.pool:
                list(self.pool.map(lambda job: write_pngs(*job), jobs))
            else:
                for job in jobs:
                    write_pngs(*job)
            self.results.append(rows)  # the journal entry, once the PNGs are on disk
            for r in rows:
                self.seen.pop(r["file"], None)
                if r["decision"] == "defect":  # each defect decision as it happens, once it is journalled
                    self.log(f"destseg watch: DEFECT {r['file']} score {float(r['score']):.4g} >= threshold "
                             f"{float(r['threshold']):.4g} (overlay {r['overlay']})", flush=True)
            for pred in preds:
                self.drift.add(pred.score)
            self._report_drift(len(rows), sum(r["decision"] == "defect" for r in rows))
            done += len(rows)
        return done

    def _report_drift(self, n: int, n_defect: int) -> None:
        state = self.drift.state()
        atomic_write_text(self.out / "drift.json", json.dumps(state, indent=1) + "\n")
        with open(self.out / "watch.log", "a") as f:
            f.write(json.dumps({"time": utc_now(), "engine": self.det.engine, "scored": n, "defect": n_defect,
                                "total": self.results.count, "drift": state}) + "\n")
        if state["state"] != self.drift_state:
            if state["state"] == "warning":
                self.log(f"destseg watch: DRIFT WARNING: {state['above']} of the last {state['window']} scores "
                         f"above the good images' reference (expected {state['expected_share']:.1%} of them; "
                         f"p = {state['p_value']:.2g})", file=sys.stderr)
            elif self.drift_state == "warning":
                self.log("destseg watch: drift back to ok", file=sys.stderr)
            self.drift_state = state["state"]

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True)


def _check(input_dir: Path, interval: float, settle_s: float, retry_s: float, batch_size: int,
           output_size: str, drift_window: int) -> None:
    if not input_dir.is_dir():
        raise DestsegError(f"--input {input_dir}: not a folder")
    for flag, value, lo in (("--interval", interval, 0.05), ("--settle", settle_s, 0.0), ("--retry", retry_s, 0.0)):
        if not lo <= value <= 86400:
            raise DestsegError(f"{flag} must be between {lo} and 86400 seconds (got {value})")
    if batch_size < 1:
        raise DestsegError(f"--batch-size must be at least 1 (got {batch_size})")
    if output_size not in ("input", "model"):
        raise DestsegError(f"--output-size must be input or model (got {output_size!r})")
    if drift_window < 10:
        raise DestsegError(f"--drift-window must be at least 10 images (got {drift_window})")


class _Stop:
    """Ctrl-C or SIGTERM asks the watcher to stop between two steps (a scan, a batch scored and journalled, a
    wait), so that no journal row is ever left without the line that reports it; a second one stops at once."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, *_):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()


def watch(run_dir, input_dir, out, once: bool = False, interval: float = 1.0, settle_s: float = 1.0,
          retry_s: float = 30.0, batch_size: int = 16, device: str = "auto", precision: str = "auto",
          backend: str = "auto", compile: str = "auto", workers: int = -1, output_size: str = "input",
          drift_window: int = 200) -> int:
    """Watch ``input_dir`` until interrupted (or, with ``once``, until what is ready is scored)."""
    input_dir, out = Path(input_dir), Path(out)
    _check(input_dir, interval, settle_s, retry_s, batch_size, output_size, drift_window)
    if workers < -1:
        raise DestsegError(f"--workers must be -1 (automatic) or more (got {workers})")
    detector = Detector.load(run_dir, device=device, precision=precision, backend=backend, compile=compile)
    out.mkdir(parents=True, exist_ok=True)  # only once everything checked out
    lock = open(out / ".watch.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DestsegError(f"{out}: another `destseg watch` is writing there") from None
    workers = io_workers(detector.device) if workers < 0 else workers
    watcher = Watcher(detector, input_dir, out, batch_size, settle_s, retry_s, output_size, workers, drift_window)
    stop = _Stop()
    watcher.stop = stop.event
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:          # SIGINT too: started in the background (`destseg watch &` from a script) it
        signal.signal(sig, stop)  # inherits SIGINT ignored; training stops too
    before = watcher.results.count
    print(f"destseg watch: {input_dir} -> {out}/results.csv ({before} images already scored; threshold "
          f"{watcher.image_thr:.4g}, decided by {detector.engine}; {'once' if once else 'Ctrl-C stops'})", flush=True)
    try:
        while not stop.event.is_set():
            ready, waiting = watcher.scan()
            n = watcher.score(ready) if ready else 0
            if n:
                print(f"destseg watch: {n} scored, {watcher.results.count} in all; drift "
                      f"{watcher.drift_state}", flush=True)
                continue  # scan again at once: more may have come meanwhile
            if once:
                left = waiting + len(ready)  # nothing of ready decoded this time
                if left:
                    print(f"destseg watch: {left} file(s) still being written or not readable yet: left for "
                          "the next run", flush=True)
                break
            stop.event.wait(interval)
        if stop.event.is_set():
            print("destseg watch: stopped; run it again to go on where it stopped", file=sys.stderr)
    except KeyboardInterrupt:
        print("destseg watch: stopped; run it again to go on where it stopped", file=sys.stderr)
    finally:
        watcher.close()
        lock.close()
        for sig, handler in previous.items():  # the caller's handlers back (the API, a test process)
            signal.signal(sig, handler)
    print(f"destseg watch: {watcher.results.count - before} images scored in this run, "
          f"{watcher.skipped.count} skipped in all", flush=True)
    return 0
