"""The request loop that joins the pipeline: socket bytes -> protocol -> executor -> reply bytes.

Single-threaded on purpose: the executor switches fs ids per request (setfsuid is per thread) and a
request is recorded before its reply is sent, so one request is in flight at a time, as QEMU sends them.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
from dataclasses import dataclass

from gateway import protocol as p
from gateway.executor import Executor, Result

log = logging.getLogger("gateway.server")

_RECV_SIZE = 1 << 18


@dataclass
class ServeStats:
    requests: int = 0
    malformed: int = 0
    unknown: int = 0
    end: str = ""


class Server:
    def __init__(self, sock: socket.socket, executor: Executor) -> None:
        self.sock = sock
        self.executor = executor
        self.decoder = p.Decoder()
        self.stats = ServeStats()

    def serve(self) -> ServeStats:
        """Serve until the client goes away or the stream can no longer be framed; never raises for
        anything the peer sends."""
        sock = self.sock
        decoder = self.decoder
        stats = self.stats
        while True:
            event = decoder.next_event()
            if isinstance(event, p.NeedData):
                try:
                    data = sock.recv(_RECV_SIZE)
                except OSError as exc:
                    stats.end = f"read error: {exc.strerror}"
                    break
                decoder.feed(data)  # b"" is EOF
                continue
            if isinstance(event, p.Closed):
                stats.end = "client closed the connection"
                break
            if isinstance(event, p.Fatal):
                stats.end = f"protocol error: {event.reason}"
                log.warning("closing the connection: %s", event.reason)
                break
            try:
                if isinstance(event, p.Malformed):
                    stats.malformed += 1
                    log.warning("%s payload too short (%d bytes): ENOBUFS", event.rtype.name, event.size)
                    sock.sendall(p.encode_error(event.rtype, errno.ENOBUFS))
                elif isinstance(event, p.Unknown):
                    stats.unknown += 1
                    log.warning("unknown request type %d (%d bytes): EOPNOTSUPP", event.rtype, event.size)
                    sock.sendall(p.encode_status(errno.EOPNOTSUPP))
                else:
                    stats.requests += 1
                    self.reply(event, self.executor.perform(event))
            except OSError as exc:
                stats.end = f"write error: {exc.strerror}"
                break
        return stats

    def reply(self, request: p.Request, result: Result) -> None:
        shape = p.reply_shape(request.type)
        if shape is p.ReplyShape.FD:
            if result.fd is None:
                self.sock.sendall(p.encode_fd_reply(result.errno or errno.EIO))
                return
            try:
                self.sock.sendmsg(
                    [p.encode_fd_reply(0)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [result.fd]))],
                )
            finally:
                os.close(result.fd)
        elif shape is p.ReplyShape.STATUS or result.errno:
            self.sock.sendall(p.encode_status(result.errno))
        else:
            self.sock.sendall(p.encode_payload(result.payload))
