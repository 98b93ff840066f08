"""What a policy's `ids:` and `limits:` do to requests on a multi-tenant host: guest ids mapped to host
ids (and back in LSTAT replies and for the rules' view of an object's owner), a request rate that slows
the guest down rather than failing it, and a cap on the length TRUNCATE may set."""

from __future__ import annotations

import dataclasses
import errno
import struct
import time
from typing import Any

from gateway import protocol as p
from gateway.rules import ObjectAttrs

# The request types whose uid/gid fields name an owner (the new object's, or CHOWN's new one).
OWNER_TYPES = frozenset(
    {
        p.RequestType.CREATE,
        p.RequestType.MKNOD,
        p.RequestType.MKDIR,
        p.RequestType.SYMLINK,
        p.RequestType.CHOWN,
    }
)
_UID_GID = struct.Struct("<II")
_UID_OFFSET = 28  # in the LSTAT payload: q dev, q ino, q nlink, d mode, then d uid, d gid


class Refused(Exception):
    """A request a tenant limit or the id map refuses: the errno, the pseudo-rule and why."""

    def __init__(self, errno_: int, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno_
        self.rule = rule
        self.reason = reason


class IdTranslator:
    """Applies an IdMap (gateway.rules.model) at the edges: the rules always see the guest's ids."""

    def __init__(self, ids: Any) -> None:
        self.ids = ids

    def to_host(self, request: p.Request) -> p.Request:
        """The request with its owner ids mapped to the host's; Refused when an id is unmapped (forbid)."""
        if request.type not in OWNER_TYPES:
            return request
        uid = self.ids.uid_to_host(request.uid)  # type: ignore[union-attr]
        gid = self.ids.gid_to_host(request.gid)  # type: ignore[union-attr]
        if uid is None or gid is None:
            which = f"uid {request.uid}" if uid is None else f"gid {request.gid}"  # type: ignore[union-attr]
            raise Refused(
                errno.EPERM, "ids.unmapped", f"{which} is outside every mapped range (unmapped: forbid)"
            )
        if uid == request.uid and gid == request.gid:  # type: ignore[union-attr]
            return request
        return dataclasses.replace(request, uid=uid, gid=gid)  # type: ignore[call-arg]

    def stat_payload_to_guest(self, payload: bytes) -> bytes:
        host_uid, host_gid = _UID_GID.unpack_from(payload, _UID_OFFSET)
        out = bytearray(payload)
        _UID_GID.pack_into(out, _UID_OFFSET, self.ids.uid_to_guest(host_uid), self.ids.gid_to_guest(host_gid))
        return bytes(out)

    def attrs_to_guest(self, st: Any) -> ObjectAttrs:
        attrs = ObjectAttrs.from_stat(st)
        return dataclasses.replace(
            attrs, owner=self.ids.uid_to_guest(st.st_uid), group=self.ids.gid_to_guest(st.st_gid)
        )


class RateLimiter:
    """A token bucket: over its rate the gateway sleeps before serving, so the guest slows down and no
    request fails. Hits are summarised at most once a second (a record per delayed request would double
    the trail exactly when the guest is busiest)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.last = time.monotonic()
        self.delayed = 0
        self.delay_s = 0.0
        self.window_start = self.last

    def take(self) -> float:
        """Take one token, sleeping if there is none; returns the seconds slept. A sleep that overshoots
        is credited back as tokens, so the guest gets the whole rate, not the rate minus the overshoot."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        waited = 0.0
        if self.tokens < 1:
            time.sleep((1 - self.tokens) / self.rate)
            after = time.monotonic()
            waited = after - now
            self.tokens = min(self.burst, self.tokens + waited * self.rate)
            self.last = after
            self.delayed += 1
            self.delay_s += waited
        self.tokens -= 1
        return waited

    def summary_due(self) -> dict[str, float] | None:
        """The hits since the last summary, once a second, or None."""
        now = time.monotonic()
        if not self.delayed or now - self.window_start < 1.0:
            return None
        out = {
            "delayed": self.delayed,
            "delay_ms": round(self.delay_s * 1000, 3),
            "window_s": round(now - self.window_start, 3),
        }
        self.delayed, self.delay_s, self.window_start = 0, 0.0, now
        return out


def check_truncate(request: p.Request, truncate_max: int | None) -> None:
    if truncate_max is not None and request.type is p.RequestType.TRUNCATE and request.length > truncate_max:  # type: ignore[union-attr]
        raise Refused(
            errno.EFBIG,
            "limits.truncate_max",
            f"length {request.length} exceeds the tenant's truncate_max {truncate_max}",  # type: ignore[union-attr]
        )
