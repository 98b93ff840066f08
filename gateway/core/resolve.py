"""Resolve once: each path of a request, resolved beneath the export's root exactly once, into the fd the
executor acts on and the canonical path of exactly that object. The rules decide on that path and that
object; the executor acts on that fd (or, for the calls that create, remove or rename a *name*, on that
name in that parent fd). Nothing is looked up by name again after the decision, so a decision can never
be about something other than what is touched: not through a trailing slash on a symlink, not through a
host process swapping a directory for a symlink between two lookups.

Which object a request is decided on and acted on (the table the README repeats):

==========================  =====================  ===================================================
request                     form                   object decided on and acted on
==========================  =====================  ===================================================
LSTAT READLINK CHOWN UTIME  ``Form.NOFOLLOW``      the final component itself, in its resolved parent
LGETXATTR LLISTXATTR                               (a symlink stays a symlink); with a trailing slash,
LSETXATTR LREMOVEXATTR                             '.' or '..' last, what the kernel follows it to
CHMOD TRUNCATE STATFS       ``Form.FOLLOW``        what the whole path leads to, final symlink followed
GETVERSION, OPEN                                   (OPEN with O_NOFOLLOW: ``Form.NOFOLLOW``)
CREATE, OPEN with O_CREAT   ``Form.CREATE``        the existing object (followed unless O_NOFOLLOW or
                                                   O_EXCL), else the name the file will be created as:
                                                   in the parent, or at the end of a dangling link chain
MKDIR MKNOD SYMLINK REMOVE  ``Form.NAME``          the name in its resolved parent (never followed;
RENAME LINK (both paths)                           LINK's source with a trailing slash: followed)
==========================  =====================  ===================================================

A path with no symlink on the way (openat2 with RESOLVE_NO_SYMLINKS succeeds) is its own canonical form
once normalised, so the common case costs no readlink; otherwise the canonical path is read back from the
fd itself (/proc/self/fd), which names the object that was really reached.
"""

from __future__ import annotations

import enum
import errno
import os
import stat

from gateway import protocol as p
from gateway import syscalls as sc
from gateway.paths import normalise_bytes

_O_PATH = os.O_PATH | os.O_CLOEXEC
_O_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_FAST = sc.GUEST_RESOLVE | sc.RESOLVE_NO_SYMLINKS
PATH_MAX = 4096  # including the NUL: a path of 4096 bytes or more is ENAMETOOLONG before any lookup
MAX_LINKS = 40  # the kernel's own limit on links followed in one lookup


class Form(enum.Enum):
    NOFOLLOW = "nofollow"
    FOLLOW = "follow"
    CREATE = "create"
    NAME = "name"


class Resolved:
    """One path of one request, resolved once.

    ``path`` is the canonical path decided on (bytes, normalised, inside the export). ``dirfd`` and
    ``name`` are the parent directory and the final component as an ``*at()`` call takes it (``name`` is
    None when the path names the root or, in a following form, when the object itself is acted on through
    ``fd``). ``fd`` is an O_PATH fd of the object (-1 when none was opened). ``err`` is the errno the
    resolution met (0: none); the executor answers it, after the decision, when the request is allowed.
    ``exists`` matters to ``Form.CREATE``: False means ``name`` in ``dirfd`` is where the file is made.
    """

    __slots__ = ("_closed", "_st", "_stat_done", "dir_only", "dirfd", "err", "exists", "fd", "name",
                 "own_dir", "own_fd", "path")

    def __init__(self, path: bytes, *, dirfd: int = -1, name: bytes | None = None, fd: int = -1,
                 err: int = 0, own_dir: bool = False, own_fd: bool = False, dir_only: bool = False) -> None:
        self.path = path
        self.dirfd = dirfd
        self.name = name
        self.fd = fd
        self.err = err
        self.own_dir = own_dir
        self.own_fd = own_fd
        self.dir_only = dir_only
        self.exists = True
        self._st: os.stat_result | None = None
        self._stat_done = False
        self._closed = False

    def stat(self) -> os.stat_result | None:
        """The object's attributes (lstat semantics in name forms), read once and kept: the rules'
        object conditions and the executor see the same answer."""
        if not self._stat_done:
            self._stat_done = True
            if self.err:
                self._st = None
            else:
                try:
                    if self.fd >= 0:
                        self._st = os.fstat(self.fd)
                    elif self.name is not None:
                        self._st = os.stat(self.name, dir_fd=self.dirfd, follow_symlinks=False)
                except OSError:
                    self._st = None
        return self._st

    def set_stat(self, st: os.stat_result | None) -> None:
        self._st = st
        self._stat_done = True

    @property
    def at_name(self) -> bytes:
        """The name for an *at() call that never follows it. A trailing slash stays on it: the kernel
        then insists on a directory exactly as for the full path, without following the name."""
        assert self.name is not None
        if self.dir_only and self.name not in (b".", b".."):
            return self.name + b"/"
        return self.name

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.own_fd and self.fd >= 0:
            os.close(self.fd)
        if self.own_dir and self.dirfd >= 0:
            os.close(self.dirfd)


