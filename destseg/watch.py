"""``destseg watch``: score every image that appears in a folder (recursively), exactly once per content.

The journal is OUT/journal.sqlite (destseg.journal): one row per image content (its SHA-256) scored or given up
on, written in one transaction per batch after the batch's PNGs are on disk and synced. On start it says what is
done, so a restart, Ctrl-C or kill -9 neither loses nor repeats an image. OUT/results.csv and OUT/skipped.csv are
its readable exports.

A file is known by its content, not its name: a file name is read (and hashed) when it is new, or when its size,
modification time or inode differ from when its content was last recorded (another file renamed over it, or it
was rewritten, while ``watch`` ran or was stopped). A content met before, under any name, is not scored again.
Each scan lists every folder but looks only at the names it has not met before (per folder, the names already
done or of no interest are kept), so a folder that has gathered weeks of scored images costs little more than
its listing (docs/BENCHMARKS.md, "destseg watch"); every ``FULL_CHECK_S`` seconds a scan also stats the names
done, to notice those rewritten in place.

A file is scored once it has stopped changing (size and modification time the same over ``settle_s``, or
last modified longer ago than that). One that does not decode (a camera still writing it) is tried again at
each scan until ``retry_s`` seconds after its first failure, then given up on (skipped.csv). ``once``: score
what is ready and exit (for cron); files still being written are left for the next run. The thresholds are
read again before each batch when RUN/thresholds.json changed (``destseg recalibrate``), and every batch updates
the drift check (destseg.drift) in OUT/drift.json and OUT/watch.log.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from destseg.checkpoint import atomic_write_text
from destseg.data.images import IMAGE_EXTENSIONS, decode_rgb, hw, resize_rgb
from destseg.device import io_workers
from destseg.drift import DriftMonitor
from destseg.errors import DestsegError, ImageError
from destseg.infer import Detector
from destseg.journal import RESULT_COLUMNS as COLUMNS, Journal, sha256_of, stat_key
from destseg.predict import write_pngs
from destseg.thresholds import in_force, utc_now

FULL_CHECK_S = 10.0  # how often a scan also stats the names already done (rewritten in place?)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time the file was first seen with this size and mtime


@dataclass
class _Folder:
    """The names in one input folder that the last scan sorted out for good."""
    done: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # content recorded: (size, mtime_ns, inode)
    other: set[str] = field(default_factory=set)  # hidden files, not images, links to folders, OUT
    folders: set[str] = field(default_factory=set)  # subfolders, scanned in turn


@dataclass
class _Loaded:
    """One file read for scoring: its bytes' hash and stat, and the image (or why it does not decode)."""
    rel: str
    data: bytes = b""
    sha: str = ""
    key: tuple[int, int, int] = (0, 0, 0)
    img: object = None
    in_hw: tuple[int, int] = (0, 0)
    error: str | None = None


MAX_FILE_BYTES = 512 * 2**20  # larger than any image the decoder accepts (64 Mpixel): not read into memory


