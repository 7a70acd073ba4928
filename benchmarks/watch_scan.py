"""The cost of one `destseg watch` scan of an input folder that already holds N scored images (empty files
in F folders, each recorded in the journal under a content of its own, as a long watch would have them): the
first scan after a start, the scans after it (the ones a watch makes every --interval seconds), and the scan
that also stats every name done (every 10 s).

    .venv/bin/python benchmarks/watch_scan.py --run RUN [--files 50000] [--folders 50] [--scans 5]

RUN: any trained run (its thresholds are needed to start a watcher; nothing is scored).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from destseg.device import describe_cpu
from destseg.infer import Detector
from destseg.journal import stat_key
from destseg.watch import COLUMNS, Watcher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--files", type=int, default=50_000)
    p.add_argument("--folders", type=int, default=50)
    p.add_argument("--scans", type=int, default=5)
    args = p.parse_args()
    det = Detector.load(args.run, device="cpu", backend="torch", precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in", Path(tmp) / "out"
        out.mkdir()
        names = [f"cam{i % args.folders:03d}/img{i:07d}.png" for i in range(args.files)]
        for d in {n.split("/")[0] for n in names}:
            (inp / d).mkdir(parents=True)
        for n in names:
            (inp / n).touch()
        w = Watcher(det, inp, out, 16, 0.0, 30.0, "input", 0, 10)
        rows = [{c: "0" for c in COLUMNS} | {"file": n, "sha256": n, "score": 0.0} for n in names]
        w.journal.record(scored=rows, names=[(n, n, *stat_key((inp / n).stat())) for n in names])
        w.close()
        w = Watcher(det, inp, out, 16, 0.0, 30.0, "input", 0, 10)  # a restart: the journal read back
        w.full_check_s = float("inf")
        times, full = [], []
        for _ in range(1 + args.scans):
            t0 = time.process_time()
            ready, waiting = w.scan()
            times.append(time.process_time() - t0)
            assert not ready and not waiting
        w.full_check_s = 0.0
        for _ in range(args.scans):
            t0 = time.process_time()
            assert w.scan() == ([], 0)
            full.append(time.process_time() - t0)
        w.close()
    print(f"{describe_cpu()}; {args.files} scored images in {args.folders} folders")
    print(f"first scan after a start: {times[0] * 1e3:.1f} ms CPU; later scans: "
          f"{min(times[1:]) * 1e3:.1f}-{max(times[1:]) * 1e3:.1f} ms CPU each; scans that stat every name done: "
          f"{min(full) * 1e3:.1f}-{max(full) * 1e3:.1f} ms CPU each")


if __name__ == "__main__":
    main()
