# Included by gateway/fastloop.pyx: the trail's record of a request served in C.

cdef class TrailRecorder:
    """Writes the record of a request the compiled loop serves, byte for byte as AuditWriter.request
    composes it (the writer's tests and tests/test_fastloop.py hold the two alike), hashes it with
    OpenSSL's SHA-256 and writes it with one write(2) into room reserved beforehand.

    The trail's state (seq, prev, size, reserved room, sync time) lives here while C serves; push()
    hands it back to the AuditWriter before any Python code runs that could write a record, pull()
    takes it again after (only once per pull: after a push the writer's state is the one in force)."""

    cdef object writer
    cdef bint ok                  # the writer is in its plain state: records can be composed here
    cdef bint owned
    cdef int fd
    cdef uint64_t seq
    cdef char prev[65]
    cdef int64_t size, reserved_end
    cdef double last_sync, interval
    cdef uint64_t cp_due_seq      # the writer's next checkpoint: at this seq, or at this CLOCK_MONOTONIC
    cdef int64_t cp_due_ns
    cdef int sync_mode            # 0 never, 1 every, 2 interval
    cdef bytes head
    cdef int64_t tsec
    cdef char tprefix[40]
    cdef Py_ssize_t tprefix_len
    cdef Py_ssize_t record_fixed, lifecycle_room, escaped
    cdef char *line
    cdef list op_frag             # per request type: '"op":"lstat","path":"'
    cdef list result_text         # per errno below 256: '"ok"', '"ENOENT"', ...

    def __cinit__(self) -> None:
        self.line = <char *> malloc(LINE_CAP)
        if not self.line:
            raise MemoryError()

    def __dealloc__(self) -> None:
        free(self.line)

    def __init__(self, writer: object, served: tuple[int, ...]) -> None:
        self.writer = writer
        self.tsec = -1
        self.record_fixed = _writer._RECORD_FIXED
        self.lifecycle_room = _writer.LIFECYCLE_ROOM
        self.escaped = _writer._ESCAPED
        self.op_frag = [b""] * 32
        for t in served:
            self.op_frag[t] = ('"op":' + _quote(OP_NAMES[p.RequestType(t)]) + ',"path":"').encode("ascii")
        self.result_text = [_quote(errno_name(c) if c else "ok").encode("ascii") for c in range(256)]

    cdef int pull(self) except -1:
        """After Python code ran: the writer's state, taken again."""
        w = self.writer
        self.owned = True
        # Notes for the next record, copies to syslog or a console, a failed writer: only the writer
        # composes such a record (the requests go to the pipeline until it is plain again).
        self.ok = (
            w._failed is None and w._fd >= 0 and not w._first_extra and not w.notes
            and w._syslog is None and w._console is None
        )
        self.seq = w._seq
        prev = w._prev.encode("ascii")
        if len(prev) != 64:
            raise ValueError("the trail's chain head is not a sha256")
        memcpy(self.prev, PyBytes_AS_STRING(prev), 64)
        self.prev[64] = 0
        self.size = w._size
        self.reserved_end = w._reserved_end
        self.fd = w._fd
        self.interval = w.interval
        self.last_sync = w._last_sync
        self.sync_mode = {"never": 0, "every": 1, "interval": 2}[w._sync]
        self.head = w._head.encode("ascii")
        self.cp_due_seq = min(w._cp_due_seq, 1 << 62)
        due = w._cp_due_mono
        self.cp_due_ns = (1 << 62) if due > 4e9 else <int64_t> (due * 1e9)  # (inf: never by time)
        return 0

    cdef int push(self) except -1:
        """Before Python code runs: the trail's state handed back to the writer."""
        if not self.owned:
            return 0
        self.owned = False
        w = self.writer
        w._seq = self.seq
        w._prev = PyBytes_FromStringAndSize(self.prev, 64).decode("ascii")
        w._size = self.size
        w._last_sync = self.last_sync
        return 0

    cdef bint has_room(self, Py_ssize_t texts, Py_ssize_t fraglen) noexcept:
        """The writer's reserve(), before anything is performed: the record's bound (texts: the path,
        the canonical path and twice the reason, in characters) fits in the room allocated past the end
        of the file. False: the pipeline reserves (fallocate) or refuses. A record too long for the
        line buffer goes to the pipeline too."""
        # Everything the line holds but its fixed keys (a few hundred bytes): the head (tenant, policy),
        # the path, the canonical path, the fragment (fields, rule, reason). texts counts the reason
        # twice, so this is an upper bound; composing never passes the buffer's end.
        if texts + fraglen + PyBytes_GET_SIZE(self.head) + 1024 > LINE_CAP:
            return False
        return self.size + self.record_fixed + 2 * PyBytes_GET_SIZE(self.head) + self.escaped * texts \
            + self.lifecycle_room <= self.reserved_end

    cdef int record(self, uint32_t rtype, const char *raw, Py_ssize_t raw_len, const char *canon,
                    Py_ssize_t canon_len, Entry *entry, int err, int64_t t0) except -2:
        """The request's record, composed as AuditWriter.request composes it, hashed, written.
        -1: not written (the writer has failed and says why); the reply is then EIO."""
        cdef char *o = self.line
        cdef Py_ssize_t k
        cdef int64_t us = gw_real_us()
        cdef int64_t sec = us // 1000000
        cdef bytes head = self.head
        cdef bytes opf = self.op_frag[rtype]
        cdef bytes res = self.result_text[err if 0 <= err < 256 else 0]
        cdef ssize_t written
        if err >= 256:
            res = _quote(errno_name(err)).encode("ascii")
        if sec != self.tsec:
            self.tsec = sec
            self.tprefix_len = gw_time_prefix(sec, self.tprefix, sizeof(self.tprefix))
            if self.tprefix_len <= 0:  # no clock reading can make gmtime fail; still, never a bad length
                self.tsec = -1
                return self._failed(EIO, "the record's time could not be formatted")
        k = snprintf(o, 64, '{"seq":%llu,"time":"', <unsigned long long> self.seq)
        o += k
        memcpy(o, self.tprefix, self.tprefix_len)
        o += self.tprefix_len
        k = snprintf(o, 16, '%06lld', <long long> (us % 1000000))
        o += k
        memcpy(o, 'Z"', 2)
        o += 2
        memcpy(o, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
        o += PyBytes_GET_SIZE(head)
        memcpy(o, ',"event":"request",', 19)
        o += 19
        memcpy(o, PyBytes_AS_STRING(opf), PyBytes_GET_SIZE(opf))
        o += PyBytes_GET_SIZE(opf)
        memcpy(o, raw, raw_len)
        o += raw_len
        o[0] = 0x22
        o += 1
        memcpy(o, entry.frag, entry.fraglen)
        o += entry.fraglen
        memcpy(o, ',"result":', 10)
        o += 10
        memcpy(o, PyBytes_AS_STRING(res), PyBytes_GET_SIZE(res))
        o += PyBytes_GET_SIZE(res)
        memcpy(o, ',"us":', 6)
        o += 6
        o += gw_us_text(gw_mono_ns() - t0, o, 32)
        if raw_len != canon_len or memcmp(raw, canon, canon_len):
            memcpy(o, ',"resolved":"', 13)
            o += 13
            memcpy(o, canon, canon_len)
            o += canon_len
            o[0] = 0x22
            o += 1
        memcpy(o, ',"prev":"', 9)
        o += 9
        memcpy(o, self.prev, 64)
        o += 64
        o[0] = 0x22
        o[1] = 0x7D  # }
        cdef Py_ssize_t line_len = (o - self.line) + 2
        o[2] = 0x0A
        if self.size + line_len + 1 + self.lifecycle_room > self.reserved_end:
            # Never met (reserve's bound is above every record's length), but the writer's own rule
            # holds: no write is started that allocated room does not cover.
            self.push()
            try:
                self.writer._ensure_room(line_len + 1 + self.lifecycle_room)
            except OSError as exc:
                self.pull()
                log.error("audit record not written %s", kv(error=str(exc), reply="EIO"))
                return -1
            self.pull()
        written = write(self.fd, self.line, line_len + 1)
        while written < 0 and errno == EINTR:  # a signal while a full pipe blocked the write: retry
            written = write(self.fd, self.line, line_len + 1)
        if written < 0:
            return self._failed(errno, None)
        self.size += written
        if written != line_len + 1:
            # A short write (not for space: it was reserved): the writer finishes it, or fails.
            self.push()
            try:
                self.writer._write_all(PyBytes_FromStringAndSize(self.line, line_len + 1), written)
            except OSError as exc:
                self.pull()
                log.error("audit record not written %s", kv(error=str(exc), reply="EIO"))
                return -1
            self.pull()
        if gw_sha256_hex(<unsigned char *> self.line, line_len, self.prev) < 0:
            return self._failed(EIO, "sha256 failed")
        self.seq += 1
        if self.sync_mode and self._sync() < 0:
            return -1
        if self.seq >= self.cp_due_seq or gw_mono_ns() >= self.cp_due_ns:
            # A checkpoint is due: the writer writes it (sealing, evolving the key) with the state
            # handed over, as for any Python code. A failure latches the writer; this record stands.
            self.push()
            self.writer.checkpoint(False)
            self.pull()
        return 0

    cdef int _sync(self) except -2:
        cdef double mono = gw_mono_ns() / 1e9
        cdef int r
        if self.sync_mode == 1 or mono - self.last_sync >= self.interval:
            r = fdatasync(self.fd)
            while r < 0 and errno == EINTR:
                r = fdatasync(self.fd)
            if r < 0:
                e = errno
                self.push()
                why = f"audit sync of {self.writer.path} failed: {os.strerror(e)}"
                self.writer._fail(why)
                self.pull()
                log.error("audit record not written %s", kv(errno=e, error=why, reply="EIO"))
                return -1
            self.last_sync = mono
        return 0

    cdef int _failed(self, int e, object why) except -2:
        """The record's write failed before any byte reached the file: the writer latches (as its own
        request() does), the reply is EIO."""
        self.push()
        if why is None:
            why = f"audit write to {self.writer.path} failed: {os.strerror(e)}"
        self.writer._fail(why)
        self.pull()
        log.error("audit record not written %s", kv(errno=e, error=why, reply="EIO"))
        return -1


