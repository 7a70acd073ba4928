"""``destseg watch``'s journal: an SQLite database (OUT/journal.sqlite) of every image content scored or given up on.

One row per content (the SHA-256 of the file's bytes), its unique key: an image is scored once per content, and
exactly-once is a property of the store, not of the code around it. Each batch is one transaction, committed
after the batch's PNGs are on disk; a kill at any point leaves the database as it was before or after the
batch (SQLite's write-ahead log, synchronous=FULL). Three tables:

- ``scored``: file (its path below --input when scored), sha256, score, decision, threshold, engine, time,
  overlay, mask; in the order scored.
- ``skipped``: file, sha256, reason, time: contents given up on (they did not decode for --retry seconds).
- ``names``: what each file name held when last looked at (sha256, size, mtime_ns, inode), so that a file
  unchanged since is not read again, and one changed (rewritten, or another file renamed over it) is.

OUT/results.csv and OUT/skipped.csv are readable exports of the first two: appended per batch after the commit,
and rewritten from the database at start when they do not match it (a kill between the commit and the append,
a file edited by hand). Months of decisions can be queried directly, e.g.
``sqlite3 OUT/journal.sqlite "SELECT decision, count(*) FROM scored GROUP BY decision"``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sqlite3
from pathlib import Path

from destseg.checkpoint import atomic_write_text
from destseg.errors import DestsegError

FORMAT = "destseg watch journal 1"
RESULT_COLUMNS = ["file", "sha256", "score", "decision", "threshold", "engine", "time", "overlay", "mask"]
SKIPPED_COLUMNS = ["file", "sha256", "reason", "time"]
OLD_RESULT_COLUMNS = ["file", "score", "decision", "threshold", "time", "overlay", "mask"]  # 0.3's CSV journal
OLD_SKIPPED_COLUMNS = ["file", "reason", "time"]

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE scored (id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, file TEXT NOT NULL, score REAL NOT NULL,
                     decision TEXT NOT NULL, threshold REAL NOT NULL, engine TEXT NOT NULL, time TEXT NOT NULL,
                     overlay TEXT NOT NULL, mask TEXT NOT NULL);
CREATE INDEX scored_overlay ON scored (overlay);
CREATE TABLE skipped (id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, file TEXT NOT NULL, reason TEXT NOT NULL,
                      time TEXT NOT NULL);
CREATE TABLE names (file TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                    inode INTEGER NOT NULL);
"""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stat_key(st: os.stat_result) -> tuple[int, int, int]:
    """What tells a file's content changed without reading it: (size, mtime_ns, inode)."""
    return st.st_size, st.st_mtime_ns, st.st_ino


