"""The compiled serve loop (gateway/fastloop.pyx) held side by side with the Python pipeline.

The pipeline (``Server.serve(compiled_requests=False)``: every frame decoded, resolved, decided,
performed, recorded and answered in Python) is the definition of behaviour. The compiled loop
(``compiled_requests=True``) serves the plain inputs of a few request types in C and hands every other
frame to the pipeline; for the same request on the same tree and policy both must answer the same bytes
and write the same record (but for ``seq``, ``time``, ``us`` and ``prev``).

How they are driven. The compiled loop holds the GIL while it waits in recv/poll, so a Server cannot
serve in a thread of the test process: each one runs in a forked child (``Peer``), over a socketpair,
with its own Executor.for_directory and AuditWriter (opened in the child, after the fork: /proc/self/fd
must be the child's). The test sends one request at a time and reads its reply, so only one of the two
servers is ever busy and both see the tree exactly as the other left it. When the client end closes,
the child's serve() returns and the child reports ``server.loop.served`` / ``handed`` through a pipe.

1. ``test_compiled_and_pipeline_answer_alike`` (Hypothesis): a tree drawn per example (directories,
   files, a FIFO, symlinks relative, absolute, dangling, up through '..', to a directory so that paths
   lead through it; names with spaces, '"', '\\', non-ASCII and invalid UTF-8 bytes), on a private
   tmpfs or a private ext4 (loop) so that STATFS answers do not move under the test and GETVERSION
   reaches the ioctl; a policy (allow-all; paths with allow and deny rules and custom errnos, enforced
   or permissive; object conditions); a sequence of steps. Observers (LSTAT, GETVERSION, STATFS,
   READLINK, LGETXATTR, LLISTXATTR, OPEN for reading, malformed and unknown frames) go to both servers,
   which of them first alternating, sometimes several pipelined in one write; their replies must be the
   same bytes (OPEN: the same status, and an fd of the same inode, mode and flags). Mutations (CREATE,
   REMOVE, MKDIR, CHMOD, RENAME, SYMLINK, UTIME, TRUNCATE, LINK, LSETXATTR, MKNOD) go to one of them,
   alternating, so the shared tree evolves as one; the observers after them check them indirectly. At
   the end the two trails' records of the observers are equal pairwise (without seq, time, us, prev) and
   both trails verify. Over the whole run the compiled loop must have served frames in C.
2. Hand-over guards: each input outside the compiled loop's plain list is handed to the pipeline and
   answered as the pipeline answers; a plain one is served in C.
3. The loaded build is the compiled one (an .so; build_info; a real ``gateway serve``'s start record).
4. The trail's state (seq, prev, size) handed between C and Python across served and handed requests,
   protocol errors, unknown types, policy reloads (SIGHUP) and a reopen (SIGUSR1): the trail verifies.
5. ``test_compiled_and_pipeline_mutate_alike`` (Hypothesis): mutations compared directly. Two copies of
   one drawn tree (some directories setgid), on one private file system, one served by a compiled
   server and one by a pipeline server, each with its own trail; the same sequence of requests to both:
   CREATE (with and without O_EXCL, O_TRUNC, setuid/setgid/sticky modes, uids and gids 0, 1000 and -1),
   REMOVE, CHMOD, UTIME (UTIME_NOW, UTIME_OMIT, explicit times), READLINK (bufsize 0 to 2^31-1 and -1),
   OPEN (O_TRUNC, O_DIRECTORY, O_NOFOLLOW, O_CREAT...), LSTAT, and MKDIR, SYMLINK, RENAME, LINK (the
   pipeline's), one at a time or pipelined, on the path forms of 1. Each reply must be the same bytes
   (OPEN, CREATE: the status, and an fd of the same type and mode, size, owner, group and status flags;
   LSTAT: all but device, inode, ctime and the times of changes made during the run); the trails must be
   equal record for record (without seq, time, us, prev) and verify; at the end the two trees must hold
   the same names, each of the same type, mode, owner, group, size, link count, symlink target, and the
   same atime and mtime where a UTIME set them explicitly. Policies: those of 1 and two with CREATE rules
   on uid, gid, mode and flags. For every policy without object conditions, what the compiled loop serves
   itself is predicted from the request and the tree (``served_in_c``) and held to its count; over the
   run each of CREATE, REMOVE, CHMOD, UTIME, READLINK, OPEN and LSTAT must have been served in C at least
   ten times. A UTIME omitting both times of a missing name has its own test (the compiled loop answers
   0, the pipeline ENOENT).

Runs: 300 examples of up to 25 steps by default (derandomized, about 15 seconds; 5.: 250 examples, about
17 seconds); GATEWAY_PROPERTY_LONG=1 runs 2,000 examples of up to 60 steps (5.: 1,500, about two
minutes); GATEWAY_PROPERTY_SEED=N picks another fixed seed. A failure prints the tree, the policy and
every step with both replies.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import itertools
import json
import os
import posixpath
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gateway.fastloop
import pytest
from helpers import ALLOW_ALL, ROOT, over_socketpair, require_root
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st

from gateway import protocol as p
from gateway import signals
from gateway.audit import AuditWriter
from gateway.audit.verify import verify
from gateway.core.executor import Executor
from gateway.rules import Policy, load_policy, load_policy_bytes
from gateway.server import Server

LONG = os.environ.get("GATEWAY_PROPERTY_LONG") == "1"
SEED = os.environ.get("GATEWAY_PROPERTY_SEED")
TIMEOUT = 30.0  # a reply or a child's end that takes longer is a hang: fail, never wait forever
VOLATILE = ("seq", "time", "us", "prev")  # what depends on timing and position in the trail
GUEST = 1000

# ---------------------------------------------------------------------------------------------------------
# A Server in a forked child.

_PARENT_FDS: set[int] = set()  # client ends and result pipes of live peers: a new child must not hold them


@dataclass
class Ended:
    """What a child reports when its serve() returned."""

    served: int
    handed: int
    decisions: int
    end: str
    requests: int


@dataclass
class Answer:
    """One reply: its bytes; for OPEN and CREATE, what the fd that came with it is (never its number)."""

    raw: bytes
    fd: tuple[int, ...] | None = None  # fd_identity (or another seen_as) of the fd

    def __repr__(self) -> str:
        return f"Answer({self.raw.hex()}{', fd=' + repr(self.fd) if self.fd else ''})"


def _child(
    sock: socket.socket, out: int, export: str, trail: str | None, policy: Policy, compiled: bool,
    reloads: list[Policy], sync: str, syslog: str | None, start: bool, checkpoint_seconds: float = 10.0,
) -> None:  # fmt: skip
    executor = Executor.for_directory(export)
    audit = None
    if trail is not None:
        audit = AuditWriter.open(
            trail, tenant=policy.tenant, policy_hash=policy.hash, sync=sync, interval=0.002,
            syslog=syslog or False, checkpoint_seconds=checkpoint_seconds,
        )  # fmt: skip
    server = Server(sock, executor, policy, audit)
    if reloads:
        cycle = itertools.cycle(reloads)
        server.reloader = lambda: next(cycle)
    server.wakeup_fd = signals.install(server.request_reload, server.request_reopen)
    if audit is not None and start:
        audit.lifecycle("start", data_plane=gateway.fastloop.build_info())
        audit.lifecycle("policy-load", source=policy.source, rules=len(policy.rules))
    stats = server.serve(compiled_requests=compiled)
    if audit is not None:
        if start:
            audit.lifecycle("stop", reason=stats.end, requests=stats.requests)
        audit.close()
    loop = server.loop
    assert loop is not None
    report = {"served": loop.served, "handed": loop.handed, "decisions": loop.decisions_computed,
              "end": stats.end, "requests": stats.requests}
    os.write(out, json.dumps(report).encode())


class Peer:
    """One Server (compiled or pipeline) serving export in a forked child; the test holds the client end."""

    def __init__(
        self, export: str, trail: str | None, policy: Policy, *, compiled: bool,
        reloads: list[Policy] | None = None, sync: str = "never", syslog: str | None = None,
        start: bool = False, checkpoint_seconds: float = 10.0,
    ) -> None:  # fmt: skip
        self.compiled = compiled
        self.trail = trail
        ours, theirs = socket.socketpair()
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                for fd in _PARENT_FDS:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                ours.close()
                os.close(rd)
                _child(theirs, wr, export, trail, policy, compiled, reloads or [], sync, syslog, start,
                       checkpoint_seconds)
                code = 0
            except BaseException:
                with contextlib.suppress(BaseException):
                    os.write(wr, json.dumps({"error": traceback.format_exc()}).encode())
            finally:
                os._exit(code)
        theirs.close()
        os.close(wr)
        ours.settimeout(TIMEOUT)
        self.pid = pid
        self.sock = ours
        self.result_fd = rd
        _PARENT_FDS.update({ours.fileno(), rd})
        self.ended: Ended | None = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self, rtype: int) -> Answer:
        return read_answer(self.sock, rtype)

    def call(self, frame: bytes, rtype: int) -> Answer:
        self.send(frame)
        return self.answer(rtype)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def close(self) -> Ended:
        if self.ended is not None:
            return self.ended
        _PARENT_FDS.discard(self.sock.fileno())
        _PARENT_FDS.discard(self.result_fd)
        self.sock.close()
        data = b""
        try:
            while True:
                ready, _, _ = select.select([self.result_fd], [], [], TIMEOUT)
                if not ready:
                    os.kill(self.pid, signal.SIGKILL)
                    raise AssertionError(f"the {self.name} server did not end within {TIMEOUT} s")
                chunk = os.read(self.result_fd, 65536)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(self.result_fd)
            _, status = os.waitpid(self.pid, 0)
        report = json.loads(data) if data else {"error": f"no report (wait status {status})"}
        if "error" in report:
            raise AssertionError(f"the {self.name} server failed:\n{report['error']}")
        assert status == 0, f"the {self.name} server exited with wait status {status}"
        self.ended = Ended(**report)
        return self.ended

    @property
    def name(self) -> str:
        return "compiled" if self.compiled else "pipeline"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(chunks)} of {n} reply bytes")
        chunks += chunk
    return bytes(chunks)


def fd_identity(fd: int) -> tuple[int, ...]:
    """An fd received with a reply, on a tree both servers share: which inode, its mode, its flags."""
    st_ = os.fstat(fd)
    return (st_.st_dev, st_.st_ino, st_.st_mode, fcntl.fcntl(fd, fcntl.F_GETFL))


def read_answer(
    sock: socket.socket, rtype: int, seen_as: Callable[[int], tuple[int, ...]] = fd_identity
) -> Answer:
    if p.reply_shape(rtype) is p.ReplyShape.FD:
        fds = array.array("i")
        data, ancdata, _flags, _addr = sock.recvmsg(4, socket.CMSG_SPACE(4 * fds.itemsize))
        if not data:
            raise ConnectionError("connection closed before the fd reply")
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
        data += _recv_exact(sock, 4 - len(data))
        seen = None
        for fd in fds:
            try:
                seen = seen_as(fd)
            finally:
                os.close(fd)
        assert len(fds) <= 1, f"{len(fds)} fds with one reply"
        return Answer(data, seen)
    header = _recv_exact(sock, p.HEADER_SIZE)
    _kind, size = p.HEADER.unpack(header)
    return Answer(header + _recv_exact(sock, size))


def records(trail: str | Path, *, checkpoints: bool = False) -> list[dict[str, Any]]:
    """The trail's records; without the writer's checkpoints unless asked (they come at close, or every
    so many records or seconds: not one a frame)."""
    with open(trail, "rb") as f:
        found = [json.loads(line) for line in f.read().splitlines()]
    return found if checkpoints else [r for r in found if r.get("event") != "checkpoint"]


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def assert_intact(*trails: str) -> None:
    report = verify(list(trails), given_order=True)
    assert report.ok, "\n".join(str(problem) for problem in report.problems)


# ---------------------------------------------------------------------------------------------------------
# Private file systems: STATFS of a shared one moves between two requests (other processes write to it).


@pytest.fixture(scope="module")
def filesystems() -> Iterator[dict[str, str]]:
    """A private tmpfs (GETVERSION unsupported: 0 for any path) and a private ext4 on a loop device
    (GETVERSION's ioctl really runs), both noatime so that a READLINK leaves nothing for a later LSTAT
    to see; and a directory elsewhere for the trails (their writes must not move either's STATFS)."""
    require_root()
    base = tempfile.mkdtemp(prefix="gateway-fastloop-")
    mounted: list[str] = []
    try:
        tmpfs = os.path.join(base, "tmpfs")
        ext4 = os.path.join(base, "ext4")
        image = os.path.join(base, "ext4.img")
        trails = os.path.join(base, "trails")
        for d in (tmpfs, ext4, trails):
            os.mkdir(d)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,noatime", "tmpfs", tmpfs], check=True)
        mounted.append(tmpfs)
        with open(image, "wb") as f:
            f.truncate(96 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image],
                       check=True)  # fmt: skip
        subprocess.run(["mount", "-o", "loop,noatime", image, ext4], check=True)
        mounted.append(ext4)
        yield {"tmpfs": tmpfs, "ext4": ext4, "trails": trails}
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Trees.

PLAIN_NAMES = [b"a", b"b", b"dir", b"sub", b"f", b"with space", b"...", b".hidden", b"-x", b"n" * 255]
ODD_NAMES = [b'q"uote', b"back\\slash", "é".encode(), b"\xff\xfe"]  # never served in C: JSON escapes them
NAMES = PLAIN_NAMES + ODD_NAMES
MISSING = b"nope"


@dataclass(frozen=True)
class Node:
    kind: str  # dir, file, fifo, link
    path: bytes
    target: bytes = b""
    owner: int = 0
    mode: int = 0o755
    size: int = 0
    leads_to: bytes | None = None  # for a link to a directory of the tree: that directory

    def __repr__(self) -> str:
        extra = f" -> {self.target!r}" if self.kind == "link" else f" uid={self.owner} {self.mode:o}"
        return f"{self.kind} {self.path!r}{extra}"


def join(parent: bytes, name: bytes) -> bytes:
    return (b"" if parent == b"/" else parent) + b"/" + name


@st.composite
def trees(draw: st.DrawFn) -> list[Node]:
    nodes: list[Node] = []
    taken = {b"/"}
    dirs = [b"/"]

    def fresh(parent: bytes) -> bytes | None:
        name = weighted((st.sampled_from(PLAIN_NAMES), 3), (st.sampled_from(ODD_NAMES), 1))
        path = join(parent, draw(name))
        if path in taken:
            return None
        taken.add(path)
        return path

    owners = st.sampled_from([0, GUEST])
    for _ in range(draw(st.integers(1, 4), label="dirs")):
        path = fresh(draw(st.sampled_from(dirs)))
        if path is not None:
            dirs.append(path)
            nodes.append(Node("dir", path, owner=draw(owners), mode=draw(st.sampled_from([0o755, 0o700]))))
    for _ in range(draw(st.integers(1, 4), label="files")):
        path = fresh(draw(st.sampled_from(dirs)))
        if path is not None:
            size = draw(st.sampled_from([0, 5, 1 << 20]))
            nodes.append(Node("file", path, owner=draw(owners), mode=draw(st.sampled_from([0o644, 0o4755])),
                              size=size))  # fmt: skip
    path = fresh(draw(st.sampled_from(dirs)))
    if path is not None:
        nodes.append(Node("fifo", path, mode=0o600))
    # A link to a directory of the tree first (paths go through it), then links of every kind.
    objects = list(nodes)
    inner_dirs = dirs[1:]
    count = draw(st.integers(0, 4), label="links")
    for i in range(count + 1):
        path = fresh(draw(st.sampled_from(dirs)))
        if path is None:
            continue
        here = posixpath.dirname(path)
        if i == 0 and inner_dirs:
            to = draw(st.sampled_from(inner_dirs))
            relative = draw(st.booleans())
            target = posixpath.relpath(to, here) if relative else to
            nodes.append(Node("link", path, target=target, leads_to=to))
            continue
        kind = draw(st.sampled_from(["abs", "rel", "abs-slash", "dangling-abs", "dangling-rel", "up", "root",
                                     "dotdot", "dot", "self", "chain"]))  # fmt: skip
        to = draw(st.sampled_from(objects)).path if objects else b"/"
        target = {
            "abs": to,
            "rel": posixpath.relpath(to, here),
            "abs-slash": to + b"/",
            "dangling-abs": b"/nowhere/" + MISSING,
            "dangling-rel": MISSING + b"/" + MISSING,
            "up": b"../" * draw(st.integers(1, 4)) + posixpath.basename(to),
            "root": b"/",
            "dotdot": b"..",
            "dot": b".",
            "self": posixpath.basename(path),
            "chain": nodes[-1].path if nodes[-1].kind == "link" else to,
        }[kind]
        leads = to if kind in ("abs", "rel", "abs-slash") and to in dirs else None
        nodes.append(Node("link", path, target=target, leads_to=leads))
    return nodes


def build(export: str, nodes: list[Node]) -> None:
    os.mkdir(export)
    root = os.fsencode(export)
    for n in nodes:
        host = root + n.path
        if n.kind == "dir":
            os.mkdir(host, n.mode)
        elif n.kind == "file":
            fd = os.open(host, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, n.size)  # sparse: no block allocation (no delayed allocation on ext4)
            finally:
                os.close(fd)
            os.setxattr(host, b"trusted.gw", b"host-" + n.path[-8:])
            os.setxattr(host, b"user.gw", b"user value")
        elif n.kind == "fifo":
            os.mkfifo(host, n.mode)
        else:
            os.symlink(n.target, host)
        if n.kind in ("dir", "file"):
            os.chown(host, n.owner, n.owner)
            os.chmod(host, n.mode)


def path_pool(nodes: list[Node]) -> list[bytes]:
    """Every name of the tree, and the names reached through a link to a directory."""
    pool = [n.path for n in nodes]
    for link in nodes:
        if link.leads_to is None:
            continue
        for n in nodes:
            if posixpath.dirname(n.path) == link.leads_to:
                pool.append(join(link.path, posixpath.basename(n.path)))
        pool.append(join(link.path, MISSING))
    return pool


def _long(path: bytes, total: int) -> bytes:
    """path, padded with leading slashes to total bytes (the kernel collapses them: it still exists)."""
    body = path.lstrip(b"/") or b"."
    return b"/" * max(1, total - len(body)) + body


VARIANTS: dict[str, Callable[[bytes, int], bytes]] = {
    "as is": lambda s, _: s,
    "no leading slash": lambda s, _: s.lstrip(b"/"),
    "leading //": lambda s, _: b"/" + s,
    "trailing /": lambda s, _: s + b"/",
    "// inside": lambda s, _: s.replace(b"/", b"//", 2),
    "/./ inside": lambda s, k: _insert(s, k, b"."),
    "x/.. inside": lambda s, k: _insert(s, k, NAMES[k % len(NAMES)] + b"/.."),
    "missing/.. inside": lambda s, k: _insert(s, k, MISSING + b"/.."),
    "/.. last": lambda s, _: s + b"/..",
    "/. last": lambda s, _: s + b"/.",
    "missing last": lambda s, _: join(s, MISSING),
    "missing inside": lambda s, k: _insert(s, k, MISSING),
    "long 4094": lambda s, _: _long(s, 4094),
    "long 4095": lambda s, _: _long(s, 4095),
    "long 4096": lambda s, _: _long(s, 4096),
    "long 5000": lambda s, _: _long(s, 5000),
    "long component": lambda s, _: join(s, b"c" * 256),
    "long missing": lambda s, _: b"/z" * 2100,
    "empty": lambda s, _: b"",
    "root": lambda s, _: b"/",
    "root //": lambda s, _: b"//",
    "NUL inside": lambda s, _: s + b"\0\xff/../junk",
    "DEL": lambda s, _: s + b"\x7f",
    "control": lambda s, _: s + b"\x01",
}


def _insert(path: bytes, k: int, comp: bytes) -> bytes:
    parts = path.split(b"/")
    at = 1 + k % max(1, len(parts) - 1)
    return b"/".join([*parts[:at], comp, *parts[at:]])


def weighted(*choices: tuple[st.SearchStrategy[Any], int]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as often as its weight (one_of would count a repeated one once)."""
    return st.sampled_from([s for s, w in choices for _ in range(w)]).flatmap(lambda s: s)


def paths(pool: list[bytes]) -> st.SearchStrategy[bytes]:
    plain = st.sampled_from(pool)
    varied = st.builds(
        lambda f, s, k: f(s, k), st.sampled_from(list(VARIANTS.values())), plain, st.integers(0, 7)
    )
    return weighted((plain, 3), (varied, 2))


# ---------------------------------------------------------------------------------------------------------
# Policies.

PATHS_POLICY = """\
version: 1
tenant: eq-paths
default: deny
enforcement: {enforcement}
rules:
  - {{id: tree, effect: allow, ops: [all], paths: ["/**"]}}
  - {{id: hidden, effect: deny, ops: [read], paths: ["/dir/**", "**/sub"], errno: EROFS}}
  - {{id: no-stat, effect: deny, ops: [lstat, statfs], paths: ["**/f", "/a/**"], errno: 300}}
  - {{id: no-version, effect: deny, ops: [getversion, llistxattr], paths: ["/b/**", "**/with space"]}}
  - {{id: odd-errno, effect: deny, ops: [lstat], paths: ["**/.hidden", "/**/-x"], errno: 200}}
  - {{id: always, effect: deny, ops: [read], paths: ["**/...", "/nope/**"], errno: ENOENT, enforce: always}}
  - {{id: no-writes, effect: deny, ops: [write], paths: ["**/sub/**"], errno: EPERM}}
"""

OBJECT_POLICY = """\
version: 1
tenant: eq-object
default: allow
rules:
  - {id: dirs, effect: deny, ops: [lstat, getversion], paths: ["/dir/**", "/a/**"],
     when: {object: {type: [dir]}}, errno: EPERM}
  - {id: guest-owned, effect: deny, ops: [statfs, readlink, open, lgetxattr],
     when: {object: {owner: [1000]}}, errno: EROFS}
  - {id: setuid, effect: deny, ops: [lstat], paths: ["**/b/**"], when: {object: {mode_any: [setuid]}}}
  - {id: fifos, effect: deny, ops: [lstat], when: {type: [fifo]}, errno: ENXIO}
  - {id: plain, effect: deny, ops: [lstat, statfs], paths: ["**/f"], errno: ENOTDIR}
"""


@pytest.fixture(scope="module")
def policies() -> dict[str, Policy]:
    return {
        "allow-all": load_policy(ALLOW_ALL),
        "paths": load_policy_bytes(PATHS_POLICY.format(enforcement="enforce").encode(), "paths.yaml"),
        "permissive": load_policy_bytes(PATHS_POLICY.format(enforcement="permissive").encode(), "perm.yaml"),
        "object": load_policy_bytes(OBJECT_POLICY.encode(), "object.yaml"),
    }


# ---------------------------------------------------------------------------------------------------------
# Requests.

OBSERVER_TYPES = frozenset({
    p.RequestType.LSTAT, p.RequestType.GETVERSION, p.RequestType.STATFS, p.RequestType.READLINK,
    p.RequestType.LGETXATTR, p.RequestType.LLISTXATTR, p.RequestType.OPEN,
})  # fmt: skip
XATTR_NAMES = [b"trusted.gw", b"user.gw", b"user.none", b"security.capability"]
TARGETS = [b"/", b"..", b"../..", b"a", b"/dir/f", b"nope/x", b"/b", b"sub/../f", b'q"uote', b"\xff\xfe"]


READ_FLAGS = [os.O_RDONLY | extra for extra in (0, os.O_NOFOLLOW, os.O_DIRECTORY, os.O_NONBLOCK)]
CREATE_FLAGS = [os.O_CREAT | os.O_WRONLY, os.O_CREAT | os.O_EXCL | os.O_RDWR]


def observers(path: st.SearchStrategy[bytes]) -> st.SearchStrategy[p.Request]:
    """Weighted towards the types the compiled loop serves itself."""
    served_in_c = weighted((st.builds(p.Lstat, path), 1), (st.builds(p.Getversion, path), 1),
                           (st.builds(p.Statfs, path), 1))
    others = weighted(*((o, 1) for o in [
        st.builds(p.Readlink, path, st.sampled_from([4096, 2, 1, 0])),
        st.builds(p.Lgetxattr, st.sampled_from([0, 64, 4]), path, st.sampled_from(XATTR_NAMES)),
        st.builds(p.Llistxattr, st.sampled_from([0, 256, 3]), path),
        st.builds(p.Open, path, st.sampled_from(READ_FLAGS)),
    ]))
    return weighted((served_in_c, 3), (st.builds(p.Lstat, path), 1), (others, 2))


def mutations(path: st.SearchStrategy[bytes]) -> st.SearchStrategy[p.Request]:
    ids = st.sampled_from([0, GUEST])
    return weighted(*((m, 1) for m in [
        st.builds(p.Create, path, st.sampled_from(CREATE_FLAGS), st.sampled_from([0o644, 0o4755]), ids, ids),
        st.builds(p.Remove, path),
        st.builds(lambda u, q, m: p.Mkdir(u, u, q, m), ids, path, st.sampled_from([0o755, 0o700])),
        st.builds(p.Chmod, path, st.sampled_from([0o755, 0o600, 0o4755, 0o000])),
        st.builds(p.Chown, path, ids, ids),
        st.builds(p.Rename, path, path),
        st.builds(p.Link, path, path),
        st.builds(lambda u, t, q: p.Symlink(u, u, t, q), ids, st.sampled_from(TARGETS), path),
        st.builds(p.Utime, path, st.sampled_from([0, 1, (1 << 64) - 1, 1 << 40]),
                  st.sampled_from([0, 999_999_999, (1 << 30) - 1, (1 << 30) - 2]),
                  st.sampled_from([0, 1_700_000_000, (1 << 64) - 5]), st.sampled_from([0, 5, (1 << 30) - 2])),
        st.builds(p.Truncate, path, st.sampled_from([0, 7, 1 << 30])),
        st.builds(p.Lsetxattr, path, st.sampled_from(XATTR_NAMES[:2]), st.just(b"guest value"),
                  st.just(11), st.sampled_from([0, 1, 2])),
        st.builds(lambda q: p.Mknod(0, 0, q, stat.S_IFIFO | 0o644, 0), path),
    ]))


FRAMES = ["qemu", "no NUL", "trailing bytes"]


def frame(request: p.Request, how: str) -> bytes:
    """The request as QEMU sends it (paths with a NUL), without the NUL, or with bytes after its fields."""
    if how == "no NUL":
        return p.encode_request(request)
    data = p.encode_request(request, nul=True)
    if how == "trailing bytes":
        rtype, size = p.HEADER.unpack_from(data)
        data = p.HEADER.pack(rtype, size + 5) + data[p.HEADER_SIZE :] + b"\xff\"\\\0x"
    return data


def _raw(rtype: int, size: int, payload: bytes) -> tuple[bytes, int]:
    return p.HEADER.pack(rtype, size) + payload, rtype


RAW_FRAMES = {
    "lstat, no payload": _raw(p.RequestType.LSTAT, 0, b""),
    "lstat, 1 byte": _raw(p.RequestType.LSTAT, 1, b"\x05"),
    "lstat, path longer than the frame": _raw(p.RequestType.LSTAT, 4, b"\x09\x00/a"),
    "statfs, path longer than the frame": _raw(p.RequestType.STATFS, 3, b"\xff\xff/"),
    "getversion, path longer than the frame": _raw(p.RequestType.GETVERSION, 2, b"\x01\x00"),
    "open, too short": _raw(p.RequestType.OPEN, 4, b"\x01\x00/a"),
    "unknown type 99": _raw(99, 4, b"abcd"),
    "unknown type 0": _raw(0, 0, b""),
}


@dataclass
class Step:
    kind: str  # observe, burst, mutate, raw
    requests: list[p.Request] = field(default_factory=list)
    how: str = "qemu"
    raw: str = ""


def steps(pool: list[bytes]) -> st.SearchStrategy[list[Step]]:
    path = paths(pool)
    observe = st.builds(lambda r, h: Step("observe", [r], h), observers(path), st.sampled_from(FRAMES))
    burst = st.builds(lambda rs: Step("burst", rs), st.lists(observers(path), min_size=2, max_size=5))
    mutate = st.builds(lambda r: Step("mutate", [r]), mutations(path))
    raw = st.builds(lambda k: Step("raw", raw=k), st.sampled_from(list(RAW_FRAMES)))
    one = weighted((observe, 4), (mutate, 3), (burst, 2), (raw, 1))
    return st.lists(one, min_size=3, max_size=60 if LONG else 25)


# ---------------------------------------------------------------------------------------------------------
# 1. The equivalence property.


@dataclass
class Totals:
    examples: int = 0
    served: int = 0
    handed: int = 0
    observed: int = 0


TOTALS = Totals()

SETTINGS = settings(
    max_examples=2000 if LONG else 300,
    derandomize=SEED is None,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    print_blob=True,
)


def describe(answer: Answer) -> str:
    raw = answer.raw
    if len(raw) >= 8:
        kind, size = p.HEADER.unpack_from(raw)
        if kind == p.T_ERROR and size == 4:
            code = -struct.unpack_from("<i", raw, 8)[0]
            return f"error {errno.errorcode.get(code, code)}"
    return repr(answer)


def run_example(fs: dict[str, str], policy: Policy, nodes: list[Node], where: str, plan: list[Step]) -> None:
    base = tempfile.mkdtemp(prefix="ex-", dir=fs[where])
    trails = tempfile.mkdtemp(prefix="ex-", dir=fs["trails"])
    export = os.path.join(base, "export")
    peers: list[Peer] = []
    try:
        build(export, nodes)
        compiled = Peer(export, os.path.join(trails, "compiled.jsonl"), policy, compiled=True)
        peers.append(compiled)
        pipeline = Peer(export, os.path.join(trails, "pipeline.jsonl"), policy, compiled=False)
        peers.append(pipeline)
        both = (compiled, pipeline)
        # What each trail's records stand for, in order: an observation's number, or None (a mutation).
        sent: dict[Peer, list[int | None]] = {compiled: [], pipeline: []}
        observation = 0
        mutated = 0
        for i, step in enumerate(plan):
            if step.kind == "mutate":
                target = both[mutated % 2]
                mutated += 1
                request = step.requests[0]
                got = target.call(frame(request, "qemu"), request.type)
                sent[target].append(None)
                note(f"{i}: {target.name} {request!r} -> {describe(got)}")
                continue
            order = both if i % 2 == 0 else both[::-1]
            if step.kind == "raw":
                data, rtype = RAW_FRAMES[step.raw]
                answers = [peer.call(data, rtype) for peer in order]
                for peer in order:
                    sent[peer].append(observation)
                observation += 1
                note(f"{i}: raw {step.raw} -> {answers}")
                assert answers[0] == answers[1], f"step {i}: raw frame {step.raw}: {answers}"
                continue
            frames = b"".join(frame(r, step.how) for r in step.requests)
            got_by: dict[Peer, list[Answer]] = {}
            for peer in order:
                peer.send(frames)  # a burst: pipelined in one write, answered in order
                got_by[peer] = [peer.answer(r.type) for r in step.requests]
                sent[peer].extend(range(observation, observation + len(step.requests)))
            for k, request in enumerate(step.requests):
                a, b = got_by[compiled][k], got_by[pipeline][k]
                note(f"{i}: {request!r} ({step.how}) -> compiled {describe(a)}, pipeline {describe(b)}")
                assert a == b, f"step {i}: {request!r} ({step.how}): compiled {a}, pipeline {b}"
            observation += len(step.requests)
        ended = {peer: peer.close() for peer in peers}
        TOTALS.served += ended[compiled].served
        TOTALS.handed += ended[compiled].handed
        TOTALS.observed += observation
        assert ended[pipeline].served == 0  # compiled_requests=False: everything went to the pipeline
        # The records, observation by observation.
        by_observation: dict[Peer, dict[int, dict[str, Any]]] = {}
        for peer in peers:
            assert peer.trail is not None
            got = records(peer.trail)
            assert len(got) == len(sent[peer]), f"{peer.name}: {len(got)} records, {len(sent[peer])} frames"
            by_observation[peer] = {n: r for n, r in zip(sent[peer], got, strict=True) if n is not None}
        for n in range(observation):
            a, b = comparable(by_observation[compiled][n]), comparable(by_observation[pipeline][n])
            assert a == b, f"observation {n}: records differ:\ncompiled {a}\npipeline {b}"
        for peer in peers:
            assert peer.trail is not None
            assert_intact(peer.trail)
    finally:
        for peer in peers:
            with contextlib.suppress(Exception):
                peer.close()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(trails, ignore_errors=True)


@st.composite
def examples(draw: st.DrawFn) -> tuple[str, str, list[Node], list[Step]]:
    where = draw(st.sampled_from(["tmpfs", "ext4"]), label="file system")
    policy = draw(st.sampled_from(["allow-all", "paths", "permissive", "object"]), label="policy")
    nodes = draw(trees(), label="tree")
    plan = draw(steps(path_pool(nodes)), label="steps")
    return where, policy, nodes, plan


@SETTINGS
@given(example=examples())
def _property(example: tuple[str, str, list[Node], list[Step]], fs: dict[str, str],
              pols: dict[str, Policy]) -> None:  # fmt: skip
    where, policy, nodes, plan = example
    TOTALS.examples += 1
    run_example(fs, pols[policy], nodes, where, plan)


if SEED is not None:
    seed(int(SEED))(_property)


def test_compiled_and_pipeline_answer_alike(filesystems: dict[str, str], policies: dict[str, Policy]) -> None:
    before = Totals(**vars(TOTALS))
    _property(fs=filesystems, pols=policies)
    # Over the run as a whole (one example may draw only inputs the compiled loop hands over).
    assert TOTALS.examples > before.examples
    assert TOTALS.served > before.served, "the compiled loop served nothing itself: the test compared nothing"
    assert TOTALS.handed > before.handed


# ---------------------------------------------------------------------------------------------------------
# 2. Hand-over guards: what the compiled loop must not serve itself, and what it must.

GUARD_TREE = [
    Node("dir", b"/d"),
    Node("file", b"/d/f", size=12),
    Node("dir", b"/d/sub", owner=GUEST),
    Node("link", b"/link", target=b"d", leads_to=b"/d"),
    Node("link", b"/d/flink", target=b"f"),
    Node("link", b"/dangling", target=b"nope/x"),
    Node("file", "/é".encode()),
    Node("file", b'/q"x'),
    Node("file", b"/b\\s"),
    Node("file", b"/..."),
    Node("fifo", b"/fifo", mode=0o600),
]

GUARD_POLICY = """\
version: 1
tenant: eq-guards
default: allow
rules:
  - {id: no-f, effect: deny, ops: [lstat], paths: ["/d/f"], errno: EROFS}
  - {id: dirs, effect: deny, ops: [lstat, statfs, getversion], paths: ["/d/sub/**", "/d/sub"],
     when: {object: {type: [dir]}}, errno: EPERM}
"""


# An id map without limits: host uid/gid 1000 (GUEST) shows as 5000 to the guest, root as the squash id.
IDS_POLICY = """\
version: 1
tenant: eq-ids
default: allow
ids:
  uid:
    - {guest: 5000, host: 1000, count: 10}
  gid:
    - {guest: 5000, host: 1000, count: 10}
  unmapped: squash
"""


@pytest.fixture(scope="module")
def guard_policies(policies: dict[str, Policy]) -> dict[str, Policy]:
    return {
        **policies,
        "guards": load_policy_bytes(GUARD_POLICY.encode(), "guards.yaml"),
        "mapped": load_policy(ROOT / "policies" / "mapped-tenant.yaml"),
        "ids": load_policy_bytes(IDS_POLICY.encode(), "ids.yaml"),
    }


@dataclass
class Session:
    answers: dict[str, list[Answer]]
    records: dict[str, list[dict[str, Any]]]
    ended: dict[str, Ended]


def session(
    fs: dict[str, str], policy: Policy, frames: list[tuple[bytes, int]], *, where: str = "tmpfs",
    nodes: list[Node] = GUARD_TREE, trail: bool = True,
) -> Session:  # fmt: skip
    """The frames sent, one at a time, to a compiled and to a pipeline server of the same tree."""
    base = tempfile.mkdtemp(prefix="guard-", dir=fs[where])
    trails = tempfile.mkdtemp(prefix="guard-", dir=fs["trails"])
    export = os.path.join(base, "export")
    out = Session({}, {}, {})
    try:
        build(export, nodes)
        for compiled in (True, False):
            name = "compiled" if compiled else "pipeline"
            path = os.path.join(trails, f"{name}.jsonl") if trail else None
            peer = Peer(export, path, policy, compiled=compiled)
            try:
                out.answers[name] = [peer.call(data, rtype) for data, rtype in frames]
            finally:
                out.ended[name] = peer.close()
            if path is not None:
                out.records[name] = records(path)
                assert_intact(path)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(trails, ignore_errors=True)
    return out


def assert_alike(s: Session) -> None:
    assert s.answers["compiled"] == s.answers["pipeline"]
    assert [comparable(r) for r in s.records.get("compiled", [])] == [
        comparable(r) for r in s.records.get("pipeline", [])
    ]


HANDED_OVER = {
    "a symlink on the way": (p.Lstat(b"/link/f"), "allow-all"),
    "a symlink on the way (statfs)": (p.Statfs(b"/link/f"), "allow-all"),
    "a final symlink (getversion follows it)": (p.Getversion(b"/d/flink"), "allow-all"),
    "a dangling symlink (statfs)": (p.Statfs(b"/dangling"), "allow-all"),
    "a '..' component": (p.Lstat(b"/d/../d/f"), "allow-all"),
    "a '..' last": (p.Statfs(b"/d/.."), "allow-all"),
    "a '.' component": (p.Lstat(b"/d/./f"), "allow-all"),
    "a trailing slash": (p.Lstat(b"/d/"), "allow-all"),
    "a trailing slash on a file": (p.Getversion(b"/d/f/"), "allow-all"),
    "a non-ASCII path": (p.Lstat("/é".encode()), "allow-all"),
    "invalid UTF-8": (p.Lstat(b"/\xff"), "allow-all"),
    "a '\"' in the path": (p.Lstat(b'/q"x'), "allow-all"),
    "a '\\' in the path": (p.Lstat(b"/b\\s"), "allow-all"),
    "DEL in the path": (p.Lstat(b"/d\x7f"), "allow-all"),
    "a control character in the path": (p.Lstat(b"/d\x01"), "allow-all"),
    "the root": (p.Lstat(b"/"), "allow-all"),
    "the root (statfs)": (p.Statfs(b"/"), "allow-all"),
    "the root as '//'": (p.Getversion(b"//"), "allow-all"),
    "an empty path": (p.Lstat(b""), "allow-all"),
    "a path of PATH_MAX bytes": (p.Lstat(_long(b"/d/f", 4096)), "allow-all"),
    "a long component in the parent": (p.Lstat(b"/" + b"c" * 256 + b"/f"), "allow-all"),
    "a rule that needs the object": (p.Lstat(b"/d/sub"), "guards"),
    "a rule that needs the object (statfs)": (p.Statfs(b"/d/sub"), "guards"),
    "a rule that needs the object (object policy)": (p.Getversion(b"/a"), "object"),
    "an id map and a rate limit": (p.Lstat(b"/d/f"), "mapped"),
    "O_TMPFILE on a missing parent": (p.Open(b"/nope/x", os.O_TMPFILE | os.O_RDWR), "allow-all"),
}

SERVED_IN_C = {
    "a plain path": (p.Lstat(b"/d/sub"), "allow-all"),
    "a plain file": (p.Getversion(b"/d/f"), "allow-all"),
    "a plain statfs": (p.Statfs(b"/d"), "allow-all"),
    "a missing name": (p.Lstat(b"/d/missing"), "allow-all"),
    "a missing parent": (p.Statfs(b"/nope/x"), "allow-all"),
    "a file on the way": (p.Lstat(b"/d/f/x"), "allow-all"),
    "a FIFO": (p.Getversion(b"/fifo"), "allow-all"),
    "doubled slashes": (p.Lstat(b"//d//f"), "allow-all"),
    "no leading slash": (p.Lstat(b"d/f"), "allow-all"),
    "three dots": (p.Lstat(b"/..."), "allow-all"),
    "a long component": (p.Lstat(b"/d/" + b"c" * 256), "allow-all"),
    "just under PATH_MAX": (p.Lstat(_long(b"/d/f", 4095)), "allow-all"),
    "a deny on the path": (p.Lstat(b"/d/f"), "guards"),
    "a decision without the object": (p.Lstat(b"/d"), "guards"),
    "an id map: the owner shown mapped": (p.Lstat(b"/d/sub"), "ids"),
    "an id map: root shown squashed": (p.Lstat(b"/d/f"), "ids"),
    "an id map: no owner in the reply": (p.Statfs(b"/d"), "ids"),
}


@pytest.mark.parametrize("name", list(HANDED_OVER))
def test_handed_over_to_the_pipeline(
    name: str, filesystems: dict[str, str], guard_policies: dict[str, Policy]
) -> None:
    request, policy = HANDED_OVER[name]
    s = session(filesystems, guard_policies[policy], [(frame(request, "qemu"), request.type)])
    assert (s.ended["compiled"].served, s.ended["compiled"].handed) == (0, 1), s.ended["compiled"]
    assert_alike(s)


@pytest.mark.parametrize("where", ["tmpfs", "ext4"])
@pytest.mark.parametrize("how", FRAMES)
@pytest.mark.parametrize("name", list(SERVED_IN_C))
def test_plain_inputs_are_served_in_c(
    name: str, how: str, where: str, filesystems: dict[str, str], guard_policies: dict[str, Policy]
) -> None:
    request, policy = SERVED_IN_C[name]
    s = session(filesystems, guard_policies[policy], [(frame(request, how), request.type)], where=where)
    assert (s.ended["compiled"].served, s.ended["compiled"].handed) == (1, 0), s.ended["compiled"]
    assert_alike(s)


def test_a_create_under_an_id_map_is_the_pipelines(
    filesystems: dict[str, str], guard_policies: dict[str, Policy]
) -> None:
    """Under an id map a CREATE's owner is mapped to the host's ids and its record names both: only the
    pipeline does that. (A mutation: the two servers share the export, so only the counts compare.)"""
    request = p.Create(b"/d/new", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 5000, 5000)
    s = session(filesystems, guard_policies["ids"], [(frame(request, "qemu"), request.type)])
    assert (s.ended["compiled"].served, s.ended["compiled"].handed) == (0, 1), s.ended["compiled"]
    created = [r for r in s.records["compiled"] if r.get("op") == "create"]
    assert created and created[0]["host_uid"] == 1000 and created[0]["result"] == "ok", created


def test_a_long_tenant_name_never_overruns_the_record(
    filesystems: dict[str, str], policies: dict[str, Policy]
) -> None:
    """The record's head (tenant, policy) counts against the line buffer: a tenant of ~31 KB and a
    ~4 KB path once overran it (SIGSEGV). Such a record is the pipeline's; short ones stay in C."""
    policy = load_policy_bytes(f"version: 1\ntenant: {'x' * 31000}\ndefault: allow\n".encode(), "long.yaml")
    long_path = _long(b"/d/f", 4000)
    frames = [(frame(r, "qemu"), r.type) for r in (p.Lstat(b"/d/f"), p.Lstat(long_path), p.Lstat(b"/d"))]
    s = session(filesystems, policy, frames)
    assert s.ended["compiled"].end == "client closed the connection", s.ended["compiled"]
    assert s.ended["compiled"].handed >= 1, s.ended["compiled"]
    assert_alike(s)


def test_served_in_c_without_a_trail(filesystems: dict[str, str], policies: dict[str, Policy]) -> None:
    frames = [(frame(r, "qemu"), r.type) for r in (p.Lstat(b"/d/f"), p.Statfs(b"/d"), p.Getversion(b"/d"))]
    s = session(filesystems, policies["allow-all"], frames, trail=False)
    assert (s.ended["compiled"].served, s.ended["compiled"].handed) == (3, 0)
    assert_alike(s)


def test_a_frame_in_pieces_and_frames_in_one_write(
    filesystems: dict[str, str], policies: dict[str, Policy]
) -> None:
    """The compiled loop frames the stream itself: a frame split over several reads, and several frames
    (served and handed over, in turn) in one read, answered in order."""
    base = tempfile.mkdtemp(prefix="guard-", dir=filesystems["tmpfs"])
    export = os.path.join(base, "export")
    build(export, GUARD_TREE)
    mixed = [p.Lstat(b"/d/f"), p.Lstat(b"/link/f"), p.Statfs(b"/d"), p.Lstat(b"/"), p.Getversion(b"/d/f"),
             p.Open(b"/d/f", os.O_RDONLY), p.Lstat(b"/d/sub")]  # fmt: skip
    got: dict[str, list[Answer]] = {}
    try:
        for compiled in (True, False):
            peer = Peer(export, None, policies["allow-all"], compiled=compiled)
            try:
                answers = []
                data = frame(p.Lstat(b"/d/sub"), "qemu")
                for i in range(len(data)):  # a byte at a time: each read ends inside the frame
                    peer.send(data[i : i + 1])
                    if i < len(data) - 1:
                        ready, _, _ = select.select([peer.sock], [], [], 0.002)
                        assert not ready, "answered before the frame was complete"
                answers.append(peer.answer(p.RequestType.LSTAT))
                peer.send(b"".join(frame(r, "qemu") for r in mixed))
                answers += [peer.answer(r.type) for r in mixed]
                got[peer.name] = answers
            finally:
                ended = peer.close()
            if compiled:
                assert ended.served == 6 and ended.handed == 2, ended  # /link/f and / go to the pipeline
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert got["compiled"] == got["pipeline"]


def test_the_decision_table_fills_clears_and_decides_alike(
    filesystems: dict[str, str], policies: dict[str, Policy]
) -> None:
    """More distinct (op, path) decisions than the compiled loop's table keeps (it is cleared when 3/4
    of its 32,768 slots are used): every answer and record still the pipeline's."""
    count = 26_000
    requests: list[p.Request] = [p.Lstat(b"/d/m%d" % i) for i in range(count)]
    requests[::97] = [p.Lstat(b"/d/f")] * len(requests[::97])  # denied (no-stat: errno 300), kept
    frames = [frame(r, "qemu") for r in requests]
    base = tempfile.mkdtemp(prefix="table-", dir=filesystems["tmpfs"])
    trails = tempfile.mkdtemp(prefix="table-", dir=filesystems["trails"])
    export = os.path.join(base, "export")
    build(export, GUARD_TREE)
    got: dict[str, list[Answer]] = {}
    ended: dict[str, Ended] = {}
    try:
        for compiled in (True, False):
            name = "compiled" if compiled else "pipeline"
            peer = Peer(export, os.path.join(trails, f"{name}.jsonl"), policies["paths"], compiled=compiled)
            try:
                answers: list[Answer] = []
                for at in range(0, count, 500):  # chunks: neither side's socket buffer fills up
                    peer.send(b"".join(frames[at : at + 500]))
                    answers += [peer.answer(p.RequestType.LSTAT) for _ in frames[at : at + 500]]
                got[name] = answers
            finally:
                ended[name] = peer.close()
        assert got["compiled"] == got["pipeline"]
        # Every 256 KiB of records the trail's reserved room runs out: that request goes to the pipeline,
        # whose reserve() allocates more.
        assert ended["compiled"].served > count - 100, ended["compiled"]
        assert ended["compiled"].decisions > count * 3 // 4  # the table was cleared at least once
        a = records(os.path.join(trails, "compiled.jsonl"))
        b = records(os.path.join(trails, "pipeline.jsonl"))
        assert [comparable(r) for r in a] == [comparable(r) for r in b]
        for name in ("compiled", "pipeline"):
            assert_intact(os.path.join(trails, f"{name}.jsonl"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(trails, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# 3. The build that is loaded.


def test_the_compiled_module_is_the_one_loaded(tmp_path: Path) -> None:
    assert gateway.fastloop.__file__.endswith(".so"), gateway.fastloop.__file__
    info = gateway.fastloop.build_info()
    assert info["build"] == "compiled", info
    assert info["module"] == os.path.basename(gateway.fastloop.__file__)
    require_root()
    export = tmp_path / "export"
    (export / "d").mkdir(parents=True)
    trail = tmp_path / "trail.jsonl"
    serve = [sys.executable, "-m", "gateway", "serve", "--policy", ALLOW_ALL]
    with over_socketpair(serve, export, extra=["--audit-log", str(trail)]) as gw:
        assert gw.client.call(p.Lstat(b"/d")).ok
        assert gw.stop() == 0
    got = records(trail)
    start = next(r for r in got if r["event"] == "start")
    assert start["data_plane"]["build"] == "compiled", start
    assert start["data_plane"]["module"] == info["module"], start
    assert [r["event"] for r in got if r["event"] == "request"] == ["request"]
    assert_intact(str(trail))


# ---------------------------------------------------------------------------------------------------------
# 4. The trail's state, handed between C and Python.


def test_trail_state_passes_between_c_and_python(
    filesystems: dict[str, str], policies: dict[str, Policy], sync: str = "never"
) -> None:
    _trail_handover(filesystems, policies, sync)


@pytest.mark.parametrize("sync", ["every", "interval"])
def test_trail_state_passes_between_c_and_python_synced(
    filesystems: dict[str, str], policies: dict[str, Policy], sync: str
) -> None:
    _trail_handover(filesystems, policies, sync)


def wait_for_record(trail: str, event: str, count: int) -> None:
    """Until the trail holds count records of event. A signal is acted on between two frames, but one
    that comes while poll() returns for data is acted on after the frames read with it (the compiled loop
    checks for signals only when it waits), so a test that needs an order waits for the record."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            files = [f for f in (trail + ".1", trail) if os.path.exists(f)]  # across a rotation
            if sum(r["event"] == event for f in files for r in records(f)) >= count:
                return
        time.sleep(0.001)
    raise AssertionError(f"no {count}th {event} record in {trail} after {TIMEOUT} s")


def _trail_handover(fs: dict[str, str], policies: dict[str, Policy], sync: str) -> None:
    """Requests served in C, requests handed over, protocol errors, unknown types, policy reloads
    (SIGHUP, the reloader cycling between two policies) and a reopen after rotation (SIGUSR1), then
    enough records to use up the trail's reserved room several times: the trail verifies (seq up by
    one, the chain intact, across the rotation), and is the pipeline's record for record."""
    base = tempfile.mkdtemp(prefix="trail-", dir=fs["tmpfs"])
    trails = tempfile.mkdtemp(prefix="trail-", dir=fs["trails"])
    export = os.path.join(base, "export")
    build(export, GUARD_TREE)
    round_ = [
        (frame(p.Lstat(b"/d/f"), "qemu"), p.RequestType.LSTAT),
        (frame(p.Lstat(b"/link/f"), "qemu"), p.RequestType.LSTAT),
        RAW_FRAMES["lstat, path longer than the frame"],
        (frame(p.Statfs(b"/d"), "qemu"), p.RequestType.STATFS),
        RAW_FRAMES["unknown type 99"],
        (frame(p.Getversion(b"/d/f"), "trailing bytes"), p.RequestType.GETVERSION),
        (frame(p.Open(b"/d/f", os.O_RDONLY), "qemu"), p.RequestType.OPEN),
        (frame(p.Lstat(b"/d/sub"), "no NUL"), p.RequestType.LSTAT),
        (frame(p.Lstat(b"/d/../d/f"), "qemu"), p.RequestType.LSTAT),
    ]
    got: dict[str, list[Answer]] = {}
    files: dict[str, list[str]] = {}
    ended: dict[str, Ended] = {}
    try:
        for compiled in (True, False):
            name = "compiled" if compiled else "pipeline"
            trail = os.path.join(trails, f"{name}.jsonl")
            peer = Peer(export, trail, policies["allow-all"], compiled=compiled, sync=sync, start=True,
                        reloads=[policies["paths"], policies["allow-all"]])  # fmt: skip
            answers: list[Answer] = []
            try:
                for k in range(4):
                    answers += [peer.call(data, rtype) for data, rtype in round_]
                    # A signal and a frame arriving together may be acted on in either order (see
                    # wait_for_record): the next frame is sent once the signal's record is written.
                    peer.signal(signal.SIGHUP)
                    wait_for_record(trail, "policy-reload", k + 1)
                    answers += [peer.call(data, rtype) for data, rtype in round_[:4]]
                    if k == 1:
                        os.rename(trail, trail + ".1")  # logrotate
                        peer.signal(signal.SIGUSR1)
                        wait_for_record(trail, "reopen", 1)
                    # Pipelined: served and handed frames from one read.
                    peer.send(b"".join(data for data, _ in round_))
                    answers += [peer.answer(rtype) for _, rtype in round_]
                # Records enough to use up the reserved room (256 KiB at a time) a few times.
                for at in range(0, 3000, 300):
                    batch = [frame(p.Lstat(b"/d/m%d" % i), "qemu") for i in range(at, at + 300)]
                    batch[::7] = [frame(p.Lstat(b"/link/f"), "qemu")] * len(batch[::7])
                    peer.send(b"".join(batch))
                    answers += [peer.answer(p.RequestType.LSTAT) for _ in batch]
                got[name] = answers
            finally:
                ended[name] = peer.close()
            files[name] = [trail + ".1", trail]
        assert ended["compiled"].served > 2000 and ended["compiled"].handed > 400, ended["compiled"]
        assert got["compiled"] == got["pipeline"]
        whole_a = [r for f in files["compiled"] for r in records(f, checkpoints=True)]
        trail_a = [r for f in files["compiled"] for r in records(f)]
        trail_b = [r for f in files["pipeline"] for r in records(f)]
        events = {r["event"] for r in trail_a}
        lifecycle = {"start", "policy-load", "protocol-error", "policy-reload", "reopen", "stop"}
        assert events >= {"request", *lifecycle}
        assert [r["seq"] for r in whole_a] == list(range(1, len(whole_a) + 1))
        assert [comparable(r) for r in trail_a] == [comparable(r) for r in trail_b]
        # Checkpoints on the compiled path: every 1,000 records (or 10 s) while C serves, one closing the
        # rotated file, the final one at close; each one's head is its own prev, range up to the one before.
        cps = [r for r in whole_a if r["event"] == "checkpoint"]
        assert len(cps) >= 5 and cps[-1].get("final") is True and whole_a[-1] is cps[-1]
        assert records(files["compiled"][0], checkpoints=True)[-1]["event"] == "checkpoint"
        for cp in cps:
            assert cp["head"] == cp["prev"] and cp["last"] == cp["seq"] - 1 and cp["seal"] is None
        assert any(r["event"] == "request" and r["seq"] > 1000 for r in whole_a)
        for name in ("compiled", "pipeline"):
            assert_intact(*files[name])
        cli = subprocess.run(
            [sys.executable, "-m", "gateway", "audit", *files["compiled"], "--verify"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stdout + cli.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(trails, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# 5. Mutations held side by side: the same requests to two copies of one tree.
#
# Two exports built from one tree spec (on one private file system), one served by a compiled server and
# one by a pipeline server, each with its own trail; every request goes to both, mutations included
# (CREATE, REMOVE, CHMOD, UTIME are served in C; MKDIR, SYMLINK, RENAME, LINK by the pipeline), so the
# compiled loop's answers to mutations are compared with the pipeline's directly: the replies (for OPEN
# and CREATE the status and what the fd is: type and mode, size, owner, group, status flags), the records
# pairwise, and at the end the two trees (type, mode, owner, group, size, link count, symlink target, and
# every atime/mtime a UTIME set explicitly).

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
M_CREATE_FLAGS = [
    os.O_CREAT | os.O_EXCL | os.O_RDWR, os.O_CREAT | os.O_WRONLY, os.O_CREAT | os.O_RDWR | os.O_TRUNC,
    os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NONBLOCK, os.O_CREAT | os.O_RDONLY,
    os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_APPEND,
]  # fmt: skip
M_CREATE_MODES = [0o644, 0o600, 0o4755, 0o2755, 0o6777, 0o1777, 0o000, stat.S_IFREG | 0o640, 0o777]
M_IDS = [0, GUEST, 0xFFFFFFFF]
M_CHMOD_MODES = [0o755, 0o600, 0o4755, 0o2711, 0o1777, 0o000, stat.S_IFDIR | 0o700]
M_SECONDS = [0, 1, 1_700_000_000, (1 << 64) - 1, 1 << 40]
M_NSECONDS = [0, 5, 999_999_999, UTIME_NOW, UTIME_OMIT]
M_READLINK_SIZES = [0, 1, 2, 3, 4096, 0x7FFFFFFF, 0xFFFFFFFF]
M_OPEN_FLAGS = [
    os.O_RDONLY, os.O_WRONLY | os.O_TRUNC, os.O_RDWR, os.O_RDONLY | os.O_DIRECTORY,
    os.O_RDONLY | os.O_NOFOLLOW, os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_NONBLOCK,
    os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_CREAT | os.O_EXCL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
]  # fmt: skip
NEW_NAMES = [b"new", b"n2", "ñ".encode()]  # names the tree does not have (until a CREATE or MKDIR makes one)

CREATE_FIELDS_POLICY = """\
version: 1
tenant: eq-create
default: allow
rules:
  - {id: no-setid, effect: deny, ops: [CREATE], when: {mode_any: [setuid]}, errno: EPERM}
  - {id: setgid-watch, effect: deny, ops: [CREATE], when: {mode_any: [setgid], gid: [0]}, errno: 300}
  - {id: guests-only, effect: deny, ops: [CREATE], paths: ["/dir/**", "/sub/**", "/a/**"],
     unless: {uid: [1000]}, errno: EROFS}
  - {id: exclusive, effect: deny, ops: [CREATE], paths: ["**/n2"], when: {flags_none: [O_EXCL]},
     errno: EEXIST}
  - {id: no-truncating-root, effect: deny, ops: [CREATE], when: {flags_any: [O_TRUNC], uid: [0]},
     errno: ETXTBSY}
  - {id: regular, effect: deny, ops: [CREATE], paths: ["/b/**"], unless: {mode_none: ["0077"]}, errno: 200}
  - {id: sticky-chmod, effect: deny, ops: [chmod], when: {mode_any: [sticky, setuid]}, errno: EPERM}
  - {id: keep, effect: deny, ops: [remove], paths: ["**/with space", "/dir"], errno: EBUSY}
  - {id: times, effect: deny, ops: [utime], paths: ["**/-x", "/b/**"], errno: ENOSYS}
  - {id: links, effect: deny, ops: [readlink], paths: ["**/..."], errno: 200}
"""

GUEST_CREATE_POLICY = """\
version: 1
tenant: eq-guest
default: deny
rules:
  - {id: tree, effect: allow, ops: [all], paths: ["/**"], except: ["/dir/**", "/sub/**"]}
  - {id: there, effect: allow, ops: [read, attr, delete], paths: ["/dir/**", "/sub/**"]}
  - {id: guest-creates, effect: allow, ops: [CREATE, mkdir], paths: ["/dir/**", "/sub/**"],
     when: {uid: [1000], gid: [1000]}}
  - {id: no-world, effect: deny, ops: [CREATE], when: {mode_any: [ow, setgid]}, errno: EPERM}
"""


@pytest.fixture(scope="module")
def mutation_policies(policies: dict[str, Policy]) -> dict[str, Policy]:
    return {
        **policies,
        "create-fields": load_policy_bytes(CREATE_FIELDS_POLICY.encode(), "create-fields.yaml"),
        "guest-create": load_policy_bytes(GUEST_CREATE_POLICY.encode(), "guest-create.yaml"),
    }


@st.composite
def mutation_trees(draw: st.DrawFn) -> list[Node]:
    """trees(), some of whose directories are setgid (a CREATE in one by another group drops S_ISGID)."""
    nodes = draw(trees())
    return [
        replace(n, mode=0o2775) if n.kind == "dir" and draw(st.booleans(), label=f"setgid {n.path!r}") else n
        for n in nodes
    ]


def mutation_pool(nodes: list[Node]) -> list[bytes]:
    """path_pool(), and new names in every directory (the root, through links to directories too)."""
    pool = path_pool(nodes)
    dirs = [b"/", *(n.path for n in nodes if n.kind == "dir" or n.leads_to is not None)]
    pool += [join(d, name) for d in dirs for name in NEW_NAMES[:2]]
    pool += [join(dirs[-1], NEW_NAMES[2]), b"/new/n2"]
    return pool


def mutation_requests(pool: list[bytes]) -> st.SearchStrategy[p.Request]:
    # Weighted towards names of printable ASCII (the ones the compiled loop may serve).
    plain = [q for q in pool if all(b in _PLAIN for b in q)] or pool
    path = weighted((st.sampled_from(plain), 2), (paths(pool), 2))
    ids = st.sampled_from(M_IDS)
    sec, nsec = st.sampled_from(M_SECONDS), st.sampled_from(M_NSECONDS)
    # CREATE mostly of names not there yet (the ones the compiled loop serves).
    dirs = sorted({posixpath.dirname(q) for q in plain})
    fresh = st.builds(join, st.sampled_from(dirs), st.sampled_from([b"c%d" % k for k in range(6)]))
    modes = st.sampled_from(M_CREATE_MODES)
    flags = st.sampled_from(M_CREATE_FLAGS)
    create = st.builds(p.Create, weighted((fresh, 2), (path, 2)), flags, modes, ids, ids)
    served_in_c = weighted(
        (create, 5),
        (st.builds(p.Remove, path), 3),
        (st.builds(p.Chmod, path, st.sampled_from(M_CHMOD_MODES)), 2),
        (st.builds(p.Utime, path, sec, nsec, sec, nsec), 2),
        (st.builds(p.Readlink, path, st.sampled_from(M_READLINK_SIZES)), 1),
        (st.builds(p.Open, path, st.sampled_from(M_OPEN_FLAGS)), 3),
        (st.builds(p.Lstat, path), 2),
    )  # fmt: skip
    pipeline = weighted(*((m, 1) for m in [
        st.builds(lambda u, q, m: p.Mkdir(u, u, q, m), st.sampled_from([0, GUEST]), path,
                  st.sampled_from([0o755, 0o700, 0o2777])),
        st.builds(lambda u, t, q: p.Symlink(u, u, t, q), st.sampled_from([0, GUEST]),
                  st.sampled_from(TARGETS), path),
        st.builds(p.Rename, path, path),
        st.builds(p.Link, path, path),
    ]))  # fmt: skip
    return weighted((served_in_c, 4), (pipeline, 1))


@dataclass
class Batch:
    requests: list[p.Request]
    how: str = "qemu"


def mutation_plans(pool: list[bytes]) -> st.SearchStrategy[list[Batch]]:
    request = mutation_requests(pool)
    one = st.builds(lambda r, h: Batch([r], h), request, st.sampled_from(["qemu", "qemu", "qemu", *FRAMES]))
    burst = st.builds(Batch, st.lists(request, min_size=2, max_size=4))  # pipelined in one write
    return st.lists(weighted((one, 5), (burst, 1)), min_size=5, max_size=60 if LONG else 25)


# What the compiled loop serves itself, predicted from the request and the tree before it (fastloop.pyx:
# _canonical, _parent, the forms of _serve_fast) for a policy none of whose rules needs the object.
_C_TYPES = frozenset(_t for _t in p.RequestType if _t.name in (
    "OPEN", "CREATE", "LSTAT", "READLINK", "STATFS", "CHMOD", "UTIME", "REMOVE", "GETVERSION"))  # fmt: skip
_FOLLOWED = frozenset({p.RequestType.STATFS, p.RequestType.GETVERSION, p.RequestType.CHMOD,
                       p.RequestType.OPEN})  # fmt: skip
_PLAIN = frozenset(range(0x20, 0x7F)) - {0x22, 0x5C}


def _walk(root: bytes, comps: list[bytes], last_dir: bool) -> str:
    """openat2(RESOLVE_NO_SYMLINKS) of comps beneath root: 'ok', 'stop' (ENOENT or ENOTDIR: answered
    there) or 'other' (a symlink on the way, ELOOP, or any other error: handed over)."""
    here = root
    for k, comp in enumerate(comps):
        try:
            st_ = os.lstat(here + b"/" + comp)
        except (FileNotFoundError, NotADirectoryError):
            return "stop"
        except OSError:
            return "other"
        if stat.S_ISLNK(st_.st_mode):
            return "other"
        if not stat.S_ISDIR(st_.st_mode) and (k < len(comps) - 1 or last_dir):
            return "stop"
        here += b"/" + comp
    return "ok"


def served_in_c(request: p.Request, export: str) -> bool | None:
    """Whether the compiled loop serves request itself on export as it is now; None: cannot tell (a
    path long enough that the trail's reserved room may decide, or a NUL inside)."""
    t = request.type
    if t not in _C_TYPES:
        return False
    path = request.path  # type: ignore[attr-defined]
    if b"\0" in path or len(path) > 512:
        return None
    comps = [c for c in path.split(b"/") if c]
    if (not comps or path.endswith(b"/") or any(c in (b".", b"..") for c in comps)
            or any(b not in _PLAIN for b in path)):  # fmt: skip
        return False
    flags = getattr(request, "flags", 0)
    if t is p.RequestType.OPEN and flags & (os.O_CREAT | os.O_NOFOLLOW):
        return False
    if t is p.RequestType.CREATE and (
        not flags & os.O_CREAT or flags & (os.O_DIRECTORY | (os.O_TMPFILE & ~os.O_DIRECTORY))
        or 0xFFFFFFFF in (request.uid, request.gid)  # type: ignore[attr-defined]
    ):  # fmt: skip
        return False
    if t is p.RequestType.UTIME and request.atime_nsec == request.mtime_nsec == UTIME_OMIT:  # type: ignore[attr-defined]
        return False  # utimensat would answer 0 before looking at the name: the pipeline's answer
    root = os.fsencode(export)
    if t in _FOLLOWED:
        return _walk(root, comps, last_dir=False) != "other"
    parent = _walk(root, comps[:-1], last_dir=True)
    if parent == "other":
        return False
    if t is p.RequestType.CREATE:
        if parent == "stop":
            return False
        try:
            os.lstat(root + b"/" + b"/".join(comps))
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return False  # it exists: the pipeline's rules for an existing object
    return True


def fd_attrs(fd: int) -> tuple[int, ...]:
    """An fd received from one of two copies of a tree: what it is, never which inode it is."""
    st_ = os.fstat(fd)
    return (st_.st_mode, st_.st_size, st_.st_uid, st_.st_gid, fcntl.fcntl(fd, fcntl.F_GETFL))


def fd_kind(fd: int) -> tuple[int, ...]:
    """fd_attrs for an fd of a burst: the requests after it may already have changed its mode and size
    (a CHMOD, a CREATE in the directory it is) by the time it is looked at, so only its type, owner,
    group and flags."""
    st_ = os.fstat(fd)
    return (stat.S_IFMT(st_.st_mode), st_.st_uid, st_.st_gid, fcntl.fcntl(fd, fcntl.F_GETFL))


def _explicit(ns: int, since: float) -> bool:
    """A time a UTIME set (not the time of a change during the run, nor one UTIME_NOW set)."""
    return not since - 60 <= ns / 1e9 <= time.time() + 3600


def comparable_answer(request: p.Request, answer: Answer, since: float) -> Answer:
    """An LSTAT's reply without what two copies of a tree differ in (device, inode, ctime, and the times
    of changes made during the run); any other reply as it is."""
    raw = answer.raw
    if request.type is not p.RequestType.LSTAT or len(raw) != 8 + 116 or raw[:4] != b"\0\0\0\0":
        return answer
    f = list(p._STAT.unpack_from(raw, 8))
    f[0] = f[1] = 0  # st_dev, st_ino
    for at in (10, 12):  # atime, mtime
        signed = f[at] - (1 << 64) if f[at] >= 1 << 63 else f[at]
        if not _explicit(signed * 1_000_000_000 + f[at + 1], since):
            f[at] = f[at + 1] = 0
    f[14] = f[15] = 0  # ctime
    return Answer(raw[:8] + p._STAT.pack(*f), answer.fd)


def tree_state(export: str, since: float) -> dict[bytes, dict[str, Any]]:
    """Every name of the tree (the root included) and what it is, without what two copies differ in."""
    root = os.fsencode(export)
    out: dict[bytes, dict[str, Any]] = {}
    for here, dirs, files in os.walk(root):  # never into a symlink
        for name in [b".", *dirs, *files] if here == root else [*dirs, *files]:
            host = here if name == b"." else os.path.join(here, name)
            st_ = os.lstat(host)
            entry: dict[str, Any] = {"mode": f"{st_.st_mode:o}", "uid": st_.st_uid, "gid": st_.st_gid,
                                     "size": st_.st_size, "nlink": st_.st_nlink}  # fmt: skip
            if stat.S_ISLNK(st_.st_mode):
                entry["target"] = os.readlink(host)
            for what in ("atime", "mtime"):
                ns = getattr(st_, f"st_{what}_ns")
                if _explicit(ns, since):
                    entry[what] = ns
            out[host[len(root) :] or b"/"] = entry
    return out


@dataclass
class MutationTotals:
    examples: int = 0
    served: int = 0
    handed: int = 0
    requests: int = 0
    predicted: dict[str, int] = field(default_factory=dict)  # per type: requests predicted served in C


MTOTALS = MutationTotals()

MUTATION_SETTINGS = settings(SETTINGS, max_examples=1500 if LONG else 250)


def run_mutation_example(
    fs: dict[str, str], policy: Policy, predictable: bool, nodes: list[Node], where: str, plan: list[Batch]
) -> None:  # fmt: skip
    base = tempfile.mkdtemp(prefix="mut-", dir=fs[where])
    trails = tempfile.mkdtemp(prefix="mut-", dir=fs["trails"])
    peers: list[Peer] = []
    try:
        since = time.time()
        exports = {}
        for name in ("compiled", "pipeline"):
            exports[name] = os.path.join(base, name)
            build(exports[name], nodes)
        compiled = Peer(exports["compiled"], os.path.join(trails, "compiled.jsonl"), policy, compiled=True)
        peers.append(compiled)
        pipeline = Peer(exports["pipeline"], os.path.join(trails, "pipeline.jsonl"), policy, compiled=False)
        peers.append(pipeline)
        sure = maybe = 0
        predicted: dict[str, int] = {}
        for i, batch in enumerate(plan):
            guess: bool | None = None
            if predictable and len(batch.requests) == 1:
                guess = served_in_c(batch.requests[0], exports["compiled"])
            if guess is None:
                maybe += sum(r.type in _C_TYPES for r in batch.requests)
            elif guess:
                sure += 1
                predicted[batch.requests[0].type.name] = predicted.get(batch.requests[0].type.name, 0) + 1
            got: dict[str, list[Answer]] = {}
            for peer in (compiled, pipeline) if i % 2 == 0 else (pipeline, compiled):
                peer.send(b"".join(frame(r, batch.how) for r in batch.requests))
                seen_as = fd_attrs if len(batch.requests) == 1 else fd_kind
                got[peer.name] = [comparable_answer(r, read_answer(peer.sock, r.type, seen_as), since)
                                  for r in batch.requests]  # fmt: skip
            for k, request in enumerate(batch.requests):
                a, b = got["compiled"][k], got["pipeline"][k]
                c = "" if guess is None else (" (served in C)" if guess else " (handed over)")
                note(f"{i}: {request!r} ({batch.how}){c} -> compiled {describe(a)}, pipeline {describe(b)}")
                assert a == b, f"step {i}: {request!r} ({batch.how}): compiled {a}, pipeline {b}"
        ended = {peer.name: peer.close() for peer in peers}
        MTOTALS.served += ended["compiled"].served
        MTOTALS.handed += ended["compiled"].handed
        MTOTALS.requests += sum(len(b.requests) for b in plan)
        for name, n in predicted.items():
            MTOTALS.predicted[name] = MTOTALS.predicted.get(name, 0) + n
        assert ended["pipeline"].served == 0
        assert sure <= ended["compiled"].served <= sure + maybe, (
            f"{sure} requests predicted served in C, {maybe} unknown: {ended['compiled']}"
        )
        a_records = records(compiled.trail)  # type: ignore[arg-type]
        b_records = records(pipeline.trail)  # type: ignore[arg-type]
        assert len(a_records) == len(b_records), f"{len(a_records)} records, {len(b_records)}"
        for n, (a, b) in enumerate(zip(a_records, b_records, strict=True)):
            assert comparable(a) == comparable(b), f"record {n} differs:\ncompiled {a}\npipeline {b}"
        for peer in peers:
            assert_intact(peer.trail)  # type: ignore[arg-type]
        a_tree, b_tree = tree_state(exports["compiled"], since), tree_state(exports["pipeline"], since)
        differ = {k: (a_tree.get(k), b_tree.get(k)) for k in a_tree.keys() | b_tree.keys()
                  if a_tree.get(k) != b_tree.get(k)}  # fmt: skip
        assert not differ, f"the trees differ (compiled, pipeline): {differ}"
    finally:
        for peer in peers:
            with contextlib.suppress(Exception):
                peer.close()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(trails, ignore_errors=True)


@st.composite
def mutation_examples(draw: st.DrawFn) -> tuple[str, str, list[Node], list[Batch]]:
    where = draw(st.sampled_from(["tmpfs", "ext4"]), label="file system")
    policy = draw(st.sampled_from(["allow-all", "paths", "permissive", "object", "create-fields",
                                   "guest-create"]), label="policy")  # fmt: skip
    nodes = draw(mutation_trees(), label="tree")
    plan = draw(mutation_plans(mutation_pool(nodes)), label="steps")
    return where, policy, nodes, plan


_MUTATION_POLICIES: dict[str, Policy] = {}  # set by the test (a failure's report then names no Policy)


@MUTATION_SETTINGS
@given(example=mutation_examples())
def _mutation_property(example: tuple[str, str, list[Node], list[Batch]], fs: dict[str, str]) -> None:
    where, policy, nodes, plan = example
    MTOTALS.examples += 1
    # No rule but the object policy's needs the object: what the compiled loop serves follows from the
    # request and the tree.
    run_mutation_example(fs, _MUTATION_POLICIES[policy], policy != "object", nodes, where, plan)


if SEED is not None:
    seed(int(SEED))(_mutation_property)


def test_compiled_and_pipeline_mutate_alike(
    filesystems: dict[str, str], mutation_policies: dict[str, Policy]
) -> None:
    before = MutationTotals(**{**vars(MTOTALS), "predicted": dict(MTOTALS.predicted)})
    _MUTATION_POLICIES.update(mutation_policies)
    _mutation_property(fs=filesystems)
    assert MTOTALS.examples > before.examples
    assert MTOTALS.served > before.served, "the compiled loop served nothing itself: nothing compared"
    assert MTOTALS.handed > before.handed
    # Each request type served in C was served in C, and compared, a good number of times.
    got = {k: n - before.predicted.get(k, 0) for k, n in MTOTALS.predicted.items()}
    for name in ("CREATE", "REMOVE", "CHMOD", "UTIME", "READLINK", "OPEN", "LSTAT"):
        assert got.get(name, 0) >= 10, f"{name} served in C only {got.get(name, 0)} times: {got}"


# Found by the property above: a UTIME that changes neither time (UTIME_OMIT twice) of a name that is
# not there. The kernel's utimensat returns 0 for it before it looks at the path ("nothing to do, we must
# not even check the path"); the pipeline resolves the object first and answers ENOENT (ENAMETOOLONG for a
# name over NAME_MAX), while the compiled loop, acting by name, answered 0. It now hands such a UTIME to
# the pipeline, whatever the path.
UTIME_OMIT_BOTH = {
    "a missing name": b"/d/missing",
    "a missing name in the root": b"/missing",
    "a name over NAME_MAX": b"/d/" + b"c" * 256,
    "an existing file": b"/d/f",
    "a missing parent": b"/nope/x",
}


@pytest.mark.parametrize("name", list(UTIME_OMIT_BOTH))
def test_utime_omitting_both_times(
    name: str, filesystems: dict[str, str], policies: dict[str, Policy]
) -> None:
    request = p.Utime(UTIME_OMIT_BOTH[name], 0, UTIME_OMIT, 0, UTIME_OMIT)
    s = session(filesystems, policies["allow-all"], [(frame(request, "qemu"), request.type)])
    assert (s.ended["compiled"].served, s.ended["compiled"].handed) == (0, 1), s.ended["compiled"]
    assert_alike(s)


def test_an_idle_compiled_loop_wakes_to_write_a_due_checkpoint(
    filesystems: dict[str, str], policies: dict[str, Policy]
) -> None:
    """Checkpoints every T seconds also while nothing comes: the loop waits with a receive timeout of T
    and, woken, writes the checkpoint that has come due (the records served in C before the pause are
    sealed without waiting for the next request or the stop); nothing is written when nothing is new."""
    base = tempfile.mkdtemp(prefix="idle-", dir=filesystems["tmpfs"])
    export = os.path.join(base, "export")
    build(export, GUARD_TREE)
    trail = os.path.join(base, "trail.jsonl")
    try:
        peer = Peer(export, trail, policies["allow-all"], compiled=True, start=True, checkpoint_seconds=0.3)
        try:
            for _ in range(5):
                peer.call(frame(p.Lstat(b"/d/f"), "qemu"), p.RequestType.LSTAT)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and not any(
                r["event"] == "checkpoint" for r in records(trail, checkpoints=True)
            ):
                time.sleep(0.05)
            time.sleep(1.0)  # idle on: no second checkpoint, nothing new to seal
            found = records(trail, checkpoints=True)
            cps = [r for r in found if r["event"] == "checkpoint"]
            assert len(cps) == 1, cps
            assert cps[0]["last"] == found[-2]["seq"] and found[-2]["op"] == "lstat" and "final" not in cps[0]
            peer.call(frame(p.Lstat(b"/d/f"), "qemu"), p.RequestType.LSTAT)
        finally:
            ended = peer.close()
        assert ended.served >= 6, ended
        whole = records(trail, checkpoints=True)
        assert whole[-1]["event"] == "checkpoint" and whole[-1]["final"] is True
        assert_intact(trail)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Variables in paths (issue 15): a rule with ${uid} makes the decision one of the request's uid, which the
# table's key holds (CREATE's fixed fields); ${owner} and `owner: self` need the object, so the request is
# handed over.

VARS_POLICY = """\
version: 1
tenant: eq-vars
default: allow
vars: {top: /v}
rules:
  - {id: own-name, effect: deny, ops: [CREATE], paths: ["${top}/u${uid}"], errno: EPERM}
  - {id: others, effect: deny, ops: [CREATE], paths: ["${top}/**"], except: ["${top}/u${uid}/**"],
     errno: EROFS}
  - {id: by-group, effect: deny, ops: [CREATE], paths: ["/g${gid}/**"], errno: ENOSPC}
  - {id: foreign, effect: deny, ops: [lstat], paths: ["/v/**"], except: ["/v/u${owner}/**"], errno: EPERM}
  - {id: mine, effect: deny, ops: [CREATE], paths: ["/v/u1000/**"], when: {object: {owner: self}},
     errno: EEXIST}
"""
VARS_TREE = [
    Node("dir", b"/v"),
    Node("dir", b"/v/u1000", owner=GUEST),
    Node("file", b"/v/u1000/f", owner=GUEST),
    Node("file", b"/v/u1000/root"),
    Node("dir", b"/g0"),
]


def test_variables_in_paths_decide_alike_compiled_and_pipeline(filesystems: dict[str, str]) -> None:
    policy = load_policy_bytes(VARS_POLICY.encode(), "vars.yaml")
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
    requests = [
        # the same path and flags, by one uid then another and back: a key without the uid would answer
        # the second from the first
        p.Create(b"/v/u0", flags, 0o644, 0, 0),
        p.Create(b"/v/u0", flags, 0o644, GUEST, GUEST),
        p.Create(b"/v/u0", flags, 0o644, 0, 0),
        p.Create(b"/v/u1000", flags, 0o644, GUEST, GUEST),
        p.Create(b"/v/u1000", flags, 0o644, 0, 0),
        p.Create(b"/g0/x", flags, 0o644, GUEST, 0),
        p.Create(b"/g1000/x", flags, 0o644, GUEST, GUEST),  # (no /g1000: denied all the same)
        # ${owner}: the object decides, so the pipeline does
        p.Lstat(b"/v/u1000/f"),
        p.Lstat(b"/v/u1000/root"),
        p.Lstat(b"/v/u1000"),
        # owner: self: a CREATE of an existing name is the pipeline's anyway
        p.Create(b"/v/u1000/f", os.O_CREAT | os.O_RDWR, 0o644, GUEST, GUEST),
    ]
    s = session(filesystems, policy, [(frame(r, "qemu"), r.type) for r in requests], nodes=VARS_TREE)
    assert s.ended["compiled"].served >= 4, s.ended["compiled"]  # the CREATEs of new names it may serve
    assert s.ended["compiled"].handed >= 3, s.ended["compiled"]
    got = [(r.get("op"), r.get("uid"), r.get("decision"), r.get("rule")) for r in s.records["pipeline"]
           if r.get("event") == "request"]
    assert got[:7] == [
        ("create", 0, "deny", "own-name"), ("create", GUEST, "deny", "others"),
        ("create", 0, "deny", "own-name"), ("create", GUEST, "deny", "own-name"),
        ("create", 0, "deny", "others"),
        ("create", GUEST, "deny", "by-group"), ("create", GUEST, "deny", "by-group"),
    ], got  # (nothing allowed: the two servers share the export, and a create would change it)
    assert [g[2:] for g in got[7:]] == [("allow", None), ("deny", "foreign"), ("allow", None),
                                        ("deny", "mine")], got
    assert_alike(s)
