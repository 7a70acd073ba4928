"""--texture-dir dtd: fetched once into the cache from a (here: localhost) server, checked, unpacked atomically."""

import hashlib
import http.server
import io
import json
import tarfile
import threading
from functools import partial

import numpy as np
import pytest
from PIL import Image

from destseg.dtd import fetch_dtd
from destseg.errors import DatasetError


def make_archive(path, members=("dtd/images/banded/banded_0001.jpg", "dtd/images/dotted/dotted_0001.jpg"), evil=None):
    with tarfile.open(path, "w:gz") as tar:
        for name in members:
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
        if evil:
            info = tarfile.TarInfo(evil)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_verify_unpack_once_then_use_the_cache(tmp_path, server, monkeypatch):
    folder, base = server
    md5 = make_archive(folder / "dtd.tar.gz")
    monkeypatch.setenv("DESTSEG_CACHE", str(tmp_path / "cache"))
    images = fetch_dtd(f"{base}/dtd.tar.gz", md5, progress=False)
    assert sorted(p.name for p in images.iterdir()) == ["banded", "dotted"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["dtd-r1.0.1"]  # no temporary leftovers
    (folder / "dtd.tar.gz").unlink()  # the server no longer has it: the cache answers
    assert fetch_dtd(f"{base}/dtd.tar.gz", md5, progress=False) == images


def test_wrong_checksum_bad_archive_and_offline_are_refused_with_a_way_out(tmp_path, server, monkeypatch):
    folder, base = server
    monkeypatch.setenv("DESTSEG_CACHE", str(tmp_path / "cache"))
    make_archive(folder / "dtd.tar.gz")
    with pytest.raises(DatasetError, match="does not match the expected 0123"):
        fetch_dtd(f"{base}/dtd.tar.gz", "0123" + "0" * 28, progress=False)
    evil_md5 = make_archive(folder / "evil.tar.gz", evil="../../escape.txt")
    with pytest.raises(DatasetError, match="refusing archive member"):
        fetch_dtd(f"{base}/evil.tar.gz", evil_md5, progress=False)
    with pytest.raises(DatasetError, match=r"cannot download DTD .*--texture-dir /path/to/dtd/images"):
        fetch_dtd("http://127.0.0.1:9/dtd.tar.gz", progress=False)
    assert not (tmp_path / "cache" / "dtd-r1.0.1").exists() and not (tmp_path / "escape.txt").exists()


def test_train_with_texture_dir_dtd_records_the_source(tmp_path, tiny_mvtec, monkeypatch):
    from destseg.cli import main

    archive = tmp_path / "dtd.tar.gz"
    monkeypatch.setenv("DESTSEG_DTD_MD5", make_archive(archive))
    monkeypatch.setenv("DESTSEG_DTD_URL", archive.as_uri())
    monkeypatch.setenv("DESTSEG_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_mvtec), "--category", "widget", "--out", str(run), "--teacher",
                 "efficientnet_lite0", "--image-size", "64", "--batch-size", "2", "--steps", "3",
                 "--student-steps", "2", "--texture-dir", "dtd", "--no-progress"]) == 0
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["anomaly_source"].startswith("textures from") and "dtd-r1.0.1" in resolved["anomaly_source"]
    run2 = tmp_path / "run2"  # no texture folder: the fallback announces itself
    assert main(["train", "--data", str(tiny_mvtec), "--category", "widget", "--out", str(run2), "--teacher",
                 "efficientnet_lite0", "--image-size", "64", "--batch-size", "2", "--steps", "3",
                 "--student-steps", "2", "--no-progress"]) == 0
    assert json.loads((run2 / "config.json").read_text())["resolved"]["anomaly_source"].startswith("WARNING: built-in")
    assert "WARNING: built-in" in (run2 / "train.log").read_text().splitlines()[0]
