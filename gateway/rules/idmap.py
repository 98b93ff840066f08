"""The policy's ``ids:`` section: guest uid/gid ranges mapped onto host ranges, both ways.

Like a user namespace's uid_map (or virtiofsd's --translate-uid): ``{guest: 0, host: 100000, count: 65536}``
makes guest ids 0..65535 host ids 100000..165535. A guest id outside every range is refused (``unmapped:
forbid``) or replaced by the squash id (``unmapped: squash``); a host id outside every range shows to the
guest as the squash id, as the overflow id does in a user namespace.

The rules always speak guest ids: the gateway maps ids only at its edges (requests going to the host,
LSTAT replies and object owners coming back). Pure and cheap: the server calls a lookup for every owner
it passes on, so each lookup is a closure specialised when the map is built (one comparison for the
usual single range, a bisect over sorted ranges otherwise).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

NO_ID = 0xFFFFFFFF  # (u32)-1: "leave unchanged" in chown; never mapped, in either direction
ID_LAST = NO_ID - 1  # the largest id a range may hold
DEFAULT_SQUASH = 65534  # the kernel's overflowuid/overflowgid ("nobody")
UNMAPPED_MODES = ("forbid", "squash")

IdLookup = Callable[[int], int | None]


class IdRange(NamedTuple):
    """``count`` consecutive guest ids from ``guest`` are the host ids from ``host``."""

    guest: int
    host: int
    count: int

    @property
    def guest_last(self) -> int:
        return self.guest + self.count - 1

    @property
    def host_last(self) -> int:
        return self.host + self.count - 1

    def __str__(self) -> str:
        if self.count == 1:
            return f"{self.guest} → {self.host}"
        return f"{self.guest}-{self.guest_last} → {self.host}-{self.host_last}"


def range_problems(
    ranges: Sequence[IdRange], name: Callable[[int], str] = "[{}]".format
) -> list[tuple[int, str]]:
    """(index, message) for each range that is out of bounds or overlaps an earlier one, on either side;
    ``name(index)`` names the other range of an overlap.

    Overlaps are refused rather than resolved by order: an overlap on the guest side makes a guest id mean
    two host ids, and on the host side makes the way back ambiguous (a file would show two owners)."""
    out: list[tuple[int, str]] = []
    for i, r in enumerate(ranges):
        if r.count < 1:
            out.append((i, f"count {r.count} must be at least 1"))
            continue
        for side, first in (("guest", r.guest), ("host", r.host)):
            if first < 0 or first + r.count - 1 > ID_LAST:
                out.append((i, f"{side} ids {first}-{first + r.count - 1} are outside 0-{ID_LAST} ({NO_ID} "
                               "is -1, which means 'unchanged', and is never mapped)"))
    if out:
        return out  # overlaps of broken ranges would only repeat the same problem in other words
    for side in ("guest", "host"):
        spans = sorted((r.guest if side == "guest" else r.host, r.count, i) for i, r in enumerate(ranges))
        reach: tuple[int, int, int] | None = None  # (last, first, index) of the furthest-reaching so far
        for first, count, i in spans:
            last = first + count - 1
            if reach is not None and first <= reach[0]:
                (a, a_first, a_last), (b, b_first, b_last) = sorted(
                    [(reach[2], reach[1], reach[0]), (i, first, last)])
                out.append((b, f"{side} ids {b_first}-{b_last} overlap {side} ids {a_first}-{a_last} of "
                               f"{name(a)}: each {side} id may be in one range only"))
            if reach is None or last > reach[0]:
                reach = (last, first, i)
    return sorted(out)


def _lookup(pairs: list[tuple[int, int, int]], miss: int | None) -> IdLookup:
    """A lookup over (first, count, target) ranges, sorted here; ``miss`` for an id in none of them."""
    pairs = sorted(pairs)
    if len(pairs) == 1:  # the usual map: one block of ids, so one comparison and no bisect
        ((first, count, target),) = pairs
        last, delta = first + count - 1, target - first

        def one(value: int) -> int | None:
            if first <= value <= last:
                return value + delta
            return value if value == NO_ID or value == -1 else miss

        return one
    firsts = [p[0] for p in pairs]
    lasts = [p[0] + p[1] - 1 for p in pairs]
    deltas = [p[2] - p[0] for p in pairs]

    def many(value: int) -> int | None:
        i = bisect_right(firsts, value) - 1
        if i >= 0 and value <= lasts[i]:
            return value + deltas[i]
        return value if value == NO_ID or value == -1 else miss

    return many


@dataclass(frozen=True, slots=True)
class IdMap:
    """A guest<->host id map. ``uid_to_host``/``gid_to_host`` give None for a refused id (unmapped under
    forbid; under squash, the squash id instead); ``uid_to_guest``/``gid_to_guest`` give the squash id for
    a host id outside every range. NO_ID (0xFFFFFFFF, and -1) passes through both ways unchanged."""

    uid: tuple[IdRange, ...]
    gid: tuple[IdRange, ...]
    unmapped: str = "forbid"  # "forbid" | "squash"
    squash_uid: int = DEFAULT_SQUASH
    squash_gid: int = DEFAULT_SQUASH
    line: int = field(default=0, compare=False)  # of `ids:` in the policy, for messages only
    uid_to_host: IdLookup = field(init=False, repr=False, compare=False)
    gid_to_host: IdLookup = field(init=False, repr=False, compare=False)
    uid_to_guest: Callable[[int], int] = field(init=False, repr=False, compare=False)
    gid_to_guest: Callable[[int], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Checked here too (the loader reports the same problems with lines first): an IdMap built by hand
        # must not be ambiguous either.
        if self.unmapped not in UNMAPPED_MODES:
            raise ValueError(f"unmapped must be forbid or squash, not {self.unmapped!r}")
        for name in ("squash_uid", "squash_gid"):
            if not 0 <= getattr(self, name) <= ID_LAST:
                raise ValueError(f"{name} must be between 0 and {ID_LAST}")
        for kind in ("uid", "gid"):
            ranges = tuple(IdRange(*r) for r in getattr(self, kind))
            object.__setattr__(self, kind, ranges)
            problems = range_problems(ranges)
            if problems:
                raise ValueError("; ".join(f"{kind}[{i}]: {message}" for i, message in problems))
        squash = self.unmapped == "squash"
        set_ = object.__setattr__
        set_(self, "uid_to_host", _lookup([(r.guest, r.count, r.host) for r in self.uid],
                                          self.squash_uid if squash else None))
        set_(self, "gid_to_host", _lookup([(r.guest, r.count, r.host) for r in self.gid],
                                          self.squash_gid if squash else None))
        set_(self, "uid_to_guest", _lookup([(r.host, r.count, r.guest) for r in self.uid], self.squash_uid))
        set_(self, "gid_to_guest", _lookup([(r.host, r.count, r.guest) for r in self.gid], self.squash_gid))

    def __reduce__(self) -> tuple[type[IdMap], tuple[object, ...]]:
        # The lookups are closures, which do not pickle: rebuild them from the ranges instead.
        return IdMap, (self.uid, self.gid, self.unmapped, self.squash_uid, self.squash_gid, self.line)
