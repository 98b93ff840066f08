"""A stateful property test of the alias semantics (issue 9): a hostile guest runs random sequences of
requests, and after every step the host checks that no deny rule was bypassed.

The gateway is driven in-process: ``Executor.for_directory(export)`` and a ``Server`` over a
``socket.socketpair()``, each step a call to ``Server.handle(request)``. That is the whole request path
after the wire (resolve once, decide on what was reached, perform on the same fds) at a few hundred
microseconds a step; a gateway subprocess costs a process start per example and a round trip per step,
which would make the thousands of CI steps take minutes. The wire has its own tests (test_protocol,
test_integration, test_confinement); what this test attacks is the resolver and the rules.

Each example gets a fresh export (``tempfile.mkdtemp``: pytest's tmp_path is per test, not per example)
holding a small host-made tree::

    /cache/                      guest-writable
    /cache/repo/.git/hooks/      protected: deny [write] on **/.git/hooks/**
    /cache/tohooks -> repo/.git/hooks, /cache/tosecret -> /secret          (host-made links)
    /secret/                     deny [all] on /secret/**, a file with a distinctive xattr
    /home/alice/                 guest-writable
    /home/alice/private/         deny [write] on /home/alice/private/**
    /home/alice/toprivate -> private, /home/alice/tosecret -> ../../secret/file
    /pub/                        allow [read] only

and the policy: default deny; allow [all] on /cache/** and /home/alice/**; allow [read] on /pub/**; the
three denies above.

The guest's steps: mkdir, symlink (relative, absolute, '..', chains, into /secret and the hooks, dangling),
rename and link (of files, directories and links, into and out of protected places, over existing
things), CREATE and OPEN with O_CREAT (through links too) followed by a write of a marker unique to the
request, remove, an attribute step (chmod, chown, utime, truncate, lsetxattr/lremovexattr of user.* and
trusted.*) and a read step (OPEN for reading, lstat, readlink, lgetxattr, llistxattr). Each path is
drawn from what the guest named last, the writable trees, the protected places and the host's links, or
anything that exists, and sent with and without a trailing slash, '//', '/./', 'x/..', a '..' out of
another tree, or no leading slash.

How the steps are drawn matters more than how many there are: an alias attack is three to five requests
on the same few names (build a tree, give it a second name, move that name into place), and uniformly
drawn single steps meet such a sequence about once in millions of steps. Three things make them meet:
paths come mostly from what the guest named last; each example uses only a few of the new names and path
pools (swarm testing; Hypothesis does the same with the rules themselves); and one composite step,
``alias_into_place``, draws the whole shape of issue 9's finding 4 at once (what to build, the alias:
symlink, rename of the directory, rename or link of a symlink to it, relative or absolute, and where to).

The invariant, checked by the host after every request (inside the composite step too):

1. Nothing the guest wrote is reachable at a path a deny-write rule covers (**/.git/hooks/**,
   /home/alice/private/**, /secret/**). The host walks the real export, following symlinks as a host
   process would (resolved here, independently of the gateway: absolute targets from the export root,
   '..' physical and clamped at the root, at most 40 links), over every lexical path: the walk's state is
   (real directory, how far each deny glob has matched), so link cycles end and no path is missed. What
   the guest wrote: every inode that was not in the host's tree, and every host object whose content,
   mode, owner or xattrs the guest changed. Not tracked, as gateway/rules/aliases.py says a deny cannot
   promise it: content the guest copies after reading it (this guest never copies), and objects the host
   creates or moves (the tree above has no host-made alias from a protected path to a writable one).
2. No denied-read object was returned: no fd from OPEN/CREATE is of a /secret inode, no LSTAT reply
   carries a /secret inode's st_dev/st_ino, no lgetxattr/llistxattr/readlink reply shows /secret's
   distinctive xattr or link target.
3. Nothing outside the allowed trees changed: every object under /secret and /pub, the hooks directory
   and what it held, /home/alice/private and what it held, /home and the export root keep their mode,
   owner, link count, xattrs, content, mtime and ctime (and their place: the hooks tree may move only
   with a directory above it, and stays below a .git/hooks). The root's times and link count are the one
   exception, with its size (a directory's size counts its entries): /cache/** matches /cache itself, so
   removing, renaming and making /cache is allowed and changes them; instead its entries other than
   'cache' must stay exactly the same objects.

Runs: CI does 200 examples of up to 30 steps (about 8,000 requests, each followed by the host's check)
with a fixed seed (derandomize), in about 20 seconds. GATEWAY_PROPERTY_LONG=1 runs 1,000 examples of up
to 60 steps; GATEWAY_PROPERTY_SEED=N picks another fixed seed (a few long runs with different seeds cover
more than one). Exports go to /dev/shm when its tmpfs keeps user.* xattrs (a directory removal on a
journaled disk costs milliseconds, and every example removes its tree). A failure prints the minimal
step sequence and, with it, every request the gateway was sent and what it answered ("denied" when the
rules refused it). The explain phase is off: it reruns the failing examples under line tracing, which
takes minutes here.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass, field, replace

from helpers import require_root
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from gateway import protocol as p
from gateway.core.executor import Executor, Result
from gateway.rules import Policy, load_policy
from gateway.server import Server

POLICY = """\
version: 1
tenant: property
default: deny
rules:
  - {id: cache, effect: allow, ops: [all], paths: ["/cache/**"]}
  - {id: alice, effect: allow, ops: [all], paths: ["/home/alice/**"]}
  - {id: pub-read, effect: allow, ops: [read], paths: ["/pub/**"]}
  - {id: secret, effect: deny, ops: [all], paths: ["/secret/**"]}
  - {id: hooks, effect: deny, ops: [write], paths: ["**/.git/hooks/**"]}
  - {id: private, effect: deny, ops: [write], paths: ["/home/alice/private/**"]}
