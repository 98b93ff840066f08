"""The request loop that joins the pipeline:

    socket bytes -> protocol -> request -> rules (decide) -> executor (only if allowed) -> audit -> reply

Single-threaded on purpose: the executor switches fs ids per request (setfsuid is per thread) and a
request is recorded before its reply is sent, so one request is in flight at a time, as QEMU sends them.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gateway import protocol as p
from gateway import signals
from gateway.audit import TrailFailed
from gateway.core.executor import Executor, Result
from gateway.core.resolve import Resolution
from gateway.fastloop import CompiledLoop
from gateway.logfmt import kv
from gateway.names import errno_name
from gateway.reload_worker import ReloadWorker
from gateway.rules import Decision, Policy, decide
from gateway.rules.model import ObjectAttrs
from gateway.rules.requests import object_record
from gateway.tenancy import IdTranslator, RateLimiter, Refused, check_truncate

if TYPE_CHECKING:
    from gateway.audit import AuditWriter

log = logging.getLogger("gateway.server")

_perf_counter_ns = time.perf_counter_ns
_NO_EXTRA: dict[str, object] = {}  # never mutated: the record's extras when there are none


_TWO_PATHS = frozenset({p.RequestType.RENAME, p.RequestType.LINK})
# The request classes the decoder yields: serve() tells a request from the rare events with one set
# lookup on type(event) instead of five isinstance calls per request.
_REQUEST_CLASSES = frozenset(cls for cls, _codes in p.LAYOUTS.values())
# Reply shape per request type, computed once (reply_shape is two set lookups and a call per reply).
_SHAPES = {rtype: p.reply_shape(rtype) for rtype in p.RequestType}
_FD, _STATUS = p.ReplyShape.FD, p.ReplyShape.STATUS


class ObjectLookup:
    """The lookup a decision gets: the resolved object's attributes (the guest's view of its owner under
    an id map), and whether the rules asked for them and what they got, for the record."""

    __slots__ = ("asked", "found", "ids", "res")

    def __init__(self, res: Resolution, ids: IdTranslator | None) -> None:
        self.res = res
        self.ids = ids
        self.asked = False
        self.found: object = None

    def __call__(self, path: str) -> object:
        st = self.res.lookup(path)
        found = st if st is None or self.ids is None else self.ids.attrs_to_guest(st)
        self.asked = True
        self.found = found
        return found


def object_facts(found: object) -> dict[str, object] | None:
    """The object as a record carries it (null: there was none), in the guest's ids."""
    if found is None:
        return None
    return object_record(found if isinstance(found, ObjectAttrs) else ObjectAttrs.from_stat(found))


STOPPED = "stopped by a signal (SIGTERM or SIGINT)"


class StopRequested(Exception):
    """Raised by the stop signal's handler while the gateway waits for a client (nothing to finish)."""


@dataclass
class ServeStats:
    requests: int = 0
    denied: int = 0
    malformed: int = 0
    unknown: int = 0
    end: str = ""