def _load(path: Path, rel: str, size) -> _Loaded:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size > MAX_FILE_BYTES:
                return _Loaded(rel, error=f"{path}: {st.st_size / 2**20:.0f} MiB, larger than any image destseg "
                                          f"reads ({MAX_FILE_BYTES // 2**20} MiB)")
            data = f.read()
            key = stat_key(os.fstat(f.fileno()))
    except OSError as exc:
        return _Loaded(rel, error=f"{path}: {exc.strerror or exc}")
    item = _Loaded(rel, data, sha256_of(data), key)
    try:
        img = decode_rgb(data, str(path))
        item.img, item.in_hw = resize_rgb(img, size), (img.height, img.width)
    except ImageError as exc:
        item.error = str(exc)
    return item


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
        self.journal = Journal(out, input_dir)
        self.seen: dict[str, _Seen] = {}
        self.failed: dict[str, tuple[str, float]] = {}  # file -> (why it did not decode, first failure)
        self.folders: dict[str, _Folder] = {}  # 'sub/dir/' (or '' for --input) -> what the last scan found
        self.full_check_s, self.last_full_check = FULL_CHECK_S, time.monotonic()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="destseg-watch") if workers > 0 else None
        self.thresholds_mtime = None
        self._reload_thresholds()
        calibration = detector.calibration  # the good images' scores by the engine that decides here
        self.drift = DriftMonitor(calibration["scores"] if calibration else [], window=drift_window)
        for score in self.journal.last_scores(drift_window):
            self.drift.add(score)
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
        not met before are looked at (and, every ``full_check_s`` seconds, the stat of the names done): a scan
        costs little more than the listing, however many images the folder already holds."""
        now, wall = time.monotonic(), time.time()
        full = now - self.last_full_check >= self.full_check_s
        if full:
            self.last_full_check = now
        ready, pending = [], set()
        self._scan_folder("", ready, pending, now, wall, full)
        for gone in set(self.seen) - pending:
            del self.seen[gone]
            self.failed.pop(gone, None)
        return ready, len(pending) - len(ready)

    def _scan_folder(self, prefix: str, ready: list[str], pending: set[str], now: float, wall: float,
                     full: bool) -> bool:
        """One folder (``prefix``: its path below the input, with a trailing /, or ''), then its subfolders;
        False if it is no longer a folder."""
        path = os.path.join(self.input_dir, prefix)
        try:
            names = set(os.listdir(path))
        except OSError:  # gone (or replaced by a file) since it was listed
            self._forget_folder(prefix)
            return False
        f = self.folders.setdefault(prefix, _Folder())
        for name in f.folders - names:
            self._forget_folder(prefix + name + "/")
        for name in f.done.keys() - names:  # removed: a file written later under this name is read again
            del f.done[name]
        f.other &= names
        f.folders &= names
        if full:  # rewritten in place, or replaced by another file: its content is looked at again
            for name, key in list(f.done.items()):
                try:
                    if stat_key(os.stat(os.path.join(path, name))) != key:
                        del f.done[name]
                except OSError:
                    del f.done[name]
        for name in sorted(names - f.done.keys() - f.other - f.folders):
            full_path, rel = os.path.join(path, name), prefix + name
            if os.path.isdir(full_path):
                # not into links (as os.walk) nor into OUT (inside --input, its overlays would come back)
                inside = not os.path.islink(full_path) and Path(full_path).resolve() != self.out_resolved
                (f.folders if inside else f.other).add(name)
                continue
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                f.other.add(name)
                continue
            try:
                st = os.stat(full_path)
            except OSError:  # gone between the listing and the stat
                continue
            if self.journal.known(rel, stat_key(st)):  # its content is recorded, and it has not changed since
                f.done[name] = stat_key(st)
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
                self._give_up(rel, full_path, f, name)
                continue
            ready.append(rel)
        for name in sorted(f.folders):
            if not self._scan_folder(prefix + name + "/", ready, pending, now, wall, full):
                f.folders.discard(name)  # looked at afresh next time
        return True

    def _give_up(self, rel: str, full_path: str, f: _Folder, name: str) -> None:
        """Record a file that did not decode for --retry seconds in skipped (by its content, so that a changed
        file is tried again)."""
        reason = self.failed.pop(rel)[0]
        item = _load(Path(full_path), rel, self.det.config.image_size)
        if not item.sha:  # not even readable: keyed by its name and modification time
            try:
                item.key = stat_key(os.stat(full_path))
            except OSError:
                return  # gone meanwhile
            item.sha = f"unreadable:{rel}:{item.key[1]}"
        names = [(rel, item.sha, *item.key)]
        if self.journal.content(item.sha) is None:
            self.journal.record(skipped=[{"file": rel, "sha256": item.sha, "reason": reason, "time": utc_now()}],
                                names=names)
            self.log(f"destseg watch: skipped {rel}: {reason}", file=sys.stderr)
        else:
            self.journal.record(names=names)
        f.done[name] = item.key

    def _forget_folder(self, prefix: str) -> None:
        """A folder that is gone: what was found in it and below is forgotten."""
        for key in [k for k in self.folders if k.startswith(prefix)]:
            del self.folders[key]

    def score(self, files: list[str]) -> int:
        """Score ``files`` in batches, each under the thresholds in force when it starts (a recalibration is taken
        up by the next batch); returns how many were scored (the rest failed to decode, or held a content
        already scored)."""
        size = self.det.config.image_size
        done = 0
        for i in range(0, len(files), self.batch_size):
            if self.stop is not None and self.stop.is_set():  # Ctrl-C: the rest is scored by the next run
                break
            self._reload_thresholds()
            chunk = files[i:i + self.batch_size]
            load = lambda rel: _load(self.input_dir / rel, rel, size)  # noqa: E731
            loaded = list(self.pool.map(load, chunk)) if self.pool else [load(rel) for rel in chunk]
            good, names, batch_shas = [], [], set()
            for item in loaded:
                known = self.journal.content(item.sha) if item.sha else None
                if known is not None or item.sha in batch_shas:  # a content met before: its name is recorded
                    names.append((item.rel, item.sha, *item.key))
                    first = known["file"] if known else "another file of this batch"
                    self.log(f"destseg watch: {item.rel}: same content as {first}, not scored again")
                elif item.error is None:
                    good.append(item)
                    batch_shas.add(item.sha)
                else:  # tried again at each scan (every --interval) until --retry seconds after the first failure
                    self.failed[item.rel] = (item.error, self.failed.get(item.rel, (None, time.monotonic()))[1])
            rows = []
            if good:
                rows = self._score_batch(good, size)
                names += [(g.rel, g.sha, *g.key) for g in good]
            if names:
                self.journal.record(scored=rows, names=names)  # the batch, once its PNGs are on disk
            for rel, *_ in names:
                self.seen.pop(rel, None)
            for r in rows:
                if r["decision"] == "defect":  # each defect decision as it happens, once it is journalled
                    self.log(f"destseg watch: DEFECT {r['file']} score {r['score']:.4g} >= threshold "
                             f"{r['threshold']:.4g} (overlay {r['overlay']})", flush=True)
            if rows:
                for r in rows:  # the drift check takes up what the journal holds
                    self.drift.add(r["score"])
                self._report_drift(len(rows), sum(r["decision"] == "defect" for r in rows))
            done += len(rows)
        return done

    def _score_batch(self, good: list[_Loaded], size) -> list[dict]:
        """Predict, write and sync the PNGs; the journal rows."""
        preds = self.det.predict_batch([g.img for g in good], threshold=self.image_thr)
        jobs, rows = [], []
        for g, pred in zip(good, preds):
            name = output_name(g.rel)
            if self.journal.overlay_taken(f"overlays/{name}"):  # the same name held another content before
                name = f"{g.rel}.{g.sha[:12]}.png"
            over, mask = self.out / "overlays" / name, self.out / "masks" / name
            over.parent.mkdir(parents=True, exist_ok=True)
            mask.parent.mkdir(parents=True, exist_ok=True)
            out_hw = g.in_hw if self.output_size == "input" else hw(size)
            jobs.append((over, mask, g.data, g.img, pred.map, out_hw, self.pixel_thr, True))
            rows.append({"file": g.rel, "sha256": g.sha, "score": float(pred.score),
                         "decision": "defect" if pred.is_defect else "ok", "threshold": float(self.image_thr),
                         "engine": self.det.engine, "time": utc_now(), "overlay": f"overlays/{name}",
                         "mask": f"masks/{name}"})
        if self.pool:
            list(self.pool.map(lambda job: write_pngs(*job), jobs))
        else:
            for job in jobs:
                write_pngs(*job)
        return rows

    def _report_drift(self, n: int, n_defect: int) -> None:
        state = self.drift.state()
        atomic_write_text(self.out / "drift.json", json.dumps(state, indent=1) + "\n")
        with open(self.out / "watch.log", "a") as f:
            f.write(json.dumps({"time": utc_now(), "engine": self.det.engine, "scored": n, "defect": n_defect,
                                "total": self.journal.count(), "drift": state}) + "\n")
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
        self.journal.close()


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
    before = watcher.journal.count()
    print(f"destseg watch: {input_dir} -> {out}/results.csv ({before} images already scored; threshold "
          f"{watcher.image_thr:.4g}, decided by {detector.engine}; {'once' if once else 'Ctrl-C stops'})", flush=True)
    try:
        while not stop.event.is_set():
            ready, waiting = watcher.scan()
            n = watcher.score(ready) if ready else 0
            if n:
                print(f"destseg watch: {n} scored, {watcher.journal.count()} in all; drift "
                      f"{watcher.drift_state}", flush=True)
            not_yet = sum(rel in watcher.failed for rel in ready)  # did not decode this time
            if len(ready) > not_yet:
                continue  # scan again at once: more may have come meanwhile
            if once:
                left = waiting + not_yet
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
        scored, skipped = watcher.journal.count() - before, watcher.journal.count("skipped")
        watcher.close()
        lock.close()
        for sig, handler in previous.items():  # the caller's handlers back (the API, a test process)
            signal.signal(sig, handler)
    print(f"destseg watch: {scored} images scored in this run, {skipped} skipped in all", flush=True)
    return 0