"""

DIRS = ["cache", "cache/repo", "cache/repo/.git", "cache/repo/.git/hooks", "secret", "secret/dir", "home",
        "home/alice", "home/alice/private", "pub"]
FILES = {
    "cache/note": b"host note\n",
    "cache/repo/.git/config": b"[core]\n",
    "cache/repo/.git/hooks/pre-commit": b"#!/bin/sh\nexit 0\n",
    "secret/file": b"SECRET-CONTENT\n",
    "secret/dir/inner": b"SECRET-INNER\n",
    "home/alice/notes": b"alice's notes\n",
    "home/alice/private/diary": b"dear diary\n",
    "pub/readme": b"public\n",
}
SECRET_XATTR = b"SECRET-XATTR-VALUE"
SECRET_TARGET = "SECRET-LINK-TARGET"
LINKS = {
    "cache/tohooks": "repo/.git/hooks",
    "cache/tosecret": "/secret",
    "home/alice/toprivate": "private",
    "home/alice/tosecret": "../../secret/file",
    "secret/link": SECRET_TARGET,
}
XATTRS = {  # (path, name, value) set by the host at setup
    ("secret/file", "user.secret", SECRET_XATTR),
    ("secret/file", "trusted.secret", SECRET_XATTR),
    ("cache/repo/.git/hooks/pre-commit", "user.host", b"host"),
    ("pub/readme", "user.pub", b"pub"),
    ("home/alice/private/diary", "user.host", b"host"),
}
# The objects that must not change (invariant 3): their trees, as host paths relative to the export.
FIXED_TREES = ("secret", "pub", "home/alice/private")  # at their place
FIXED_OBJECTS = ("", "home")  # the root (see the module docstring) and /home, at their place
HOOKS = "cache/repo/.git/hooks"  # may move with a directory above it, stays below a .git/hooks

MARK = b"GUESTMARK-"
NAMES = ["a", "b", "hooks", ".git", "private"]
SEGMENTS = [".", "..", "a", "hooks", ".git", "private", "secret", "cache", "repo"]
# The protected places, the host's links and their ways in: the paths drawn most often after the guest's.
KEY_PATHS = ["/cache/repo/.git/hooks", "/cache/repo/.git/hooks/pre-commit", "/cache/repo/.git", "/cache/repo",
             "/cache/tohooks", "/cache/tohooks/pre-commit", "/cache/tosecret", "/cache/tosecret/file",
             "/home/alice/private", "/home/alice/private/diary", "/home/alice/toprivate",
             "/home/alice/toprivate/diary", "/home/alice/tosecret", "/secret", "/secret/file", "/secret/dir",
             "/secret/link", "/pub/readme", "/", "/cache", "/home/alice", "/home", "/nothere"]
KEY_DIRS = ["/cache", "/home/alice", "/cache/repo", "/cache/repo/.git", "/cache/repo/.git/hooks",
            "/cache/tohooks", "/home/alice/private", "/home/alice/toprivate", "/cache/tosecret", "/secret",
            "/pub", "/"]
UIDS = [0, 1000]
CHOWN_IDS = [0, 1000, 4242, 0xFFFFFFFF]
MODES = [0o644, 0o755, 0o700, 0o777, 0o4755, 0o000]
GUEST_XATTRS = [b"user.g", b"trusted.g"]
ALL_XATTRS = [*GUEST_XATTRS, b"user.secret", b"trusted.secret", b"user.host", b"user.pub"]
POOLS = ["made", "writable", "key", "any"]  # where paths are drawn from (see AliasMachine.existing)
MAKERS = {p.RequestType.MKDIR, p.RequestType.SYMLINK, p.RequestType.CREATE, p.RequestType.OPEN,
          p.RequestType.RENAME, p.RequestType.LINK}
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
MAX_LINKS = 40

LONG = os.environ.get("GATEWAY_PROPERTY_LONG") == "1"
SEED = os.environ.get("GATEWAY_PROPERTY_SEED")


# ---------------------------------------------------------------------------------------------------------
# The host's view: a walk of the real export, and a resolver of its own.

Real = tuple[str, ...]  # a real location below the export root, as names, no symlink on the way
Ino = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class Attrs:
    """What invariant 3 compares and the taint check looks at."""

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime: int
    ctime: int
    content: str  # sha256 of a file, a link's target, '' for a directory
    xattrs: tuple[tuple[str, bytes], ...]

    def owned(self) -> tuple[object, ...]:
        """The parts only a write to the object itself changes (not its link count, its times, or a
        directory's size: a new entry is an object of its own)."""
        return (self.mode, self.uid, self.gid, self.content, self.xattrs)


def attrs_of(path: str, st_: os.stat_result) -> Attrs:
    if stat.S_ISREG(st_.st_mode):
        with open(path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(st_.st_mode):
        content = os.readlink(path)
    else:
        content = ""
    names = sorted(os.listxattr(path, follow_symlinks=False))
    xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    return Attrs(st_.st_mode, st_.st_uid, st_.st_gid, st_.st_nlink, st_.st_size, st_.st_mtime_ns,
                 st_.st_ctime_ns, content, xattrs)


@dataclass
class Tree:
    """Every name in the export (no link followed): inode -> the places it has, place -> lstat."""

    places: dict[Ino, list[Real]] = field(default_factory=dict)
    stats: dict[Real, os.stat_result] = field(default_factory=dict)
    children: dict[Real, list[str]] = field(default_factory=dict)  # the directories' entries


def walk_tree(export: str) -> Tree:
    tree = Tree()
    todo: list[Real] = [()]
    while todo:
        real = todo.pop()
        path = host_path(export, real)
        st_ = os.lstat(path)
        tree.stats[real] = st_
        tree.places.setdefault((st_.st_dev, st_.st_ino), []).append(real)
        if stat.S_ISDIR(st_.st_mode):
            names = tree.children[real] = sorted(os.listdir(path))
            todo.extend((*real, name) for name in names)
    return tree


class Snapshot:
    """The attributes of the objects as they are now, read once per check and only when asked for."""

    def __init__(self, export: str, tree: Tree) -> None:
        self.export = export
        self.tree = tree
        self._attrs: dict[Ino, Attrs] = {}

    def attrs(self, ino: Ino) -> Attrs:
        found = self._attrs.get(ino)
        if found is None:
            real = self.tree.places[ino][0]
            found = self._attrs[ino] = attrs_of(host_path(self.export, real), self.tree.stats[real])
        return found


def host_path(export: str, real: Real) -> str:
    return os.path.join(export, *real) if real else export


class HostResolver:
    """Follows symlinks within the export as a host process would with the export as its root: absolute
    targets start at the root, '..' goes to the physical parent and stops at the root, at most 40 links.
    Works on real locations only, so it never leaves the export."""

    def __init__(self, export: str, tree: Tree) -> None:
        self.export = export
        self.tree = tree

    def lstat(self, real: Real) -> os.stat_result | None:
        return self.tree.stats.get(real)

    def follow(self, real: Real) -> Real | None:
        """The real object at ``real`` with its own symlink (if it is one) followed; None: dangling, loop."""
        budget = [MAX_LINKS]
        return self._follow(real, budget)

    def _follow(self, real: Real, budget: list[int]) -> Real | None:
        st_ = self.lstat(real)
        if st_ is None:
            return None
        if not stat.S_ISLNK(st_.st_mode):
            return real
        budget[0] -= 1
        if budget[0] < 0:
            return None
        target = os.readlink(host_path(self.export, real))
        base: Real = () if target.startswith("/") else real[:-1]
        end = self._walk(base, target.split("/"), budget)
        if end is not None and target.endswith("/") and not self._is_dir(end):
            return None
        return end

    def _is_dir(self, real: Real) -> bool:
        st_ = self.lstat(real)
        return st_ is not None and stat.S_ISDIR(st_.st_mode)

    def _walk(self, cur: Real, comps: list[str], budget: list[int]) -> Real | None:
        names = [c for c in comps if c not in ("", ".")]
        for i, name in enumerate(names):
            if name == "..":
                cur = cur[:-1]
                continue
            nxt = self._follow((*cur, name), budget)
            if nxt is None:
                return None
            if i < len(names) - 1 and not self._is_dir(nxt):
                return None
            cur = nxt
        return cur


# How far a lexical path has gone into each deny-write glob. anchor: the path so far while it is a proper
# prefix of /secret or /home/alice/private, "in" at or below one of them, "out" otherwise; git: whether
# the last component was .git; hooks: at or below a .git/hooks.
ANCHORS = (("secret",), ("home", "alice", "private"))
GlobState = tuple[object, bool, bool]
START: GlobState = ((), False, False)


def step_state(state: GlobState, name: str) -> GlobState:
    anchor, git, hooks = state
    if isinstance(anchor, tuple):
        longer = (*anchor, name)
        if longer in ANCHORS:
            anchor = "in"
        elif any(a[: len(longer)] == longer for a in ANCHORS):
            anchor = longer
        else:
            anchor = "out"
    return anchor, name == ".git", hooks or (git and name == "hooks")


def covered(state: GlobState) -> bool:
    return state[0] == "in" or state[2]


# ---------------------------------------------------------------------------------------------------------
# Guest-side path forms.


@functools.cache
def writable(path: str) -> bool:
    """Whether the policy lets the guest write at this path, as it reads (links not followed)."""
    state = START
    for name in path.strip("/").split("/"):
        state = step_state(state, name)
    return path.startswith(("/cache", "/home/alice")) and not covered(state)


def relpath(target: str, start: str) -> str:
    return os.path.relpath(target, start) if target != start else "."


class AliasMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cwd = os.getcwd()
        self.base = tempfile.mkdtemp(prefix="gateway-prop-", dir=scratch_dir())
        self.export = os.path.join(self.base, "export")
        build_export(self.export)
        self.policy = the_policy()
        self.executor = Executor.for_directory(self.export)
        self.socks = socket.socketpair()
        self.server = Server(self.socks[0], self.executor, self.policy)
        self.log: list[str] = []
        self.made: list[str] = []  # what the guest named last (lexically normalised)
        self.made_dirs: list[str] = []
        self.names = NAMES
        self.weights = ["made", "writable", "made", "writable", "key", "any"]
        self.step = 0
        self.internal_errors: list[str] = []
        self._handler = _ErrorCatcher(self.internal_errors)
        logging.getLogger("gateway").addHandler(self._handler)
        tree = walk_tree(self.export)
        setup = Snapshot(self.export, tree)
        self.setup_attrs = {ino: setup.attrs(ino) for ino in tree.places}  # every host object, as made
        self.host = set(self.setup_attrs)  # the host objects still there
        self.tainted: set[Ino] = set()  # host objects the guest wrote
        self.checked_step = -1
        self.secret_inodes = {ino for ino, places in tree.places.items() if places[0][:1] == ("secret",)}
        self.fixed: dict[Ino, Real] = {}  # protected object -> its place (the hooks tree may move)
        self.hooks_tree: set[Ino] = set()
        for ino, places in tree.places.items():
            real = places[0]
            if real in [tuple(o.split("/")) if o else () for o in FIXED_OBJECTS] or any(
                real[: len(t.split("/"))] == tuple(t.split("/")) for t in FIXED_TREES
            ):
                self.fixed[ino] = real
            if real[:4] == tuple(HOOKS.split("/")):
                self.hooks_tree.add(ino)
        self.root_entries = {n: ino for n, ino in self._root_entries(tree).items() if n != "cache"}
        self.refresh(tree)
        STATS.examples += 1

    def teardown(self) -> None:
        logging.getLogger("gateway").removeHandler(self._handler)
        for s in self.socks:
            s.close()
        os.close(self.executor.root_fd)
        os.close(self.executor.proc_fd)
        os.chdir(self.cwd)  # the executor fchdir()s into /proc/self/fd for the xattr calls
        shutil.rmtree(self.base)

    @initialize(data=st.data())
    def swarm(self, data: st.DataObject) -> None:
        """Swarm testing: each example names new things from a few of the names only, and draws paths
        from some of the pools only, so that the few steps an alias attack takes meet more often."""
        self.names = data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True),
                               label="names")
        pools = data.draw(st.lists(st.sampled_from(POOLS), min_size=1, max_size=3), label="pools")
        self.weights = ["made", *pools]

    # -- the pool of paths the guest names ------------------------------------------------------------

    def refresh(self, tree: Tree) -> None:
        """The pools of paths, from the tree as it is now (the next draw rebuilds them)."""
        self.tree = tree
        self.stale = True

    def pools(self) -> None:
        if not self.stale:
            return
        self.stale = False
        tree = self.tree
        resolver = HostResolver(self.export, tree)
        self.paths = sorted({"/" + "/".join(real) for real in tree.stats if real} | set(KEY_PATHS))
        dirs = {"/"}
        for real in tree.stats:
            end = resolver.follow(real)
            if real and end is not None and resolver._is_dir(end):
                dirs.add("/" + "/".join(real))
        self.dirs = sorted(dirs)
        self.writable = [path for path in self.paths if writable(path)]
        self.writable_dirs = [path for path in self.dirs if writable(path)]
        self.made = [m for m in self.made if m in self.paths][-6:]
        self.made_dirs = [m for m in self.made if m in dirs]

    # Where a path comes from: mostly what the guest named last (an alias attack is a few steps on the
    # same few names) or the writable trees, sometimes the protected places and the host's links (the
    # attacks), sometimes anything that exists. Most requests must be allowed for the tree to grow.
    def existing(self, data: st.DataObject) -> str:
        self.pools()
        pools = {"made": self.made, "writable": self.writable, "key": KEY_PATHS, "any": self.paths}
        choice = data.draw(st.sampled_from([n for n in self.weights if pools[n]] or ["any"]), label="from")
        return data.draw(st.sampled_from(pools[choice]), label="path")

    def new_name(self, data: st.DataObject) -> str:
        self.pools()
        pools = {"made": self.made_dirs, "writable": self.writable_dirs, "key": KEY_DIRS, "any": self.dirs}
        choice = data.draw(st.sampled_from([n for n in self.weights if pools[n]] or ["any"]), label="in")
        parent = data.draw(st.sampled_from(pools[choice]), label="parent")
        name = data.draw(st.sampled_from(self.names), label="name")
        return (parent.rstrip("/") + "/" + name) if parent != "/" else "/" + name

    def some_path(self, data: st.DataObject) -> str:
        """A path that exists, or a new name in a directory that does."""
        path = self.new_name(data) if data.draw(st.booleans(), label="new") else self.existing(data)
        return self.mangle(data, path)

    def mangle(self, data: st.DataObject, path: str) -> str:
        kind = data.draw(st.sampled_from(["plain"] * 5 + ["slash", "double", "dot", "dotdot", "up",
                                                          "relative"]), label="form")
        comps = [c for c in path.split("/") if c]
        if kind == "plain" or not comps:
            return path
        if kind == "slash":
            return path.rstrip("/") + "/"
        if kind == "relative":
            return "/".join(comps)
        i = data.draw(st.integers(0, len(comps) - 1), label="at")
        head, tail = comps[:i], comps[i:]
        if kind == "double":
            return "/" + "/".join(head) + ("//" if head else "/") + "/".join(tail)
        if kind == "dot":
            return "/" + "/".join([*head, ".", *tail])
        if kind == "dotdot":  # go into the next component and come back: /a/b/../b/c
            return "/" + "/".join([*head, tail[0], "..", *tail])
        # up: come back into this place from another top-level tree, walking out of it with '..'
        other = data.draw(st.sampled_from(["cache", "secret", "home/alice", "nothere"]), label="via")
        return "/" + "/".join([*other.split("/"), *[".."] * len(other.split("/")), *comps])

    def target(self, data: st.DataObject, link: str) -> str:
        """A symlink target: relative to the link's directory (with '..') or absolute, of something that
        exists (a link too: a chain), into /secret or the hooks, composed of segments, or dangling."""
        kind = data.draw(st.sampled_from(["relative", "composed", "absolute", "dangling"]), label="target")
        parent = os.path.dirname("/" + link.strip("/")) or "/"
        if kind == "relative":
            t = relpath(self.existing(data), parent)
        elif kind == "composed":
            t = "/".join(data.draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3), label="segs"))
        elif kind == "absolute":
            t = self.existing(data)
        else:
            t = data.draw(st.sampled_from(["nothere", "../nothere/x", "/cache/nothere", "/secret/nothere"]),
                          label="dangling")
        if data.draw(st.integers(0, 4), label="target-slash") == 0 and not t.endswith("/"):
            t += "/"
        return t

    # -- sending requests -----------------------------------------------------------------------------

    def send(self, request: p.Request) -> Result:
        self.step += 1
        STATS.steps += 1
        denied = self.server.stats.denied
        result = self.server.handle(request)
        code = result.errno
        answer = "ok" if not code else errno.errorcode.get(code, str(code))
        if self.server.stats.denied != denied:
            answer = f"denied ({answer})"
        self.log.append(f"{self.step:3}. {request!r} -> {answer}")
        if not code and request.type in MAKERS and getattr(request, "flags", os.O_CREAT) & os.O_CREAT:
            two = request.type in (p.RequestType.RENAME, p.RequestType.LINK)
            made = request.path2 if two else request.path  # type: ignore[union-attr]
            self.made.append(os.path.normpath("/" + os.fsdecode(made)))
        if result.fd is not None:
            try:
                st_ = os.fstat(result.fd)
                self.check((st_.st_dev, st_.st_ino) not in self.secret_inodes,
                           f"{request.type.name} returned an fd of a /secret object (inode {st_.st_ino})")
                if request.flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):  # type: ignore[union-attr]
                    mark = MARK + b"%d\n" % self.step
                    os.write(result.fd, mark)
                    self.log[-1] += f", wrote {mark!r}"
            finally:
                os.close(result.fd)
                result.fd = None
        self.check_all()
        return result

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            raise AssertionError(f"bypass: {what}\nrequests sent in this example:\n" + "\n".join(self.log))

    # -- the guest's steps ----------------------------------------------------------------------------
    # The steps that make names (where aliases come from) are rules of their own; the attribute changes
    # and the reads are one rule each, so that they do not crowd the name steps out.

    @rule(data=st.data())
    def mkdir(self, data: st.DataObject) -> None:
        path = self.mangle(data, self.new_name(data))
        uid = data.draw(st.sampled_from(UIDS), label="uid")
        mode = data.draw(st.sampled_from([0o755, 0o700, 0o777]), label="mode")
        self.send(p.Mkdir(uid, uid, os.fsencode(path), stat.S_IFDIR | mode))

    @rule(data=st.data())
    def symlink(self, data: st.DataObject) -> None:
        path = self.mangle(data, self.new_name(data))
        target = self.target(data, path)
        uid = data.draw(st.sampled_from(UIDS), label="uid")
        self.send(p.Symlink(uid, uid, os.fsencode(target), os.fsencode(path)))

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        src = self.mangle(data, self.existing(data))
        self.send(p.Rename(os.fsencode(src), os.fsencode(self.some_path(data))))

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        src = self.mangle(data, self.existing(data))
        self.send(p.Link(os.fsencode(src), os.fsencode(self.some_path(data))))

    def _write_flags(self, data: st.DataObject) -> int:
        flags = data.draw(st.sampled_from([os.O_WRONLY, os.O_RDWR]), label="access") | os.O_CREAT
        for extra in (os.O_TRUNC, os.O_APPEND, os.O_NOFOLLOW):
            if data.draw(st.integers(0, 3), label="extra-flag") == 0:
                flags |= extra
        return flags

    @rule(data=st.data())
    def create(self, data: st.DataObject) -> None:
        path = self.some_path(data)
        uid = data.draw(st.sampled_from(UIDS), label="uid")
        mode = data.draw(st.sampled_from([0o644, 0o600, 0o4755]), label="mode")
        self.send(p.Create(os.fsencode(path), self._write_flags(data), stat.S_IFREG | mode, uid, uid))

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """OPEN with O_CREAT (never O_EXCL), then a write of this step's marker on the fd."""
        self.send(p.Open(os.fsencode(self.some_path(data)), self._write_flags(data)))

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        self.send(p.Remove(os.fsencode(self.mangle(data, self.existing(data)))))

    @rule(data=st.data())
    def alias_into_place(self, data: st.DataObject) -> None:
        """A composite step in the shape of issue 9's finding 4, each part drawn at random: build a tree
        below a fresh directory (what a protected path would run through: hooks, .git/hooks, private,
        with a written file at the bottom), give it a name that a protected path runs through by a
        symlink, a rename of the directory, or a rename or link of a symlink to it, with a relative or
        an absolute target. Single random steps meet such a three-to-five-step sequence on the same
        names about once in millions of steps; this makes every example try one."""
        self.pools()
        home = data.draw(st.sampled_from(["/cache", "/home/alice", *self.made_dirs]), label="home")
        base = f"{home.rstrip('/')}/t{self.step + 1}"
        inner = data.draw(st.sampled_from(["hooks", ".git/hooks", "private", "hooks/x", "x"]), label="inner")
        path = base
        for name in ["", *inner.split("/")]:
            path = f"{path}/{name}" if name else path
            self.send(p.Mkdir(0, 0, os.fsencode(path), stat.S_IFDIR | 0o755))
        self.send(p.Open(os.fsencode(path + "/f"), os.O_WRONLY | os.O_CREAT))
        self.pools()
        where = data.draw(st.sampled_from(["/cache", "/home/alice", *self.writable_dirs, *KEY_DIRS]),
                          label="where")
        name = data.draw(st.sampled_from([".git", "hooks", "private", ".git/hooks"]), label="as")
        if name == ".git/hooks":
            self.send(p.Mkdir(0, 0, os.fsencode(f"{where.rstrip('/')}/.git"), stat.S_IFDIR | 0o755))
        dest = f"{where.rstrip('/')}/{name}"
        how = data.draw(st.sampled_from(["symlink", "rename-dir", "rename-link", "link-link"]), label="how")
        if how == "rename-dir":
            self.send(p.Rename(os.fsencode(base), os.fsencode(dest)))
            return
        relative = data.draw(st.booleans(), label="relative")
        target = os.fsencode(relpath(base, os.path.dirname(dest)) if relative else base)
        if how == "symlink":
            self.send(p.Symlink(0, 0, target, os.fsencode(dest)))
            return
        link = os.fsencode(f"{base}l")
        self.send(p.Symlink(0, 0, target, link))
        self.send((p.Rename if how == "rename-link" else p.Link)(link, os.fsencode(dest)))

    @rule(data=st.data())
    def attr(self, data: st.DataObject) -> None:
        """chmod, chown, utime, truncate, lsetxattr (user.* and trusted.*), lremovexattr."""
        op = data.draw(st.sampled_from(["chmod", "chown", "utime", "truncate", "lsetxattr", "lremovexattr"]),
                       label="op")
        path = os.fsencode(self.mangle(data, self.existing(data)))
        if op == "chmod":
            self.send(p.Chmod(path, data.draw(st.sampled_from(MODES), label="mode")))
        elif op == "chown":
            uid = data.draw(st.sampled_from(CHOWN_IDS), label="uid")
            self.send(p.Chown(path, uid, data.draw(st.sampled_from(CHOWN_IDS), label="gid")))
        elif op == "utime":
            atime = data.draw(st.sampled_from([(1000, 0), (0, UTIME_NOW), (0, UTIME_OMIT)]), label="atime")
            mtime = data.draw(st.sampled_from([(2000, 0), (0, UTIME_NOW), (0, UTIME_OMIT)]), label="mtime")
            self.send(p.Utime(path, *atime, *mtime))
        elif op == "truncate":
            self.send(p.Truncate(path, data.draw(st.sampled_from([0, 3]), label="length")))
        elif op == "lsetxattr":
            name = data.draw(st.sampled_from(GUEST_XATTRS), label="xattr")
            value = MARK + b"%d" % (self.step + 1)
            self.send(p.Lsetxattr(path, name, value, len(value), 0))
        else:
            self.send(p.Lremovexattr(path, data.draw(st.sampled_from(ALL_XATTRS), label="xattr")))

    @rule(data=st.data())
    def peek(self, data: st.DataObject) -> None:
        """OPEN for reading, lstat, readlink, lgetxattr, llistxattr: nothing of /secret may come back."""
        op = data.draw(st.sampled_from(["open", "lstat", "readlink", "lgetxattr", "llistxattr"]), label="op")
        path = os.fsencode(self.mangle(data, self.existing(data)))
        if op == "open":  # send() checks the fd
            flags = data.draw(st.sampled_from([os.O_RDONLY, os.O_RDONLY | os.O_DIRECTORY,
                                               os.O_RDONLY | os.O_NOFOLLOW]), label="flags")
            self.send(p.Open(path, flags))
        elif op == "lstat":
            result = self.send(p.Lstat(path))
            if not result.errno:
                dev, ino = struct.unpack_from("<QQ", result.payload)
                self.check((dev, ino) not in self.secret_inodes, f"LSTAT showed /secret's inode {ino}")
        elif op == "readlink":
            result = self.send(p.Readlink(path, 256))
            self.check(SECRET_TARGET.encode() not in result.payload, "READLINK showed /secret/link's target")
        elif op == "lgetxattr":
            name = data.draw(st.sampled_from(ALL_XATTRS), label="xattr")
            size = data.draw(st.sampled_from([256, 0]), label="size")
            result = self.send(p.Lgetxattr(size, path, name))
            self.check(SECRET_XATTR not in result.payload, "lgetxattr returned /secret/file's xattr")
            if size == 0 and not result.errno and name in (b"user.secret", b"trusted.secret"):
                (length,) = struct.unpack_from("<q", result.payload)
                self.check(length != len(SECRET_XATTR), "lgetxattr told the length of /secret/file's xattr")
        else:
            result = self.send(p.Llistxattr(256, path))
            self.check(b"secret" not in result.payload, "llistxattr listed /secret/file's xattrs")

    # -- the invariant, checked after every request ------------------------------------------------------

    @invariant()
    def no_bypass(self) -> None:
        """At the start of each example (and after each rule: the check after each request has run)."""
        if self.checked_step != self.step:
            self.check_all()

    def check_all(self) -> None:
        self.checked_step = self.step
        tree = walk_tree(self.export)
        self.check(not self.internal_errors, "(not a bypass) the gateway hit an internal error:\n"
                   + "\n".join(self.internal_errors))
        now = Snapshot(self.export, tree)
        guest = self.guest_written(tree, now)
        self.check_reachable(tree, guest)
        self.check_unchanged(tree, now)
        self.refresh(tree)

    def guest_written(self, tree: Tree, now: Snapshot) -> set[Ino]:
        """Every inode the guest made, and every host object whose content, mode, owner or xattrs the
        guest changed (kept: once written, always written)."""
        present = tree.places
        self.host &= present.keys()  # a removed host object's number may be reused by a guest object
        self.tainted &= self.host
        for ino in self.host - self.tainted:
            if now.attrs(ino).owned() != self.setup_attrs[ino].owned():
                self.tainted.add(ino)
        return (present.keys() - self.host) | self.tainted

    def check_reachable(self, tree: Tree, guest: set[Ino]) -> None:
        """Invariant 1, over every lexical path (see the module docstring)."""
        resolver = HostResolver(self.export, tree)
        seen: set[tuple[Real, GlobState]] = set()
        todo: list[tuple[Real, GlobState, str]] = [((), START, "")]
        while todo:
            real, state, lexical = todo.pop()
            if (real, state) in seen:
                continue
            seen.add((real, state))
            for name in tree.children[real]:
                entry = (*real, name)
                here = step_state(state, name)
                at = f"{lexical}/{name}"
                end = resolver.follow(entry)
                if covered(here):
                    for obj, what in ((entry, "the entry"), (end, "what it leads to")):
                        if obj is None:
                            continue
                        st_ = tree.stats[obj]
                        self.check((st_.st_dev, st_.st_ino) not in guest,
                                   f"guest-written object reachable at {at} (a path a deny-write rule "
                                   f"covers): {what}, really /{'/'.join(obj)}")
                if end is not None and end in tree.children:
                    todo.append((end, here, at))

    def check_unchanged(self, tree: Tree, now: Snapshot) -> None:
        """Invariant 3: every protected object is still where it was and as it was."""
        for ino, real in self.fixed.items():
            where = "/" + "/".join(real)
            places = tree.places.get(ino, [])
            self.check(real in places, f"protected object {where} moved or removed: now {places}")
            before, after = self.setup_attrs[ino], now.attrs(ino)
            if real == ():  # the root: see the module docstring
                before = replace(before, mtime=0, ctime=0, nlink=0, size=0)
                after = replace(after, mtime=0, ctime=0, nlink=0, size=0)
                entries = {n: i for n, i in self._root_entries(tree).items() if n != "cache"}
                self.check(entries == self.root_entries, f"the root's entries changed: {sorted(entries)}")
            self.check(after == before, f"protected object {where} changed:\n  was {before}\n  now {after}")
        for ino in self.hooks_tree:
            places = tree.places.get(ino, [])
            self.check(bool(places), "an object of the hooks directory was removed")
            where = "/" + "/".join(places[0])
            state = START
            for name in places[0]:
                state = step_state(state, name)
            self.check(state[2], f"an object of the hooks directory left .git/hooks: now {where}")
            before, after = self.setup_attrs[ino], now.attrs(ino)
            self.check(after == before, f"hooks object {where} changed:\n  was {before}\n  now {after}")

    @staticmethod
    def _root_entries(tree: Tree) -> dict[str, Ino]:
        return {real[0]: (s.st_dev, s.st_ino) for real, s in tree.stats.items() if len(real) == 1}


