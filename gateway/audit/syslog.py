"""A copy of each audit record to the local syslog socket, as RFC 5424 messages.

The socket is created and connected when the writer opens, before the sandbox forbids socket(); after
that only send() is needed. Sends never block the request path: MSG_DONTWAIT, and a full socket queue
drops the copy and counts it (the file is the record of truth; syslog is the off-host copy).

Message: ``<PRI>1 TIMESTAMP HOST gateway PID MSGID [gateway@32473 seq=".." ...] {json}``
- PRI: facility authpriv (10), because decisions name users' files and authpriv logs are not world-readable;
  severity notice (5) for deny and would-deny, err (3) for protocol errors, info (6) otherwise.
- MSGID: the record's event ("request", "start", ...).
- structured data: seq, tenant, decision, op, rule (those the record has), so a collector can filter
  without parsing the JSON message; 32473 is the IANA example enterprise number (RFC 5612).
"""

from __future__ import annotations

import os
import socket

FACILITY_AUTHPRIV = 10
SEVERITY = {"deny": 5, "would-deny": 5, "protocol-error": 3}
SEVERITY_DEFAULT = 6
SD_ID = "gateway@32473"
APP_NAME = "gateway"
DEFAULT_ADDRESS = "/dev/log"


def sd_escape(value: str) -> str:
    """PARAM-VALUE escaping (RFC 5424 section 6.3.3): backslash, double quote and ] get a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_token(value: str, limit: int) -> str:
    """HOSTNAME / APP-NAME / MSGID are printable US-ASCII without spaces; '-' means unknown."""
    token = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return token or "-"


def _parts(
    event: str, tenant: str, decision: str | None, op: str | None, rule: str | None, hostname: str, pid: int
) -> tuple[str, str, str]:
    """The message around its two varying pieces, time and seq: (before time, before seq, after seq)."""
    severity = SEVERITY.get(decision or event, SEVERITY_DEFAULT)
    params = [f'tenant="{sd_escape(tenant)}"']
    if decision is not None:
        params.append(f'decision="{sd_escape(decision)}"')
    if op is not None:
        params.append(f'op="{sd_escape(op)}"')
    if rule is not None:
        params.append(f'rule="{sd_escape(rule)}"')
    host = _header_token(hostname, 255)
    return (
        f"<{FACILITY_AUTHPRIV * 8 + severity}>1 ",
        f' {host} {APP_NAME} {pid} {_header_token(event, 32)} [{SD_ID} seq="',
        f'" {" ".join(params)}] ',
    )


def format_message(
    *, time: str, event: str, seq: int, tenant: str, decision: str | None, op: str | None,
    rule: str | None, message: bytes, hostname: str, pid: int,
) -> bytes:  # fmt: skip
    before_time, before_seq, after_seq = _parts(event, tenant, decision, op, rule, hostname, pid)
    # The JSON is pure ASCII (the writer escapes everything else), so no BOM is needed (RFC 5424 6.4).
    return (before_time + time + before_seq + str(seq) + after_seq).encode("utf-8") + message


class SyslogSink:
    """A connected datagram socket to the local syslog daemon."""

    __slots__ = ("_parts", "address", "dropped", "errors", "hostname", "last_error", "pid", "sock")

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.dropped = 0  # the daemon's queue was full
        self.errors = 0  # the daemon was gone (restarted, stopped)
        self.last_error = ""
        # The message's fixed parts repeat (a policy has a few rules, a guest a few ops): build them once.
        self._parts: dict[tuple[str, str, str | None, str | None, str | None], tuple[str, str, str]] = {}

    @classmethod
    def connect(cls, address: str = DEFAULT_ADDRESS) -> SyslogSink:
        """Open and connect now (raises OSError: the caller reports it and serves without syslog)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return cls(sock, address)

    def send(
        self, *, time: str, event: str, seq: int, tenant: str, decision: str | None, op: str | None,
        rule: str | None, message: bytes,
    ) -> None:  # fmt: skip
        key = (event, tenant, decision, op, rule)
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= 4096:  # rule ids and tenants are few, but never trust that
                self._parts.clear()
            parts = self._parts[key] = _parts(event, tenant, decision, op, rule, self.hostname, self.pid)
        data = (parts[0] + time + parts[1] + str(seq) + parts[2]).encode("utf-8") + message
        try:
            self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.dropped += 1
        except OSError as exc:
            # ECONNREFUSED: the daemon restarted and its socket is a new one. No reconnect: connect() is
            # outside the sandbox's seccomp allowlist (it would kill the gateway), so the copy is dropped
            # and counted; the trail itself, the record of truth, is unaffected.
            self.errors += 1
            self.last_error = exc.strerror or str(exc)

    def close(self) -> None:
        self.sock.close()