class Journal:
    """The journal of one OUT folder. Refuses a database or CSV of another program before changing a byte."""

    def __init__(self, out: Path, input_dir: Path):
        self.out, self.path = Path(out), Path(out) / "journal.sqlite"
        self.results_csv, self.skipped_csv = self.out / "results.csv", self.out / "skipped.csv"
        old = {p: _csv_header(p) for p in (self.results_csv, self.skipped_csv)}
        expected = {self.results_csv: (RESULT_COLUMNS, OLD_RESULT_COLUMNS),
                    self.skipped_csv: (SKIPPED_COLUMNS, OLD_SKIPPED_COLUMNS)}
        for p, header in old.items():
            if header is not None and header not in expected[p]:
                raise DestsegError(f"{p}: not written by `destseg watch` (columns {header}, expected "
                                   f"{expected[p][0]}); choose another --out")
        new = not self.path.exists()
        if not new:
            self._check_foreign()
        self.db = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit (BEGIN ... COMMIT)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a power cut
            if new:
                with self.transaction():
                    for statement in filter(str.strip, SCHEMA.split(";")):
                        self.db.execute(statement)
                    self.db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
                    self._import_old_csv(Path(input_dir), old)
        except sqlite3.Error as exc:
            self.db.close()
            raise DestsegError(f"{self.path}: {exc}") from None
        self.export_if_stale()

    def _check_foreign(self) -> None:
        row = None
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            pass
        if row is None or row[0] != FORMAT:
            raise DestsegError(f"{self.path}: not a journal of `destseg watch` ({FORMAT!r}); choose another --out")

    def transaction(self):
        return _Transaction(self.db)

    # -- reading

    def known(self, rel: str, key: tuple[int, int, int]) -> bool:
        """Whether the file ``rel`` is as it was when its content was scored or given up on."""
        row = self.db.execute("SELECT size, mtime_ns, inode FROM names WHERE file = ?", (rel,)).fetchone()
        return row is not None and tuple(row) == key

    def content(self, sha: str) -> dict | None:
        """The scored (or skipped) row of a content, as a dict with ``table``; None if never met."""
        for table, cols in (("scored", RESULT_COLUMNS), ("skipped", SKIPPED_COLUMNS)):
            row = self.db.execute(f"SELECT {', '.join(cols)} FROM {table} WHERE sha256 = ?", (sha,)).fetchone()
            if row is not None:
                return {"table": table, **dict(zip(cols, row))}
        return None

    def overlay_taken(self, overlay: str) -> bool:
        return self.db.execute("SELECT 1 FROM scored WHERE overlay = ?", (overlay,)).fetchone() is not None

    def count(self, table: str = "scored") -> int:
        return self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def last_scores(self, n: int) -> list[float]:
        rows = self.db.execute("SELECT score FROM scored ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [r[0] for r in reversed(rows)]

    def last_skipped(self) -> dict | None:
        row = self.db.execute(f"SELECT {', '.join(SKIPPED_COLUMNS)} FROM skipped ORDER BY id DESC LIMIT 1").fetchone()
        return dict(zip(SKIPPED_COLUMNS, row)) if row else None

    # -- writing (each call one transaction)

    def record(self, scored: list[dict] = (), skipped: list[dict] = (), names: list[tuple] = ()) -> None:
        """One batch: rows of ``scored`` and ``skipped`` (dicts with their columns) and ``names`` rows
        (file, sha256, size, mtime_ns, inode), all or nothing; then the CSV exports."""
        try:
            with self.transaction():
                self.db.executemany(f"INSERT INTO scored ({', '.join(RESULT_COLUMNS)}) VALUES "
                                    f"({', '.join('?' * len(RESULT_COLUMNS))})",
                                    [[r[c] for c in RESULT_COLUMNS] for r in scored])
                self.db.executemany(f"INSERT INTO skipped ({', '.join(SKIPPED_COLUMNS)}) VALUES "
                                    f"({', '.join('?' * len(SKIPPED_COLUMNS))})",
                                    [[r[c] for c in SKIPPED_COLUMNS] for r in skipped])
                self.db.executemany("INSERT OR REPLACE INTO names VALUES (?, ?, ?, ?, ?)", names)
        except sqlite3.Error as exc:  # e.g. "database or disk is full": nothing of the batch is recorded
            raise DestsegError(f"{self.path}: {exc} (the batch is not recorded; it is scored again at the next "
                               "start)") from None
        for path, cols, rows in ((self.results_csv, RESULT_COLUMNS, scored),
                                 (self.skipped_csv, SKIPPED_COLUMNS, skipped)):
            if rows:
                try:
                    _append(path, _csv_text(cols, [_fmt([r[c] for c in cols]) for r in rows]))
                except OSError as exc:  # the batch is in the database; the export is rewritten at the next start
                    raise DestsegError(f"{path}: {exc.strerror or exc} (the batch is recorded in {self.path.name}; "
                                       f"{path.name} is written again from it at the next start)") from None

    def export_if_stale(self) -> None:
        """Rewrite results.csv / skipped.csv from the database where they do not hold exactly its rows."""
        for path, table, cols in ((self.results_csv, "scored", RESULT_COLUMNS),
                                  (self.skipped_csv, "skipped", SKIPPED_COLUMNS)):
            data = path.read_bytes() if path.is_file() else b""
            n = self.count(table)
            header = (",".join(cols) + "\n").encode()
            if data.startswith(header) and data.endswith(b"\n") and data.count(b"\n") == n + 1:
                continue
            rows = self.db.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY id")
            atomic_write_text(path, ",".join(cols) + "\n" + _csv_text(cols, (_fmt(r) for r in rows)))

    def close(self) -> None:
        self.db.close()

    # -- the CSV journal of destseg 0.3

    def _import_old_csv(self, input_dir: Path, headers: dict) -> None:
        """Take over the rows of a results.csv / skipped.csv found without a database (destseg 0.3's CSV journal,
        or a database deleted by hand). A row keeps its sha256 where it has one; otherwise the file still in
        --input is taken to hold the content it was scored as, and a file gone is keyed by its name."""
        for path, cols, table in ((self.results_csv, RESULT_COLUMNS, "scored"),
                                  (self.skipped_csv, SKIPPED_COLUMNS, "skipped")):
            if headers[path] is None:
                continue
            with open(path, newline="") as f:
                text = f.read()
            for r in csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1])):  # a row cut by a kill: dropped
                source, sha = input_dir / r["file"], r.get("sha256")
                try:
                    data = source.read_bytes()
                    now = sha256_of(data)
                    if sha in (None, now):  # the file still holds what was scored: not read again
                        self.db.execute("INSERT OR REPLACE INTO names VALUES (?, ?, ?, ?, ?)",
                                        (r["file"], now, *stat_key(source.stat())))
                        sha = now
                except OSError:
                    pass
                values = {**r, "sha256": sha or "name:" + r["file"], "engine": r.get("engine", "")}
                self.db.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES "
                                f"({', '.join('?' * len(cols))})", [values[c] for c in cols])


class _Transaction:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.db.execute("ROLLBACK")
            return
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error:  # e.g. a full disk at the commit: nothing of the transaction stays
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise


def _csv_header(path: Path) -> list[str] | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def _fmt(row) -> list:
    return [f"{v:.9g}" if isinstance(v, float) else v for v in row]


def _csv_text(cols: list[str], rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def _append(path: Path, text: str) -> None:
    """Append to an export, completing a short write (a nearly full disk); a full one raises."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        left = memoryview(text.encode())
        while left:
            left = left[os.write(fd, left):]
    finally:
        os.close(fd)
