"""The read-only file system under any request a guest can send (gateway/virtiofs/readonly_fs.py):
every one gets a well-formed reply (or none, for FORGET), nothing raises, nothing in the export
changes, and the inode and handle tables stay within their bounds."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.virtiofs import fuse_abi as abi
from gateway.virtiofs.fuse_abi import Op
from gateway.virtiofs.fuse_decode import decode
from gateway.virtiofs.readonly_fs import ReadOnlyFs


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fs") / "export"
    (root / "d" / "e").mkdir(parents=True)
    (root / "f").write_bytes(b"0123456789")
    (root / "d" / "g").write_bytes(b"g")
    os.symlink("../../../etc", root / "d" / "out")
    os.mkfifo(root / "p")
    return root


@pytest.fixture
def fs(export: Path) -> Iterator[ReadOnlyFs]:
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    fs = ReadOnlyFs(root_fd, proc_fd, max_inodes=6, max_handles=3)
    yield fs
    fs.close()
    os.close(root_fd)
    os.close(proc_fd)


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.lstat().st_mode, p.lstat().st_size) for p in root.rglob("*"))


_names = st.sampled_from([b"f", b"d", b"e", b"g", b"out", b"p", b"nope", b".", b"..", b"a/b", b""])
_u64 = st.one_of(st.integers(0, 8), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
_u32 = st.one_of(st.integers(0, 70000), st.sampled_from([2**31, 2**32 - 1]))


@st.composite
def _request(draw: st.DrawFn) -> bytes:
    op = draw(st.sampled_from([*list(Op), 0, 99]))
    name = draw(_names) + b"\0"
    body = draw(st.sampled_from([
        b"",
        name,
        abi.OPEN_IN.pack(draw(st.sampled_from([0, os.O_RDWR, os.O_TRUNC, os.O_DIRECTORY, 2**32 - 1])), 0),
        abi.READ_IN.pack(draw(_u64), draw(_u64), draw(_u32), 0, 0, 0, 0),
        abi.RELEASE_IN.pack(draw(_u64), 0, 0, 0),
        abi.GETATTR_IN.pack(0, 0, draw(_u64)),
        struct.pack("<Q", draw(_u64)),
        struct.pack("<II", draw(st.integers(0, 3)), 0) + struct.pack("<QQ", draw(_u64), draw(_u64)) * 2,
        abi.ACCESS_IN.pack(draw(st.integers(0, 7)), 0),
        abi.INIT_IN.pack(7, draw(st.sampled_from([31, 36, 38])), 0, 0, 0),
        draw(st.binary(max_size=64)),
    ]))
    nodeid = draw(st.one_of(st.integers(0, 8), st.just(2**64 - 1)))
    return abi.IN_HEADER.pack(40 + len(body), op, draw(_u64), nodeid, 0, 0, 1, 0, 0) + body


def _init(fs: ReadOnlyFs) -> None:
    init = abi.INIT_IN.pack(7, 36, 0, 0, 0)
    out = fs.handle(decode(abi.IN_HEADER.pack(104, Op.INIT, 1, 1, 0, 0, 1, 0, 0) + init))
    assert out is not None and abi.OUT_HEADER.unpack_from(out)[1] == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_request(), max_size=30))
def test_any_request_sequence_gets_well_formed_replies(fs: ReadOnlyFs, export: Path,
                                                       reqs: list[bytes]) -> None:
    before = _snapshot(export)
    _init(fs)
    for data in reqs:
        opcode, unique = struct.unpack_from("<I", data, 4)[0], struct.unpack_from("<Q", data, 8)[0]
        out = fs.handle(decode(data))
        if opcode in (Op.FORGET, Op.BATCH_FORGET):
            assert out is None
            continue
        assert out is not None
        length, error, got_unique = abi.OUT_HEADER.unpack_from(out)
        assert length == len(out) and got_unique == unique and -4096 < error <= 0
        assert len(fs.inodes) <= fs.inodes.max_inodes and len(fs.handles) <= fs.handles.max_handles
    assert _snapshot(export) == before


def test_huge_offsets_are_errors_not_crashes(fs: ReadOnlyFs) -> None:
    _init(fs)
    out = fs.handle(decode(abi.IN_HEADER.pack(42, Op.LOOKUP, 2, 1, 0, 0, 1, 0, 0) + b"f\0"))
    assert out is not None
    nodeid = abi.ENTRY_OUT_HEAD.unpack_from(out, 16)[0]
    opened = abi.OPEN_IN.pack(0, 0)
    out = fs.handle(decode(abi.IN_HEADER.pack(48, Op.OPEN, 3, nodeid, 0, 0, 1, 0, 0) + opened))
    assert out is not None
    fh = abi.OPEN_OUT.unpack_from(out, 16)[0]
    for offset in (2**63, 2**64 - 1):
        read = abi.READ_IN.pack(fh, offset, 10, 0, 0, 0, 0)
        out = fs.handle(decode(abi.IN_HEADER.pack(80, Op.READ, 4, nodeid, 0, 0, 1, 0, 0) + read))
        assert out is not None and abi.OUT_HEADER.unpack_from(out)[1] < 0


def test_lookups_are_bounded_and_forgotten(fs: ReadOnlyFs) -> None:
    _init(fs)
    lookups = {}
    for name in (b"f", b"d", b"p"):
        head = abi.IN_HEADER.pack(40 + len(name) + 1, Op.LOOKUP, 5, 1, 0, 0, 1, 0, 0)
        out = fs.handle(decode(head + name + b"\0"))
        assert out is not None and abi.OUT_HEADER.unpack_from(out)[1] == 0
        lookups[name] = abi.ENTRY_OUT_HEAD.unpack_from(out, 16)[0]
    assert len(fs.inodes) == 4
    inode = fs.inodes.get(lookups[b"f"])
    assert inode is not None and inode.path == b"/f"
    forget = struct.pack("<II", 3, 0) + b"".join(struct.pack("<QQ", n, 1) for n in lookups.values())
    assert fs.handle(decode(abi.IN_HEADER.pack(40 + len(forget), Op.BATCH_FORGET, 6, 0, 0, 0, 1, 0, 0)
                            + forget)) is None
    assert len(fs.inodes) == 1  # the root only
