"""``destseg predict``: score every image under a path, stream results to disk.

For each image: score, OK/defect decision, heat-map overlay PNG and binary mask PNG (at the input image's own
size by default: the map is resized back onto it bilinearly; ``--output-size model`` keeps the model's size);
one CSV and one JSON with all results (written as they come, renamed into place at the end). Unreadable files
are skipped and listed with the reason. Memory stays bounded: paths are walked lazily and only a few batches
are in flight.

Reading, decoding and resizing the inputs and encoding the PNGs run on a thread pool (``workers``; Pillow
and zlib release the GIL), so that a GPU is not left waiting for the main process; even on a 2-core CPU two
threads gain 20-35%.

Under torchrun (WORLD_SIZE > 1) the inputs are sharded by rank (input i goes to rank i mod world size; on
CUDA each rank takes its LOCAL_RANK's GPU), every rank writes its own PNGs and rows, and rank 0 merges the
rows in input order into the same results.csv and results.json one process writes. Across machines, OUT must
be a folder every rank sees (a shared file system).
"""

from __future__ import annotations

import csv
import glob
import heapq
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from destseg.data.images import IMAGE_EXTENSIONS, decode_rgb, hw, is_image_file, read_rgb, resize_map, resize_rgb
from destseg.device import io_workers
from destseg.distributed import Dist, barrier, init_distributed
from destseg.errors import DestsegError, ImageError
from destseg.infer import Detector
from destseg.thresholds import in_force
from destseg.visualize import threshold_mask, threshold_overlay


def iter_inputs(spec: str, ignored: list | None = None) -> tuple[Path, Iterator[Path]]:
    """(base folder for relative names, lazy iterator of files) for an image, a folder or a glob; the files of a
    folder that are not images (by extension; hidden files aside) are appended to ``ignored`` as they are met."""
    path = Path(spec)
    if path.is_file():
        return path.parent, iter([path])
    if path.is_dir():
        def walk():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    p = Path(dirpath) / name
                    if p.suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                        yield p
                    elif ignored is not None and not name.startswith("."):
                        ignored.append(p)
        return path, walk()
    if any(ch in spec for ch in "*?["):
        base = Path(spec.split("*")[0].split("?")[0].split("[")[0] or ".")
        base = base if base.is_dir() else base.parent
        return base, (Path(p) for p in sorted(glob.iglob(spec, recursive=True)) if is_image_file(Path(p)))
    raise DestsegError(f"{spec}: no such image, folder or glob match")


def _count(spec: str) -> int | None:
    path = Path(spec)
    if path.is_dir():
        return sum(1 for _ in iter_inputs(spec)[1])
    return None


