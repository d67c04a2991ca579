"""Fetching the official dataset files, or saying exactly what to fetch by hand.

Machines running this toolkit are often offline, so a failed download must never surface as a
traceback: it becomes one line naming the files, the folder and the URL.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from http.client import HTTPException
from pathlib import Path
from urllib.request import urlopen

from dfkd.errors import DfkdError

log = logging.getLogger(__name__)

MIRRORS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
}
TIMEOUT_S = 10.0


def fetch(name: str, files: Sequence[str], root: Path, download: bool) -> None:
    """Put ``files`` of dataset ``name`` into ``root`` from its official mirror.

    With ``download=False`` nothing is attempted; either way a miss raises one DfkdError line.
    """
    if not download:
        raise missing_error(name, files, root, "download disabled")
    try:
        for file in files:
            _download(MIRRORS[name] + file, root / file)
    except (OSError, HTTPException) as exc:
        raise missing_error(name, files, root, f"download failed: {exc}; offline?") from exc


def missing_error(name: str, files: Sequence[str], root: Path, reason: str) -> DfkdError:
    """The one-line message telling the user which files to place where."""
    url = MIRRORS[name] + files[0] if len(files) == 1 else MIRRORS[name]
    them = "it" if len(files) == 1 else "them"
    reason = " ".join(reason.split())  # exception texts may span lines
    return DfkdError(f"{name}: missing {', '.join(files)} in {root} ({reason}); download {them} "
                     f"from {url} and place {them} there, or pass --data-root DIR")


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` to a temp file next to ``dest`` and rename it, so no partial file remains."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=TIMEOUT_S) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
