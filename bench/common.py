"""What more than one benchmark needs (as ``bench.common``, or ``common`` with bench/ on the path)."""

from __future__ import annotations

import os
from pathlib import Path


def filesystem_of(path: Path) -> str:
    """The type of the file system path is on (from /proc/self/mounts: the longest matching mount point)."""
    best, fstype = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, kind = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) > len(best):
                best, fstype = mnt, kind
    return f"{fstype} ({best})"
