"""The guest's memory, as SET_MEM_TABLE described it: regions mapped from the front-end's memfds.

Every access the data plane makes to guest memory goes through ``GuestMemory``, and every one is
bounds-checked first: an address or a length outside the table, or a range that wraps past 2**64, is a
``GuestMemoryError`` and nothing is touched. The guest controls every address in a descriptor, so this
is the wall between a hostile driver and the back-end's own memory.

Two address spaces meet here (vhost-user.rst, "Memory regions"):

* guest-physical addresses, used by descriptors (``translate``);
* the front-end's own virtual addresses, used by SET_VRING_ADDR for the rings themselves
  (``translate_uva``), which QEMU gives as ``userspace_addr`` in each region.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.virtiofs.vhost_user_abi import MemoryRegion

U64_LIMIT = 1 << 64


class GuestMemoryError(Exception):
    """An address or length the memory table does not cover (the guest's doing: never a crash)."""


def _map_shared(fd: int, length: int) -> mmap.mmap:
    # A mapping beyond the file's end would SIGBUS on first touch: check the size before mapping.
    size = os.fstat(fd).st_size
    if size < length:
        raise GuestMemoryError(f"region needs {length} bytes of its fd, which has {size}")
    return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


@dataclass
class _Mapped:
    gpa: int
    size: int
    uva: int
    view: memoryview  # exactly the region's bytes (mmap_offset applied)


class GuestMemory:
    """The mapped regions of one memory table. ``mapper(fd, length)`` maps an fd (tests may pass their
    own); the fds are not kept: the caller closes them once this is built."""

    def __init__(self, regions: Sequence[MemoryRegion], fds: Sequence[int],
                 mapper: Callable[[int, int], mmap.mmap] = _map_shared) -> None:
        if len(regions) != len(fds):
            raise GuestMemoryError(f"{len(regions)} regions, {len(fds)} fds")
        self._maps: list[mmap.mmap] = []
        self._regions: list[_Mapped] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                end = region.mmap_offset + region.memory_size
                # mmap's offset must be page-aligned; mmap_offset need not be, so map from 0 and slice.
                m = mapper(fd, end)
                self._maps.append(m)
                view = memoryview(m)[region.mmap_offset:end]
                self._regions.append(_Mapped(region.guest_phys_addr, region.memory_size,
                                             region.userspace_addr, view))
        except (OSError, ValueError) as exc:
            self.close()
            raise GuestMemoryError(f"cannot map a region: {exc}") from exc
        except GuestMemoryError:
            self.close()
            raise
        self._regions.sort(key=lambda r: r.gpa)

    def close(self) -> None:
        for r in self._regions:
            r.view.release()
        self._regions = []
        for m in self._maps:
            # A slice still held somewhere keeps its mapping alive; it goes when the slice does.
            with contextlib.suppress(BufferError):
                m.close()
        self._maps = []

    # --- guest-physical ---------------------------------------------------------------------------
    def translate(self, gpa: int, length: int) -> list[memoryview]:
        """The bytes [gpa, gpa+length) as views, one per region crossed (a buffer may straddle two
        adjacent regions). A zero length is an empty list."""
        if gpa < 0 or length < 0 or gpa + length > U64_LIMIT:
            raise GuestMemoryError(f"range {gpa:#x}+{length:#x} wraps")
        out: list[memoryview] = []
        while length:
            r = self._find(gpa)
            if r is None:
                raise GuestMemoryError(f"guest address {gpa:#x} is outside the memory table")
            off = gpa - r.gpa
            n = min(length, r.size - off)
            out.append(r.view[off:off + n])
            gpa += n
            length -= n
        return out

    def contiguous(self, gpa: int, length: int) -> memoryview:
        """[gpa, gpa+length) as one view: for structures that must not straddle regions."""
        parts = self.translate(gpa, length)
        if len(parts) > 1:
            raise GuestMemoryError(f"range {gpa:#x}+{length:#x} straddles two regions")
        return parts[0] if parts else memoryview(b"")

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(bytes(p) for p in self.translate(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for p in self.translate(gpa, len(data)):
            p[:] = data[pos:pos + len(p)]
            pos += len(p)

    def _find(self, gpa: int) -> _Mapped | None:
        for r in self._regions:  # at most 8 regions: a scan is cheaper than a bisect's set-up
            if r.gpa <= gpa < r.gpa + r.size:
                return r
        return None

    # --- the front-end's virtual addresses (ring addresses) --------------------------------------
    def translate_uva(self, uva: int, length: int) -> memoryview:
        """A ring's bytes, given as a front-end virtual address; it must lie in one region."""
        if uva < 0 or length < 0 or uva + length > U64_LIMIT:
            raise GuestMemoryError(f"range {uva:#x}+{length:#x} wraps")
        for r in self._regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                off = uva - r.uva
                return r.view[off:off + length]
        raise GuestMemoryError(f"front-end address {uva:#x}+{length:#x} is outside the memory table")