def _ordered(pool: ThreadPoolExecutor | None, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``fn(item)`` for each item, in order, with up to ``ahead`` calls in flight on ``pool``."""
    if pool is None:
        yield from map(fn, items)
        return
    items = iter(items)
    pending: deque[Future] = deque(pool.submit(fn, x) for x in islice(items, ahead))
    for x in items:
        yield pending.popleft().result()
        pending.append(pool.submit(fn, x))
    while pending:
        yield pending.popleft().result()


def load_for_model(path: Path, size) -> tuple[Path, np.ndarray | None, str | None, tuple[int, int]]:
    """(path, RGB uint8 at the run's size, None, the file's (height, width)) or (path, None, why it cannot be
    read, (0, 0))."""
    try:
        img = read_rgb(path)
        return path, resize_rgb(img, size), None, (img.height, img.width)
    except ImageError as exc:
        return path, None, str(exc), (0, 0)


def write_pngs(over_path: Path, mask_path: Path, source: Path | bytes, img: np.ndarray, amap: np.ndarray,
               out_hw: tuple[int, int], pixel_thr: float, sync: bool = False) -> None:
    """The overlay and mask PNGs at ``out_hw``. At another size than the model's, the map is resized
    bilinearly and the overlay drawn over the input decoded again from ``source`` (its path, or the bytes that
    were scored: a few batches of full-size images are not kept in memory); should that fail now, over the
    model-size copy scaled up. ``sync``: each file is on disk (fsync) when this returns."""
    if amap.shape != out_hw:
        amap = resize_map(amap, out_hw)
        try:
            full = decode_rgb(source, str(over_path)) if isinstance(source, bytes) else read_rgb(source)
            img = resize_rgb(full, out_hw)  # no-op unless the file changed size meanwhile
        except ImageError:
            img = resize_rgb(Image.fromarray(img), out_hw)
    for path, pixels in ((over_path, threshold_overlay(img, amap, pixel_thr)),
                         (mask_path, threshold_mask(amap, pixel_thr))):
        with open(path, "wb") as f:
            Image.fromarray(pixels).save(f, format="PNG")
            if sync:
                f.flush()
                os.fsync(f.fileno())


def _named(paths: Iterable[Path], base: Path) -> Iterator[tuple[int, Path, Path]]:
    """(index, path, output stem) in input order: named after the input (``sub/a.png`` -> ``sub/a``); of
    two inputs that differ only in their extension, the later keeps it. Every rank names every input, so
    that the names do not depend on how the inputs were sharded."""
    used: set[str] = set()
    for i, path in enumerate(paths):
        rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
        stem = rel.with_suffix("")
        if str(stem) in used:
            stem = rel
        used.add(str(stem))
        yield i, path, stem


class _Results:
    """The outputs of one ``predict`` call (of one rank, under torchrun): PNG writes (on the pool, a bounded
    number in flight), and the rows streamed to temporary files, put in place by :meth:`finish` (merged by
    rank 0 under torchrun)."""

    def __init__(self, out: Path, pool: ThreadPoolExecutor | None, in_flight: int, output_size: str,
                 model_hw: tuple[int, int], pixel_thr: float | None, dist: Dist):
        self.out, self.pool, self.in_flight, self.dist = out, pool, in_flight, dist
        self.output_size, self.model_hw, self.pixel_thr = output_size, model_hw, pixel_thr
        self.image_thr: float | None = None  # the image threshold that decides every row (set by run_predict)
        self.engine = ""  # the engine that scores them, e.g. "openvino int8" (set by run_predict)
        self.ignored: list[Path] = []  # files of an input folder that are not images
        self.writes: deque = deque()
        self.skipped: list[dict] = []
        self.n_done = self.n_defect = 0
        self.rows_tmp = out / f".results.rank{dist.rank}.jsonl.tmp"
        self.frows = open(self.rows_tmp, "w")

    def add(self, index: int, path: Path, stem: Path, img: np.ndarray, in_hw: tuple[int, int], pred) -> None:
        over_path, mask_path = self.out / "overlays" / f"{stem}.png", self.out / "masks" / f"{stem}.png"
        over_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        job = (over_path, mask_path, path, img, pred.map, in_hw if self.output_size == "input" else self.model_hw,
               self.pixel_thr)
        if self.pool is None:
            write_pngs(*job)
        else:
            self.writes.append(self.pool.submit(write_pngs, *job))
            while len(self.writes) > self.in_flight:
                self.writes.popleft().result()
        row = {"file": str(path), "score": pred.score, "decision": "defect" if pred.is_defect else "ok",
               "threshold": self.image_thr, "engine": self.engine, "overlay": str(over_path.relative_to(self.out)),
               "mask": str(mask_path.relative_to(self.out)), "height": in_hw[0], "width": in_hw[1]}
        self.frows.write(json.dumps({"index": index, "row": row}) + "\n")
        self.n_done += 1
        self.n_defect += bool(pred.is_defect)

    def skip(self, index: int, path: Path, reason: str) -> None:
        self.skipped.append({"file": str(path), "reason": reason})
        self.frows.write(json.dumps({"index": index, "skipped": self.skipped[-1]}) + "\n")

    def finish(self, image_thr: float, pixel_thr: float | None) -> None:
        """Every PNG on disk, then (on rank 0, once every rank is done) results.csv and results.json
        written from the rows of every rank, in input order."""
        while self.writes:
            self.writes.popleft().result()
        self.close()
        barrier(self.dist)
        if not self.dist.main:
            return
        parts = [self.out / f".results.rank{r}.jsonl.tmp" for r in range(self.dist.world_size)]
        files = [open(p) for p in parts]
        self.skipped, self.n_done, self.n_defect = [], 0, 0
        csv_tmp, json_tmp = self.out / ".results.csv.tmp", self.out / ".results.json.tmp"
        try:  # each rank's rows are in input order: a streaming merge keeps memory bounded
            with open(csv_tmp, "w", newline="") as fcsv, open(json_tmp, "w") as fjson:
                writer = csv.writer(fcsv)
                writer.writerow(["file", "score", "decision", "threshold", "engine", "overlay", "mask", "height",
                                 "width"])
                fjson.write('{"results": [\n')
                for e in heapq.merge(*(map(json.loads, f) for f in files), key=lambda e: e["index"]):
                    if "skipped" in e:
                        self.skipped.append(e["skipped"])
                        continue
                    row = e["row"]
                    writer.writerow(row.values())
                    fjson.write(("" if self.n_done == 0 else ",\n") + json.dumps(row))
                    self.n_done += 1
                    self.n_defect += row["decision"] == "defect"
                fjson.write("\n],\n" + f'"threshold": {json.dumps(image_thr)}, "pixel_threshold": '
                            f'{json.dumps(pixel_thr)}, "engine": {json.dumps(self.engine)},\n'
                            f'"skipped": {json.dumps(self.skipped, indent=1)},\n'
                            f'"ignored": {json.dumps([str(p) for p in self.ignored], indent=1)}}}\n')
        finally:
            for f in files:
                f.close()
        os.replace(csv_tmp, self.out / "results.csv")
        os.replace(json_tmp, self.out / "results.json")
        for p in parts:
            p.unlink()

    def close(self) -> None:
        self.frows.close()


def _check_args(output_size: str, batch_size: int, workers: int) -> None:
    if output_size not in ("input", "model"):
        raise DestsegError(f"--output-size must be input or model (got {output_size!r})")
    if batch_size < 1:
        raise DestsegError(f"--batch-size must be at least 1 (got {batch_size})")
    if workers < -1:
        raise DestsegError(f"--workers must be -1 (automatic) or more (got {workers})")


def run_predict(run_dir: Path, input_spec: str, out: Path, threshold: float | None = None,
                pixel_threshold: float | None = None, batch_size: int = 16, device: str = "auto",
                precision: str = "auto", overwrite: bool = False, progress: bool = True,
                backend: str = "auto", compile: str = "auto", workers: int = -1, output_size: str = "input") -> int:
    """``workers``: threads for reading and writing images (-1: :func:`destseg.device.io_workers`; 0: none);
    ``output_size``: overlays and masks at each ``input`` image's size or at the ``model``'s. Under torchrun
    the inputs are sharded over the processes (module docstring)."""
    _check_args(output_size, batch_size, workers)
    dist = init_distributed(device)
    if dist.active and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{dist.local_rank}"
    det = Detector.load(run_dir, device=device, precision=precision, backend=backend, compile=compile,
                        progress=progress)
    image_thr, pixel_thr = in_force(det.thresholds, threshold, pixel_threshold)
    if image_thr is None:
        raise DestsegError(f"{run_dir}: no stored threshold (run `destseg test` first) and no --threshold given")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DestsegError(f"{out}: output folder exists and is not empty; pass --overwrite")
    barrier(dist)  # every rank has checked OUT before any writes there
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    results = _Results(out, None, 4 * batch_size, output_size, hw(det.config.image_size), pixel_thr, dist)
    results.image_thr, results.engine = image_thr, det.engine
    base, paths = iter_inputs(input_spec, results.ignored)
    mine = ((i, p, stem) for i, p, stem in _named(paths, base) if i % dist.world_size == dist.rank)
    size = det.config.image_size
    workers = io_workers(det.device) if workers < 0 else workers
    total = _count(input_spec)
    bar = tqdm(total=None if total is None else len(range(dist.rank, total, dist.world_size)), desc="predict",
               unit="img", disable=not progress or not dist.main)
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="destseg-io") if workers > 0 else None
    results.pool = pool
    try:
        batch = []
        load = lambda x: ((x[0], x[2]), load_for_model(x[1], size))  # noqa: E731
        for (index, stem), (path, img, error, in_hw) in _ordered(pool, load, mine, 2 * batch_size):
            if error is not None:
                results.skip(index, path, error)
                bar.update(1)
                continue
            batch.append((index, path, stem, img, in_hw))
            if len(batch) == batch_size:
                _score(det, batch, image_thr, results, bar)
                batch = []
        if batch:
            _score(det, batch, image_thr, results, bar)
        results.finish(image_thr, pixel_thr)
    finally:
        results.close()
        for part in out.glob(".results.rank*.jsonl.tmp") if not dist.active else []:
            part.unlink()  # a failed single-process run leaves no partial rows behind
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return _summary(results, out, time.perf_counter() - t0) if dist.main else 0


def _score(det: Detector, batch: list, image_thr: float, results: _Results, bar) -> None:
    preds = det.predict_batch([img for *_, img, _ in batch], threshold=image_thr)
    for (index, path, stem, img, in_hw), pred in zip(batch, preds):
        results.add(index, path, stem, img, in_hw, pred)
    bar.update(len(batch))


def _summary(results: _Results, out: Path, wall: float) -> int:
    """The closing lines: images/s, decisions, skipped files (exit code 1 when any)."""
    n = results.n_done
    print(f"{n} images in {wall:.1f} s ({n / max(wall, 1e-9):.1f} images/s, reading and writing included): "
          f"{results.n_defect} defect, {n - results.n_defect} ok; results in {out}")
    if results.ignored:
        names = ", ".join(p.name for p in results.ignored[:5]) + (", ..." if len(results.ignored) > 5 else "")
        print(f"{len(results.ignored)} file(s) of the input folder are not images of a type read here and were "
              f"left out: {names} (listed in results.json under ignored)", file=sys.stderr)
    if results.skipped:
        print(f"{len(results.skipped)} file(s) skipped:", file=sys.stderr)
        for s in results.skipped:
            print(f"  {s['reason']}", file=sys.stderr)
        return 1
    return 0