class Resolution:
    """The resolved paths of one request (``second`` for RENAME and LINK), and the directories a '..'
    walked out of on the way (``through``), which the rules must also allow the guest to read."""

    __slots__ = ("first", "second", "through")

    def __init__(self, first: Resolved, second: Resolved | None = None,
                 through: tuple[bytes, ...] = ()) -> None:
        self.first = first
        self.second = second
        self.through = through

    def lookup(self, _path: str) -> os.stat_result | None:
        """The object the request acts on (for RENAME and LINK the source), as the rules' lookup."""
        return self.first.stat()

    def close(self) -> None:
        self.first.close()
        if self.second is not None:
            self.second.close()


def _split(path: bytes) -> tuple[bytes, bytes, bool]:
    """(parent, final name, dir_only) of a path that is not the root; the parent keeps its slash."""
    stripped = path.rstrip(b"/")
    slash = stripped.rfind(b"/")
    name = stripped[slash + 1 :]
    dir_only = len(stripped) != len(path) or name in (b".", b"..")
    return stripped[: slash + 1], name, dir_only


class Resolver:
    """Resolves request paths beneath one root fd (openat2 RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)."""

    def __init__(self, root_fd: int, proc_fd: int) -> None:
        self.root_fd = root_fd
        self.proc_fd = proc_fd
        self._prefix: bytes | None = None

    # -- the canonical path of an fd ------------------------------------------------------------------

    def real_path(self, fd: int) -> bytes:
        """The path inside the export of the object fd refers to, as the kernel names it now."""
        real = os.readlink(b"%d" % fd, dir_fd=self.proc_fd)
        prefix = self._prefix
        if prefix is None:
            # What /proc reports for the root: "/" once chrooted, the export's host path otherwise. Read
            # at the first use, which comes after the sandbox's chroot when there is one.
            prefix = self._prefix = os.readlink(b"%d" % self.root_fd, dir_fd=self.proc_fd).rstrip(b"/")
        if not prefix:
            return real
        if real == prefix:
            return b"/"
        if real.startswith(prefix) and real[len(prefix) : len(prefix) + 1] == b"/":
            return real[len(prefix) :]
        # Moved out of the export by the host after it was reached: decide on nothing, touch nothing.
        raise OSError(errno.EXDEV, "the object left the export", real)

    def open_path(self, path: bytes, flags: int) -> tuple[int, bytes]:
        """openat2 beneath the root, and the canonical path of what it opened. Without a symlink on the
        way the normalised path is that canonical path; with one, the fd names it."""
        try:
            fd = sc.openat2(self.root_fd, path, flags, 0, _FAST)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        else:
            return fd, normalise_bytes(path)
        fd = sc.openat2(self.root_fd, path, flags)
        try:
            return fd, self.real_path(fd)
        except OSError:
            os.close(fd)
            raise

    # -- the forms ------------------------------------------------------------------------------------

    def name(self, path: bytes) -> Resolved:
        """``Form.NAME``: the parent resolved, the final component as named. The canonical path is the
        parent's plus the name (for '.' and '..' last, the directory they name)."""
        if not path:
            return Resolved(b"/", err=errno.ENOENT)
        if len(path) >= PATH_MAX:
            return Resolved(normalise_bytes(path[:PATH_MAX]), err=errno.ENAMETOOLONG)
        if not path.strip(b"/"):
            return Resolved(b"/", dirfd=self.root_fd, fd=self.root_fd, dir_only=True)
        parent, name, dir_only = _split(path)
        if not parent.strip(b"/"):  # a top-level name: the root fd is the parent, no lookup needed
            canon = b"/" if name in (b".", b"..") else b"/" + name
            return Resolved(canon, dirfd=self.root_fd, name=name, dir_only=dir_only)
        try:
            dirfd, real_parent = self.open_path(parent, _O_DIR)
        except OSError as exc:
            # Nothing will be touched; decide on where the lookup was heading, so the answer (a deny or
            # this errno) does not depend on what exists where the guest may not look.
            return Resolved(self.heading(path, follow_final=False), err=exc.errno or errno.EIO)
        canon = normalise_bytes(real_parent + b"/" + name) if dir_only else _join(real_parent, name)
        return Resolved(canon, dirfd=dirfd, name=name, own_dir=True, dir_only=dir_only)

    def nofollow(self, path: bytes, *, stat_only: bool = False) -> Resolved:
        """``Form.NOFOLLOW``: the final component itself, never followed, unless the path's form makes
        the kernel follow it (a trailing slash, '.' or '..' last): then the directory it leads to.
        ``stat_only`` (LSTAT): read its attributes by name in the parent instead of opening an fd."""
        r = self.name(path)
        if r.err:
            return r
        if r.name is None:  # the root
            return r
        if r.dir_only:
            return self._followed(r, path, _O_DIR)
        if stat_only:
            try:
                r.set_stat(os.stat(r.name, dir_fd=r.dirfd, follow_symlinks=False))
            except OSError as exc:
                r.err = exc.errno or errno.EIO
            return r
        return self._open_final(r)

    def follow(self, path: bytes, flags: int = _O_PATH) -> Resolved:
        """``Form.FOLLOW``: what the whole path leads to. When that fails, the decision is on where the
        lookup was heading (``heading``), so a deny does not depend on what exists."""
        if not path:
            return Resolved(b"/", err=errno.ENOENT)
        if len(path) >= PATH_MAX:
            return Resolved(normalise_bytes(path[:PATH_MAX]), err=errno.ENAMETOOLONG)
        try:
            fd, canon = self.open_path(path, flags)
        except OSError as exc:
            return Resolved(self.heading(path, follow_final=True), err=exc.errno or errno.EIO)
        return Resolved(canon, fd=fd, own_fd=True)

    @staticmethod
    def _open_final(r: Resolved) -> Resolved:
        """The final component itself as an O_PATH fd, never followed: one lookup in the resolved
        parent, of a name that holds no slash and is not '.' or '..'."""
        assert r.name is not None
        try:
            r.fd = os.open(r.name, _O_NOFOLLOW, dir_fd=r.dirfd)
        except OSError as exc:
            r.err = exc.errno or errno.EIO
        else:
            r.own_fd = True
        return r

    def _followed(self, r: Resolved, path: bytes, flags: int) -> Resolved:
        r.close()
        return self.follow(path, flags)

    def create(self, path: bytes, flags: int) -> Resolved:
        """``Form.CREATE`` (CREATE, OPEN with O_CREAT): the object if it exists -- followed unless
        O_NOFOLLOW or O_EXCL, as open(2) does -- else where the file will be made: this name in the
        resolved parent, or for a dangling symlink the end of its chain, resolved beneath the root."""
        r = self.name(path)
        if r.err or r.name is None or r.dir_only:
            return r  # the root or 'x/': open(2) creates nothing there (the executor answers as it does)
        try:
            st = os.stat(r.name, dir_fd=r.dirfd, follow_symlinks=False)
        except FileNotFoundError:
            r.exists = False
            r.set_stat(None)
            return r
        except OSError as exc:
            r.err = exc.errno or errno.EIO
            return r
        if stat.S_ISLNK(st.st_mode) and not flags & (os.O_NOFOLLOW | os.O_EXCL):
            r.close()
            try:
                fd, canon = self.open_path(path, _O_PATH)
            except FileNotFoundError:
                end = self.chain_end(path)
                end.exists = False
                end.set_stat(None)
                return end
            except OSError as exc:
                return Resolved(normalise_bytes(path), err=exc.errno or errno.EIO)
            return Resolved(canon, fd=fd, own_fd=True)
        return self._open_final(r)

    def chain_end(self, path: bytes) -> Resolved:
        """Where a chain of symlinks ends (``Form.NAME`` of its last name): the name a following create
        makes through a dangling link. Each link's parent is resolved beneath the root, each target read
        from that parent, as the kernel's own walk does."""
        current = self.name(path)
        for _ in range(MAX_LINKS):
            if current.err or current.name is None or current.dir_only:
                return current
            try:
                st = os.stat(current.name, dir_fd=current.dirfd, follow_symlinks=False)
            except OSError:
                return current
            if not stat.S_ISLNK(st.st_mode):
                current.set_stat(st)
                return current
            try:
                target = os.readlink(current.name, dir_fd=current.dirfd)
            except OSError as exc:
                current.err = exc.errno or errno.EIO
                return current
            base = current.path.rsplit(b"/", 1)[0]
            current.close()
            current = self.name(target if target.startswith(b"/") else base + b"/" + target)
        current.err = errno.ELOOP
        return current

    def heading(self, path: bytes, *, follow_final: bool, left: dict[bytes, None] | None = None) -> bytes:
        """Where a lookup that failed was heading: the kernel's walk replayed a component at a time,
        symlinks followed beneath the root, until a name is missing (the rest is then lexical). Only for
        deciding a request that will touch nothing: a dangling link into /secret is decided as /secret/...,
        so whether a name exists there never shows through the answer. ``left`` collects the directories
        each '..' walks out of."""
        stack = [c for c in reversed(path.split(b"/")) if c not in (b"", b".")]
        cur = b"/"
        curfd = -1  # cur's directory, held while walking down so that each step costs one lookup
        links = 0
        missing = False
        try:
            while stack:
                comp = stack.pop()
                if comp == b"..":
                    if left is not None:
                        left.setdefault(cur)
                    cur = cur.rsplit(b"/", 1)[0] or b"/"
                    curfd = self._drop(curfd)
                    continue
                nxt = _join(cur, comp)
                if missing:
                    cur = nxt
                    continue
                if curfd < 0:
                    try:
                        curfd = sc.openat2(self.root_fd, cur, _O_DIR, 0, _FAST)
                    except OSError:
                        missing = True
                        cur = nxt
                        continue
                try:
                    st = os.stat(comp, dir_fd=curfd, follow_symlinks=False)
                except OSError:
                    missing = True
                    cur = nxt
                    continue
                if stat.S_ISLNK(st.st_mode) and (stack or follow_final):
                    links += 1
                    if links > MAX_LINKS:
                        return nxt
                    try:
                        target = os.readlink(comp, dir_fd=curfd)
                    except OSError:
                        return nxt
                    if target.startswith(b"/"):
                        cur = b"/"
                        curfd = self._drop(curfd)
                    stack.extend(c for c in reversed(target.split(b"/")) if c not in (b"", b"."))
                    continue
                cur = nxt
                try:
                    down = os.open(comp, _O_DIR | os.O_NOFOLLOW, dir_fd=curfd) if stack else -1
                except OSError:
                    down = -1
                    missing = bool(stack)  # not a directory: nothing lies below it
                self._drop(curfd)
                curfd = down
            return cur
        finally:
            self._drop(curfd)

    @staticmethod
    def _drop(fd: int) -> int:
        if fd >= 0:
            os.close(fd)
        return -1

    def through(self, path: bytes) -> tuple[bytes, ...]:
        """The directories a '..' in path walks out of, canonical, each once: the guest learns something
        about each one, so the rules must allow reading it. Linear in the path: when no symlink is on the
        way (one openat2 with RESOLVE_NO_SYMLINKS says so) they are the lexical prefixes; otherwise the
        kernel's walk is replayed (``heading``). A path of PATH_MAX or more walks nothing (ENAMETOOLONG)."""
        parts = path.split(b"/")
        if b".." not in parts or len(path) >= PATH_MAX:
            return ()
        try:
            os.close(sc.openat2(self.root_fd, path, _O_PATH | os.O_NOFOLLOW, 0, _FAST))
        except OSError as exc:
            lexical = exc.errno != errno.ELOOP  # stopped at a missing name or a non-directory: no link
        else:
            lexical = True
        left: dict[bytes, None] = {}
        if not lexical:
            self.heading(path, follow_final=False, left=left)
            return tuple(left)
        stack: list[bytes] = []
        for part in parts:
            if part == b"..":
                left.setdefault(b"/" + b"/".join(stack))
                if stack:
                    stack.pop()
            elif part and part != b".":
                stack.append(part)
        return tuple(left)