class Server:
    def __init__(
        self, sock: socket.socket | None, executor: Executor, policy: Policy, audit: AuditWriter | None = None
    ) -> None:
        self.sock = sock  # None until a client is attached (serve_client)
        self.executor = executor
        self.audit = audit
        self.decoder = p.Decoder()
        self.stats = ServeStats()
        self.policy = policy
        self.set_policy(policy)
        self.reloader: Callable[[], Policy] | None = None  # reads and compiles the policy anew
        # Set by signal handlers (gateway.signals), acted on by the serve loop between two requests.
        self._reload_pending = False
        self._reopen_pending = False
        self._reload_ready = False  # the reload worker has an outcome to swap in
        # Reads and compiles off the request path when set (gateway serve sets it); else reload() runs
        # in the loop, as a Server built by a test does.
        self.reload_worker: ReloadWorker | None = None
        self._served_at_reload: int | None = None  # the request count when the worker was asked
        self.stop_requested = False  # SIGTERM/SIGINT: the session ends between two requests
        # Set only around accept(): there a stop signal unwinds the wait at once (nothing is half done).
        self.waiting_for_client = False
        self.wakeup_fd: int | None = None  # signals.install()'s pipe: wakes the idle loop for them
        self.loop: CompiledLoop | None = None  # the loop serving (its counters: served, handed)

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy in force (called between two requests), with its id map and limits."""
        self.policy = policy
        self.ids = IdTranslator(policy.ids) if policy.ids is not None else None
        limits = policy.limits
        rps = limits.requests_per_second
        self.rate = RateLimiter(rps, limits.burst or max(1, int(rps))) if rps else None
        self.truncate_max: int | None = limits.truncate_max
        if self.audit is not None:
            self.audit.set_policy(policy.hash)

    def flush_limit_hits(self) -> None:
        """At the end of a session: the rate-limit hits not yet summarised get their record."""
        if self.audit is not None and self.rate is not None and self.rate.delayed:
            self.rate.window_start -= 1.0  # due now, whatever is left of the current second
            hits = self.rate.summary_due()
            if hits is not None:
                self.audit.lifecycle("limit", limit="rate", **hits)

    def request_reload(self) -> None:
        """SIGHUP: reload the policy between two requests. Only sets a flag: it runs in a signal handler,
        and acting there would re-enter whatever was interrupted (a record half written)."""
        self._reload_pending = True
        if self.loop is not None:
            self.loop.signalled = True

    def request_reopen(self) -> None:
        """SIGUSR1: reopen the trail between two requests (only a flag, as request_reload)."""
        self._reopen_pending = True
        if self.loop is not None:
            self.loop.signalled = True

    def request_wakeup(self) -> None:
        """SIGUSR2, from the reload worker: a reload is ready to be swapped in (only a flag)."""
        self._reload_ready = True
        if self.loop is not None:
            self.loop.signalled = True

    @property
    def signals_pending(self) -> bool:
        return self._reload_pending or self._reopen_pending or self._reload_ready or self.stop_requested

    def request_stop(self) -> None:
        """SIGTERM or SIGINT: end the session between two requests, with its records (the trail's stop
        and final checkpoint, systemd's STOPPING=1). Waiting for a client, there is no request to finish:
        StopRequested unwinds the wait (accept) at once; anywhere else the flag is acted on as soon as
        the loop looks (a record is never cut in two)."""
        self.stop_requested = True
        if self.loop is not None:
            self.loop.signalled = True
        if self.waiting_for_client:
            self.waiting_for_client = False  # a second signal must not raise in the first one's handling
            raise StopRequested()

    def act_on_signals(self) -> bool:
        """Between two requests: one reopen and one reload for however many signals came meanwhile
        (a storm coalesces; the requests waiting are served before the next one). False: stop serving
        (SIGTERM or SIGINT)."""
        if self.wakeup_fd is not None:
            self._take_wakeup()  # its bytes belong to the signals acted on now: no second reload later
        if self._reopen_pending:
            self._reopen_pending = False
            if self.audit is not None:
                self.audit.reopen()
        if self._reload_pending:
            if self.reload_worker is None:
                self.reload()  # clears the flag first: a SIGHUP during the reload asks for one more
            else:
                self._reload_pending = False
                if self._served_at_reload is None:
                    self._served_at_reload = self.stats.requests
                self.reload_worker.request()
        if self.reload_worker is not None:
            self._reload_ready = False
            for outcome in self.reload_worker.take():
                # What the record says of it: how long the compile took, and how many requests were
                # served meanwhile (0 would mean the reload stalled the guest, as it did when inline).
                meanwhile = self.stats.requests - (self._served_at_reload or 0)
                self._served_at_reload = None if not self.reload_worker.busy else self.stats.requests
                self._swap(
                    outcome.policy, outcome.error,
                    compile_s=round(outcome.seconds, 3), served_meanwhile=max(0, meanwhile),
                )  # fmt: skip
        if self.stop_requested:
            self.stats.end = STOPPED
            return False
        return True

    def _take_wakeup(self) -> None:
        """Empty the wakeup pipe into the flags (its signal numbers too, should a handler not have run)."""
        assert self.wakeup_fd is not None
        seen = signals.drain(self.wakeup_fd)
        if seen:
            self._reload_pending = self._reload_pending or signal.SIGHUP in seen
            self._reopen_pending = self._reopen_pending or signal.SIGUSR1 in seen

    def reload(self) -> bool:
        """Read, validate and compile the policy here and now, then swap it in (a Server without a
        reload worker; gateway serve compiles in its worker and swaps with _swap)."""
        self._reload_pending = False
        if self.reloader is None:
            return False
        try:
            new = self.reloader()
        except Exception as exc:  # PolicyError, OSError, anything: the old policy must survive it
            return self._swap(None, exc)
        return self._swap(new, None)

    def _swap(self, new: Policy | None, error: Exception | None, **how: object) -> bool:
        """Between two requests: the new policy in force, or the refusal recorded and the old one kept.
        how: what the record also says of the reload (the worker's compile time, requests meanwhile)."""
        old = self.policy
        if new is None:
            log.error("policy reload refused %s", kv(in_force=old.hash[:16], error=str(error)))
            if self.audit is not None:
                self.audit.lifecycle(
                    "policy-reload", result="refused", error=str(error), old=old.hash, new=None,
                    kept=old.hash, **how,
                )  # fmt: skip
            return False
        self.set_policy(new)
        log.info("policy reloaded %s", kv(old=old.hash[:16], new=new.hash[:16]))
        if self.audit is not None:
            self.audit.lifecycle(
                "policy-reload", result="ok", old=old.hash, new=new.hash, source=new.source, **how
            )
        return True

    # -- one request ----------------------------------------------------------------------------------

    def _lookup_for(self, res: Resolution) -> ObjectLookup:
        """The rules' view of the resolved object (asked only when a rule needs it); with an id map, its
        owner as the guest sees it, since the rules speak the guest's ids."""
        return ObjectLookup(res, self.ids)

    def _decide(self, request: p.Request, res: Resolution) -> tuple[Decision, p.Request, ObjectLookup]:
        """Decide on what the resolution reached: the canonical path(s), the resolved object, and every
        directory a '..' walked out of (the guest may not learn, through '..', what it may not read)."""
        first, second = res.first, res.second
        decided = request
        if second is not None:
            if first.path != request.path or second.path != request.path2:  # type: ignore[union-attr]
                decided = replace(request, path=first.path, path2=second.path)  # type: ignore[call-arg]
        elif first.path != request.path:
            decided = replace(request, path=first.path)  # type: ignore[call-arg]
        seen = self._lookup_for(res)
        decision: Decision = decide(decided, self.policy, seen)
        if res.through and decision.outcome != "deny":
            for here in res.through:
                walked = decide(p.Lstat(here), self.policy)
                worse = walked.outcome == "would-deny" and decision.outcome == "allow"
                if walked.outcome == "deny" or worse:
                    reason = f"{walked.reason} (a '..' in the path walks out of {os.fsdecode(here)})"
                    decision = walked._replace(reason=reason)
                    break
        return decision, decided, seen

    def handle(self, request: p.Request) -> Result:
        """Resolve once, decide on what was reached, check the tenant's limits and id map, perform only
        if allowed (on the same fds), record (before the reply), return what to reply."""
        # On the request path: locals and prebound methods, no dict for the record's extras unless
        # there are some (an LSTAT costs tens of microseconds of cold Python; every call counts).
        if self.rate is not None:
            self.rate.take()  # over the rate: the guest waits, nothing fails
        start = _perf_counter_ns()
        res = self.executor.resolve(request)
        try:
            return self._handle(request, res, start)
        finally:
            res.close()

    def _handle(self, request: p.Request, res: Resolution, start: int) -> Result:
        decision, decided, seen = self._decide(request, res)
        outcome = decision.outcome
        rule, reason = decision.rule, decision.reason
        extra: dict[str, object] | None = None
        if outcome == "deny":
            result = Result(decision.errno)
            self.stats.denied += 1
        else:
            ids = self.ids
            try:
                if self.truncate_max is not None:
                    check_truncate(request, self.truncate_max)
                performed = ids.to_host(request) if ids is not None else request
            except Refused as refusal:  # limits and the id map hold even under enforcement: permissive
                outcome, rule, reason = "deny", refusal.rule, refusal.reason
                result = Result(refusal.errno)
                self.stats.denied += 1
            else:
                if performed is not request:
                    extra = {"host_uid": performed.uid, "host_gid": performed.gid}  # type: ignore[union-attr]
                try:  # fail closed: performed only once its record is sure to find room in the trail
                    if self.audit is not None:
                        self.audit.reserve(request, reason, decided.path, getattr(decided, "path2", b""))
                except OSError as exc:  # TrailFull or TrailFailed: not performed, EIO, recorded if it fits
                    if not isinstance(exc, TrailFailed):  # a failed trail says so once, not once a request
                        log.error(
                            "request not performed %s", kv(reason="no room in the trail", reply="EIO")
                        )
                    result = Result(errno.EIO)
                    extra = {**(extra or {}), "not_performed": exc.strerror}
                else:
                    result = self.executor.perform(performed, res)
                    if ids is not None and request.type is p.RequestType.LSTAT and not result.errno:
                        result.payload = ids.stat_payload_to_guest(result.payload)
        audit = self.audit
        if audit is not None:
            if seen.asked:
                # The object facts the decision used, so that a replay decides on them too.
                if extra is None:
                    extra = {}
                extra["object"] = object_facts(seen.found)
            if decided is not request:
                if extra is None:
                    extra = {}
                extra["resolved"] = os.fsdecode(decided.path)
                if request.type in _TWO_PATHS:
                    extra["resolved2"] = os.fsdecode(decided.path2)  # type: ignore[union-attr]
            code = result.errno
            try:
                audit.request(
                    request,
                    decision=outcome,
                    rule=rule,
                    reason=reason,
                    result=errno_name(code) if code else "ok",
                    us=(_perf_counter_ns() - start) / 1000,
                    **(extra or _NO_EXTRA),
                )
                if self.rate is not None and (hits := self.rate.summary_due()) is not None:
                    audit.lifecycle("limit", limit="rate", **hits)
            except OSError as exc:
                # Fail closed: a reply the trail lacks must not be sent. The request may have been
                # performed; the guest is told it failed, and the log says why.
                if not isinstance(exc, TrailFailed):  # a failed trail says so once, not once a request
                    log.error("audit record not written %s", kv(error=str(exc), reply="EIO"))
                if result.fd is not None:
                    os.close(result.fd)
                return Result(errno.EIO)
        return result

    def serve(self, *, compiled_requests: bool = True) -> ServeStats:
        """Serve until the client goes away or the stream can no longer be framed; never raises for
        anything the peer sends. The loop is the compiled one (gateway/fastloop.pyx): it serves the
        common requests itself and hands every other frame to serve_event. ``compiled_requests=False``
        hands it every frame (the tests' way of holding the two side by side)."""
        self.loop = CompiledLoop(self, compiled_requests=compiled_requests)
        return self.loop.serve()  # type: ignore[no-any-return]

    def serve_client(self, sock: socket.socket) -> ServeStats:
        """A new session on this server (its policy, trail and reload worker carry over): serve sock
        until the client goes away."""
        self.sock = sock
        self.decoder = p.Decoder()
        self.stats = ServeStats()
        return self.serve()

    def serve_event(self, event: p.Event) -> bool:
        """One decoded event (a request or a rare one): handled, recorded and answered; False ends the
        session. The compiled loop hands every frame it does not serve itself to this."""
        if type(event) in _REQUEST_CLASSES:
            self.stats.requests += 1
            try:
                self.reply(event, self.handle(event))  # type: ignore[arg-type]
                if self.signals_pending and not self.act_on_signals():
                    return False
            except OSError as exc:
                self.stats.end = f"write error: {exc.strerror}"
                return False
            return True
        return self._rare_event(event)

    def _rare_event(self, event: p.Event) -> bool:
        """Everything but a request and NeedData: answer or record it; False ends the session."""
        stats = self.stats
        if isinstance(event, p.Closed):
            stats.end = "client closed the connection"
            return False
        if isinstance(event, p.Fatal):
            stats.end = f"protocol error: {event.reason}"
            log.warning("closing the connection %s", kv(reason=event.reason))
            if self.audit is not None:
                self.audit.lifecycle("protocol-error", reason=event.reason, result="connection closed")
            return False
        try:
            if isinstance(event, p.Malformed):
                stats.malformed += 1
                log.warning(
                    "payload too short %s", kv(type=event.rtype.name, size=event.size, reply="ENOBUFS")
                )
                self.record_protocol_error(event.rtype, event.size, "payload too short", "ENOBUFS")
                self.sock.sendall(p.encode_error(event.rtype, errno.ENOBUFS))
            elif isinstance(event, p.Unknown):
                stats.unknown += 1
                log.warning(
                    "unknown request type %s", kv(type=int(event.rtype), size=event.size, reply="EOPNOTSUPP")
                )
                self.record_protocol_error(event.rtype, event.size, "unknown request type", "EOPNOTSUPP")
                self.sock.sendall(p.encode_status(errno.EOPNOTSUPP))
            else:  # NeedData subclasses or anything new: never expected
                raise AssertionError(f"unexpected decoder event {event!r}")
        except OSError as exc:
            stats.end = f"write error: {exc.strerror}"
            return False
        return True

    def record_protocol_error(self, rtype: int, size: int, reason: str, answer: str) -> None:
        if self.audit is not None:
            self.audit.lifecycle("protocol-error", type=rtype, size=size, reason=reason, result=answer)

    def fd_not_sent(self, rtype: p.RequestType, why: str) -> None:
        """An OPEN/CREATE whose fd the kernel refused to send (ETOOMANYREFS): answered EMFILE instead."""
        log.warning("fd not sent %s", kv(type=rtype.name, reason=why, reply="EMFILE"))
        if self.audit is not None:
            self.audit.lifecycle("reply-changed", op=rtype.name.lower(), result="EMFILE")
        self.sock.sendall(p.encode_fd_reply(errno.EMFILE))

    def reply(self, request: p.Request, result: Result) -> None:
        shape = _SHAPES[request.type]
        if shape is _FD:
            if result.fd is None:
                self.sock.sendall(p.encode_fd_reply(result.errno or errno.EIO))
                return
            try:
                self.sock.sendmsg(
                    [p.encode_fd_reply(0)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [result.fd]))],
                )
            except OSError as exc:
                if exc.errno != errno.ETOOMANYREFS:
                    raise
                # Too many fds in flight: a client that pipelines OPENs without reading the replies has
                # more of our fds queued than our RLIMIT_NOFILE, and the kernel refuses this one. Nothing
                # was sent, so answer this request with an error (EMFILE: the open(2) errno closest to
                # "out of descriptors") instead of ending the session as a write error.
                self.fd_not_sent(request.type, exc.strerror or "")
            finally:
                os.close(result.fd)
        elif shape is _STATUS or result.errno:
            self.sock.sendall(p.encode_status(result.errno))
        else:
            self.sock.sendall(p.encode_payload(result.payload))
