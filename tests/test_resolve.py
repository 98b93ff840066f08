"""Resolve once (gateway/core/resolve.py): the canonical path a request is decided on names exactly the
object the executor then acts on, whatever tree of symlinks, '..', '//' and trailing slashes the guest
builds. Hypothesis builds the trees and the paths; the kernel's own openat2 is the oracle."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import syscalls as sc
from gateway.core.resolve import Resolved, Resolver

NAMES = ["a", "b", "c", "secret"]
TARGETS = ["a", "b", "../a", "/a", "/secret", "/secret/x", "a/b", "../..", ".", "c/", "/nowhere", "b/../c"]


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """(kind, path, target) entries: dirs, files and symlinks two levels deep, /secret always there."""
    entries = [("dir", "secret", ""), ("file", "secret/x", "")]
    for top in draw(st.lists(st.sampled_from(NAMES[:3]), unique=True, max_size=3)):
        kind = draw(st.sampled_from(["dir", "file", "link"]))
        entries.append((kind, top, draw(st.sampled_from(TARGETS)) if kind == "link" else ""))
        if kind == "dir":
            for sub in draw(st.lists(st.sampled_from(NAMES[:3]), unique=True, max_size=3)):
                sk = draw(st.sampled_from(["dir", "file", "link"]))
                entries.append((sk, f"{top}/{sub}", draw(st.sampled_from(TARGETS)) if sk == "link" else ""))
    return entries


paths = st.lists(st.sampled_from([*NAMES, ".", "..", "", "x"]), min_size=1, max_size=5).map(
    lambda parts: "/" + "/".join(parts)
) | st.sampled_from(["/", "//", "/a/", "/a//b/", "a", "/a/b/.", "/a/b/..", "/../a"])


@contextmanager
def export(entries: list[tuple[str, str, str]]) -> Iterator[tuple[str, Resolver]]:
    root = tempfile.mkdtemp(prefix="resolve-")
    try:
        for kind, rel, target in entries:
            where = os.path.join(root, rel)
            if kind == "dir":
                os.mkdir(where)
            elif kind == "file":
                with open(where, "w") as f:
                    f.write(rel)
            else:
                os.symlink(target, where)
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
        try:
            yield root, Resolver(root_fd, proc_fd)
        finally:
            os.close(root_fd)
            os.close(proc_fd)
    finally:
        shutil.rmtree(root)


def kernel(resolver: Resolver, path: bytes, flags: int) -> tuple[int, int] | int:
    """What the kernel itself reaches (device, inode), or its errno."""
    try:
        fd = sc.openat2(resolver.root_fd, path, flags)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        s = os.fstat(fd)
        return (s.st_dev, s.st_ino)
    finally:
        os.close(fd)


def check_canonical(root: str, r: Resolved, *, final_may_be_link: bool) -> None:
    """The canonical path is normalised, has no symlink on the way, and names the object reached."""
    path = r.path.decode()
    assert path.startswith("/") and "//" not in path and (path == "/" or not path.endswith("/")), path
    parts = [p for p in path.split("/") if p]
    assert "." not in parts and ".." not in parts, path
    for i in range(1, len(parts)):
        assert not os.path.islink(os.path.join(root, *parts[:i])), f"symlink inside {path}"
    if r.fd >= 0:
        there = os.lstat(os.path.join(root, *parts)) if parts else os.stat(root)
        here = os.fstat(r.fd)
        assert (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino), f"{path} is not what was reached"
        if not final_may_be_link:
            assert not stat.S_ISLNK(here.st_mode)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), st.lists(paths, min_size=1, max_size=6))
def test_follow_reaches_what_the_kernel_reaches_and_names_it(entries: list, guest_paths: list[str]) -> None:
    with export(entries) as (root, resolver):
        for text in guest_paths:
            path = text.encode()
            want = kernel(resolver, path, os.O_PATH)
            r = resolver.follow(path)
            try:
                if isinstance(want, int):
                    assert r.err == want and r.fd < 0, (text, want, r.err)
                else:
                    here = os.fstat(r.fd)
                    assert (here.st_dev, here.st_ino) == want, text
                check_canonical(root, r, final_may_be_link=False)
            finally:
                r.close()


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), st.lists(paths, min_size=1, max_size=6))
def test_nofollow_reaches_the_final_component_itself(entries: list, guest_paths: list[str]) -> None:
    with export(entries) as (root, resolver):
        for text in guest_paths:
            path = text.encode()
            # A trailing slash, '.' or '..' last: the kernel follows; otherwise the name itself.
            follows = path.endswith(b"/") or path.rsplit(b"/", 1)[-1] in (b".", b"..")
            want = kernel(resolver, path, os.O_PATH if follows else os.O_PATH | os.O_NOFOLLOW)
            r = resolver.nofollow(path)
            try:
                if isinstance(want, int):
                    assert r.err == want, (text, want, r.err)
                else:
                    assert r.err == 0, (text, r.err)
                    here = os.fstat(r.fd)
                    assert (here.st_dev, here.st_ino) == want, text
                check_canonical(root, r, final_may_be_link=not follows)
            finally:
                r.close()


def test_a_trailing_slash_on_a_symlink_is_decided_on_its_target() -> None:
    with export([("dir", "secret", ""), ("dir", "home", ""), ("link", "home/ls", "/secret")]) as (_, res):
        for path, canonical in ((b"/home/ls", b"/home/ls"), (b"/home/ls/", b"/secret"),
                                (b"//home//ls//", b"/secret"), (b"/home/ls/.", b"/secret")):
            r = res.nofollow(path)
            try:
                assert r.path == canonical, path
            finally:
                r.close()


def test_a_failed_lookup_is_decided_where_it_was_heading() -> None:
    # A dangling link into /secret: ENOENT either way, but decided as /secret/..., so a deny there answers
    # the same whether or not the name exists (otherwise the guest could probe /secret's names).
    entries = [("dir", "secret", ""), ("dir", "home", ""), ("link", "home/d", "/secret/nothing"),
               ("link", "home/e", "../secret/nothing/deeper")]
    with export(entries) as (_, res):
        deep = ((b"/home/d/x", b"/secret/nothing/x"), (b"/home/e/y", b"/secret/nothing/deeper/y"))
        for path, heading in deep:
            for r in (res.name(path), res.follow(path)):
                try:
                    assert r.err == errno.ENOENT and r.path == heading, (path, r.path)
                finally:
                    r.close()
        for path, heading in ((b"/home/e", b"/secret/nothing/deeper"), (b"/home/d", b"/secret/nothing")):
            for r in (res.follow(path),):  # a name form decides on the link itself, which exists
                try:
                    assert r.err == errno.ENOENT and r.path == heading, (path, r.path)
                finally:
                    r.close()


def test_dotdot_walks_are_listed_canonically() -> None:
    with export([("dir", "secret", ""), ("dir", "secret/dir", ""), ("dir", "home", ""),
                 ("link", "home/l", "/secret/dir")]) as (_, res):
        assert res.through(b"/secret/dir/../../home") == (b"/secret/dir", b"/secret")
        assert res.through(b"/home/l/../x") == (b"/secret/dir",)  # '..' after a symlink is physical
        assert res.through(b"/secret/missing/../x") == (b"/secret/missing",)
        assert res.through(b"/home/x") == ()


def test_dotdot_walks_cost_a_lookup_per_component_not_per_prefix(monkeypatch: object) -> None:
    # A guest path of thousands of '..' once cost an openat2 of every prefix: quadratic, and a fuzzed
    # 4 KiB path held the server for seconds. Count the lookups instead of timing them.
    import gateway.core.resolve as resolve_mod

    calls: list[bytes] = []
    real = resolve_mod.sc.openat2

    def counting(dirfd: int, path: bytes, *args: int) -> int:
        calls.append(path)
        return real(dirfd, path, *args)

    entries = [("dir", "secret", ""), ("dir", "a", ""), ("dir", "a/b", ""), ("link", "a/l", "b")]
    with export(entries) as (_, res):
        monkeypatch.setattr(resolve_mod.sc, "openat2", counting)  # type: ignore[attr-defined]
        plain = b"/a" + b"/b/.." * 600  # no symlink on the way: the lexical prefixes, one lookup
        assert res.through(plain) == (b"/a/b",) and len(calls) == 1
        calls.clear()
        linked = b"/a" + b"/l/.." * 600  # a symlink each time: the walk replayed, one lookup per '..'
        assert res.through(linked) == (b"/a/b",)
        assert len(calls) <= 2 + 600, len(calls)
        total = sum(len(c.split(b"/")) for c in calls)
        assert total <= 10 * 600, total  # each lookup short: never a prefix of the whole path