def _join(parent: bytes, name: bytes) -> bytes:
    return (parent if parent != b"/" else b"") + b"/" + name


# The dispatch: which form each request's paths are resolved in (the table in the module docstring).
_NOFOLLOW = frozenset({p.RequestType.READLINK, p.RequestType.CHOWN, p.RequestType.UTIME,
                       p.RequestType.LGETXATTR, p.RequestType.LLISTXATTR, p.RequestType.LSETXATTR,
                       p.RequestType.LREMOVEXATTR})
_FOLLOW = frozenset({p.RequestType.CHMOD, p.RequestType.TRUNCATE, p.RequestType.STATFS,
                     p.RequestType.GETVERSION})
_NAME = frozenset({p.RequestType.MKDIR, p.RequestType.MKNOD, p.RequestType.SYMLINK, p.RequestType.REMOVE})
_LSTAT = p.RequestType.LSTAT
_OPEN = p.RequestType.OPEN
_CREATE = p.RequestType.CREATE
_LINK = p.RequestType.LINK


def resolve_request(resolver: Resolver, request: p.Request) -> Resolution:
    """Resolve every path of a request once, in the form its type calls for."""
    t = request.type
    path = request.path
    through = resolver.through(path) if b".." in path else ()
    if t is _LSTAT:
        first = resolver.nofollow(path, stat_only=True)
    elif t in _NOFOLLOW:
        first = resolver.nofollow(path)
    elif t in _FOLLOW:
        first = resolver.follow(path)
    elif t is _OPEN or t is _CREATE:
        flags = request.flags  # type: ignore[union-attr]
        if flags & os.O_CREAT:
            first = resolver.create(path, flags)
        elif flags & os.O_NOFOLLOW:
            first = resolver.nofollow(path)
        else:
            first = resolver.follow(path)
    elif t in _NAME:
        first = resolver.name(path)
    else:  # RENAME, LINK: both paths are names; LINK's source with a trailing slash is followed
        path2 = request.path2  # type: ignore[union-attr]
        first = resolver.name(path)
        if t is _LINK and first.dir_only and not first.err and first.name is not None:
            first.close()
            first = resolver.follow(path, _O_DIR)
        if b".." in path2:
            through += resolver.through(path2)
        return Resolution(first, resolver.name(path2), through)
    return Resolution(first, None, through)