class _ErrorCatcher(logging.Handler):
    """Collects the executor's 'internal error' records: an exception inside the gateway is a bug even
    when it costs only one EIO."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record))


@dataclass
class Stats:
    examples: int = 0
    steps: int = 0


STATS = Stats()


@functools.cache
def the_policy() -> Policy:
    """The policy, written to a file and loaded as the gateway loads it: once (it is 60 ms)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "policy.yaml")
        with open(path, "w") as f:
            f.write(POLICY)
        return load_policy(path)


@functools.cache
def scratch_dir() -> str | None:
    """Where the exports go: tmpfs when it keeps user.* xattrs (Linux 6.6 and later), for a mkdir and
    rmdir there cost microseconds, not the milliseconds of a journaled disk; else the default tmp."""
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        return None
    with tempfile.NamedTemporaryFile(dir=shm) as f:
        try:
            os.setxattr(f.name, "user.probe", b"1")
        except OSError:
            return None
    return shm


def build_export(export: str) -> None:
    os.mkdir(export)
    for d in DIRS:
        os.mkdir(os.path.join(export, d))
    for name, content in FILES.items():
        with open(os.path.join(export, name), "wb") as f:
            f.write(content)
    for name, target in LINKS.items():
        os.symlink(target, os.path.join(export, name))
    for name, attr, value in XATTRS:
        os.setxattr(os.path.join(export, name), attr, value)


SETTINGS = settings(
    max_examples=1000 if LONG else 200,
    stateful_step_count=60 if LONG else 30,
    derandomize=SEED is None,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
    # No explain phase: it reruns the failing examples under line tracing, minutes for this test.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
if SEED is not None:
    seed(int(SEED))(AliasMachine)


def test_alias_property() -> None:
    require_root()  # chown, trusted.* xattrs and setfsuid need it; CI runs as root
    STATS.examples = STATS.steps = 0
    run_state_machine_as_test(AliasMachine, settings=SETTINGS)
    print(f"alias property: {STATS.examples} examples, {STATS.steps} steps")
    assert STATS.steps >= (1000 if LONG else 2000), STATS  # the run really exercised the gateway
