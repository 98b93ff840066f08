"""The path a request will really touch, for the rules to decide on.

A policy that says `/home/alice/**` must not be fooled by `/home/alice/link/x` where `link -> /etc`: the
rules see the path with every directory symlink resolved beneath the export (and the final one too for
the requests that follow it), exactly as the executor will resolve it. QEMU sends one request at a time,
so the guest cannot swap a symlink between this resolution and the executor's.
"""

from __future__ import annotations

import os
import stat

from gateway import syscalls as sc
from gateway.paths import normalise_bytes

_O_PATH = os.O_PATH | os.O_CLOEXEC
_O_PARENT = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class Canonicalizer:
    def __init__(self, root_fd: int, proc_fd: int) -> None:
        self.root_fd = root_fd
        self.proc_fd = proc_fd
        # What /proc reports for the root: "/" once chrooted, the export's host path otherwise.
        self.prefix = os.readlink(b"%d" % root_fd, dir_fd=proc_fd).rstrip(b"/")

    def _real(self, fd: int) -> bytes:
        real = os.readlink(b"%d" % fd, dir_fd=self.proc_fd)
        if self.prefix and real.startswith(self.prefix):
            real = real[len(self.prefix) :]
        return real or b"/"

    def _resolved(self, path: bytes, flags: int) -> bytes | None:
        try:
            fd = sc.openat2(self.root_fd, path, flags)
        except OSError:
            return None
        try:
            return self._real(fd)
        finally:
            os.close(fd)

    def path(self, path: bytes, *, follow: bool) -> bytes:
        """The canonical path inside the export that `path` names (follow: resolve a final symlink)."""
        if not path:
            return b""
        if follow:
            real = self._resolved(path, _O_PATH)
            if real is not None:
                return real
            return self._through_dangling(path)
        return self._at_parent(path)

    def _at_parent(self, path: bytes) -> bytes:
        """The final component as named, in its parent resolved beneath the export."""
        stripped = path.rstrip(b"/")
        slash = stripped.rfind(b"/")
        name = stripped[slash + 1 :]
        parent = stripped[: slash + 1]
        if not stripped or name in (b".", b".."):
            return self._resolved(path, _O_PARENT) or normalise_bytes(path)
        if not parent.strip(b"/"):
            return b"/" + name
        real_parent = self._resolved(parent, _O_PARENT)
        if real_parent is None:  # the request will fail to resolve too; decide on the lexical form
            return normalise_bytes(path)
        return real_parent.rstrip(b"/") + b"/" + name

    def _through_dangling(self, path: bytes) -> bytes:
        """Where a following request that creates (O_CREAT without O_EXCL) will create its file when the
        final component is a dangling symlink: at the end of the link chain, as openat2 RESOLVE_IN_ROOT
        follows it. Without this, /home/alice/x -> /etc/new would be decided as /home/alice/x."""
        current = self._at_parent(path)
        for _ in range(40):  # the kernel's own limit on links followed in one lookup
            st = self.stat(current)
            if st is None or not stat.S_ISLNK(st.st_mode):
                return current
            try:
                fd = sc.openat2(self.root_fd, current.rsplit(b"/", 1)[0] or b"/", _O_PARENT)
            except OSError:
                return current
            try:
                target = os.readlink(current.rsplit(b"/", 1)[1], dir_fd=fd)
            except OSError:
                return current
            finally:
                os.close(fd)
            base = current.rsplit(b"/", 1)[0]
            current = self._at_parent(target if target.startswith(b"/") else base + b"/" + target)
        return current

    def stat(self, path: bytes) -> os.stat_result | None:
        """lstat of a path resolved beneath the export, or None when there is nothing there."""
        try:
            fd = sc.openat2(self.root_fd, path or b"/", _O_PATH | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
