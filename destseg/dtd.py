"""The paper's anomaly source, DTD: downloaded once into the user's cache, verified, unpacked atomically.

``--texture-dir dtd`` resolves to ``<cache>/dtd-r1.0.1/dtd/images`` (cache: ``$DESTSEG_CACHE``, else
``$XDG_CACHE_HOME/destseg``, else ``~/.cache/destseg``), fetching the official release the first time the way
torch hub fetches weights. ``$DESTSEG_DTD_URL`` points at a mirror or a local copy (``file://...``); the MD5
of the official archive is always checked unless ``$DESTSEG_DTD_MD5`` names another archive's.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from destseg.checkpoint import file_digest
from destseg.errors import DatasetError

DTD_URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
DTD_MD5 = "fff73e5086ae6bdbea199a49dfb8a4c1"  # the value torchvision's DTD dataset checks
DTD_NAME = "dtd-r1.0.1"


def cache_dir() -> Path:
    if os.environ.get("DESTSEG_CACHE"):
        return Path(os.environ["DESTSEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "destseg"


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract regular files and folders only, refusing paths that leave ``dest`` and links."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(dest.resolve()):
                raise DatasetError(f"{archive}: refusing archive member {member.name!r} (link or outside the folder)")
        tar.extractall(dest)


def fetch_dtd(url: str | None = None, md5: str | None = None, progress: bool = True) -> Path:
    """The DTD images folder (``.../dtd/images``), downloading and unpacking the archive if needed."""
    url = url or os.environ.get("DESTSEG_DTD_URL") or DTD_URL
    md5 = md5 or os.environ.get("DESTSEG_DTD_MD5") or DTD_MD5
    root = cache_dir()
    images = root / DTD_NAME / "dtd" / "images"
    if images.is_dir():
        return images
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dtd-", dir=root) as tmp:
        archive = Path(tmp) / "dtd.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                total = int(response.headers.get("content-length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="download DTD", disable=not progress) as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DatasetError(
                f"cannot download DTD from {url} ({getattr(exc, 'reason', exc)}). Offline, download "
                f"{DTD_URL} elsewhere and either set DESTSEG_DTD_URL=file:///path/to/dtd-r1.0.1.tar.gz or "
                "unpack it and pass --texture-dir /path/to/dtd/images") from None
        digest = file_digest(archive, "md5")
        if digest != md5:
            raise DatasetError(f"{url}: MD5 {digest} does not match the expected {md5}; the download is "
                               "corrupt or not the DTD release, refusing to use it")
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        try:
            _safe_extract(archive, unpacked)
        except tarfile.TarError as exc:
            raise DatasetError(f"{url}: cannot unpack the archive ({exc})") from None
        if not (unpacked / "dtd" / "images").is_dir():
            raise DatasetError(f"{url}: the archive has no dtd/images folder")
        try:
            os.replace(unpacked, root / DTD_NAME)  # atomic: a half-unpacked folder is never visible
        except OSError:
            if not images.is_dir():  # another process may have won the race; anything else is an error
                raise
            shutil.rmtree(unpacked, ignore_errors=True)
    return images


def resolve_texture_dir(value: str | None, progress: bool = True) -> str | None:
    """``--texture-dir``: ``dtd`` (fetched to the cache), a folder, or None (built-in generator)."""
    if value == "dtd":
        return str(fetch_dtd(progress=progress))
    return value
