# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The compiled serve loop: socket -> frame -> resolve -> decide -> perform -> record -> reply in C for
the requests a guest sends most -- LSTAT, GETVERSION, STATFS, READLINK, OPEN, CREATE, CHMOD, UTIME and
REMOVE, all but a few percent of a guest's requests -- and every other frame handed to the Python
pipeline (gateway/server.py) through ``Server.serve_event``. The system calls are in fastloop_c.h.

One source of behaviour. The Python pipeline is the definition; this loop serves only the inputs on
which its answer is already known to be the pipeline's, and hands over everything else:

* a path of printable ASCII (no '"' or '\\': its JSON is itself), not empty, no '.' or '..' component,
  no trailing slash, shorter than PATH_MAX;
* a resolution with no symlink on the way (openat2 RESOLVE_NO_SYMLINKS succeeds, or stops at a missing
  name or a non-directory, where the pipeline's ``heading`` is the normalised path too);
* a decision that needs nothing but the request itself: decided by the Python engine the first time
  (with a lookup that refuses to answer: a rule that needs the object sends the request to the
  pipeline, which records the object facts it decided on), then kept in a table keyed by (op, the
  request's fixed fields, canonical path) until the policy changes;
* the common forms: OPEN without O_CREAT or O_NOFOLLOW, CREATE of a name that does not exist (with
  O_CREAT, ids that are not -1, no O_DIRECTORY or O_TMPFILE);
* no rate limit; with an id map (policy ``ids:``), no CREATE (the pipeline maps its owner and records
  the host's ids), and LSTAT's owner shown through the map as the pipeline shows it;
* a trail in its plain state (no notes pending, no syslog or console
  copies): the record is composed here, byte for byte as the writer composes it, hashed with
  OpenSSL's SHA-256 and written with one write(2) into room reserved beforehand.

tests/test_fastloop.py holds the two side by side: every reply and every record of the compiled loop
equals the pipeline's for the same requests on the same tree, and every input outside the list above
is served by the pipeline. No Python object is built for a request served here (the table's keys and
the record live in C buffers); a decision's first computation builds them once.

The module in the pipeline's order: this file frames, resolves, performs and replies (CompiledLoop);
fastloop_table.pxi decides (DecisionTable); fastloop_trail.pxi records (TrailRecorder, which holds the
trail's state while C serves and hands it to the AuditWriter whenever Python code runs); fastloop_c.h
holds the system calls, each the C form of a step gateway/core defines.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memmove, memcmp
from libc.stdlib cimport malloc, calloc, free
from libc.errno cimport errno
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals

import logging
import os
import signal
import struct

from gateway import protocol as p
from gateway.audit import writer as _writer
from gateway.audit.fields import request_fragment
from gateway.core import executor as _executor
from gateway.names import OP_NAMES, errno_name
from gateway.logfmt import kv
from gateway.rules import decide

log = logging.getLogger("gateway.server")

cdef extern from "fastloop_c.h" nogil:
    struct gw_fsids:
        int have_caps
        int cached
    int gw_openat2(int dirfd, const char *path, uint64_t flags)
    void gw_put16(unsigned char *out, uint16_t v)
    void gw_put32(unsigned char *out, uint32_t v)
    void gw_put64(unsigned char *out, uint64_t v)
    uint32_t gw_get32(const unsigned char *data)
    uint64_t gw_get64(const unsigned char *data)
    int gw_lstat_at(int dirfd, const char *name, unsigned char *payload)
    int gw_statfs_payload(int fd, unsigned char *out)
    int gw_fd_type(int fd)
    int gw_openable_type(int type)
    int gw_reopen(int proc_fd, int fd, int flags)
    int gw_getversion(int proc_fd, int fd, uint64_t *out)
    int gw_chmod_fd(int proc_fd, int fd, unsigned int mode)
    int gw_utime_at(int dirfd, const char *name, const unsigned char *times)
    int gw_remove_at(int dirfd, const char *name)
    int gw_fsids_enter(gw_fsids *f, uint32_t uid, uint32_t gid, uint32_t euid, uint32_t egid)
    void gw_fsids_exit(gw_fsids *f, uint32_t euid, uint32_t egid)
    int gw_create_at(int dirfd, const char *name, int flags, unsigned int mode)
    ssize_t gw_send_fd(int sock, int fd)
    int gw_sha256_hex(const unsigned char *data, size_t n, char *hex)
    int64_t gw_mono_ns()
    int64_t gw_real_us()
    int gw_time_prefix(int64_t sec, char *out, size_t cap)
    int gw_us_text(int64_t ns, char *out, size_t cap)
    uint64_t gw_fnv1a(const unsigned char *s, size_t n, uint64_t h)
    int gw_wrap_signal(int sig, int sock)
    void gw_unwrap_signal(int sig)
    int gw_signals_seen(int sock, long idle_ms)
    int O_PATH, O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, O_CREAT
    int O_TMPFILE, S_IFDIR, AT_SYMLINK_NOFOLLOW
    uint64_t UTIME_OMIT
    int openat(int dirfd, const char *path, int flags)
    int close(int fd)
    int fstatat(int dirfd, const char *name, void *st, int flags)
    ssize_t readlinkat(int dirfd, const char *name, char *buf, size_t n)
    uint32_t geteuid()
    uint32_t getegid()
    ssize_t write(int fd, const void *buf, size_t n)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int fdatasync(int fd)
    int snprintf(char *out, size_t cap, const char *fmt, ...)
    int EAGAIN, EINTR, ENOENT, ENOTDIR, ENXIO, EIO, EINVAL, ETOOMANYREFS
    struct stat_buf "stat":
        pass

cdef enum:
    RBUF = 262144             # the receive buffer: a frame is at most 8 + 65536 bytes
    MAX_PAYLOAD = 65536       # protocol.MAX_PAYLOAD: a larger size field is fatal
    LINE_CAP = 32768          # a record composed here: a path under PATH_MAX plus bounded texts
    PATH_MAX = 4096
    SLOTS = 32768             # the decision table (a power of two); cleared when 3/4 full
    MAX_ENTRIES = 4096        # distinct (fields, decision) fragments kept; cleared when full
    KEY_MAX = 1 + 32 + PATH_MAX

cdef enum:
    T_OPEN = 2
    T_CREATE = 3
    T_LSTAT = 8
    T_READLINK = 9
    T_STATFS = 10
    T_CHMOD = 11
    T_UTIME = 14
    T_REMOVE = 16
    T_GETVERSION = 21
    HANDED = 0                # not served here: the frame goes to the pipeline
    SERVED = 1
    END = 2                   # the session ends (a write error on the socket)

cdef enum:
    OUT_ALLOW = 0
    OUT_WOULD_DENY = 1
    OUT_DENY = 2

cdef enum:
    SHAPE_PAYLOAD = 0
    SHAPE_STATUS = 1
    SHAPE_FD = 2

cdef inline int _err(int e) noexcept nogil:
    return e if e else EIO


cdef inline bint _plain_byte(unsigned char c) noexcept nogil:
    # Printable ASCII but '"' and '\\': json's encode_basestring_ascii leaves it as it is.
    return 0x20 <= c <= 0x7E and c != 0x22 and c != 0x5C


_quote = _writer.quote
# The signals whose Python handlers the loop wraps (see fastloop_c.h): reload, reopen, the reload
# worker's "ready" (gateway.reload_worker), stop.
_WRAPPED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM)

include "fastloop_table.pxi"
include "fastloop_trail.pxi"


SERVED_TYPES = frozenset(_SERVED)  # the request types the compiled loop can serve itself
cdef uint32_t _SERVED_MASK = 0
for _t in _SERVED:
    _SERVED_MASK |= 1 << _t
# Per served type, from the protocol's own tables: the size of its fixed fields after the path
# (protocol.LAYOUTS, as _CLASSES unpacks them) and its reply's shape (protocol.reply_shape).
cdef int _TAIL[32]
cdef int _SHAPE[32]
_SHAPES = {p.ReplyShape.FD: SHAPE_FD, p.ReplyShape.STATUS: SHAPE_STATUS, p.ReplyShape.PAYLOAD: SHAPE_PAYLOAD}
for _t in _SERVED:
    _TAIL[_t] = _CLASSES[_t][1].size
    _SHAPE[_t] = _SHAPES[p.reply_shape(p.RequestType(_t))]


cdef class CompiledLoop:
    """Serves one connection (``Server.sock``) with ``Server``'s policy, executor fds and trail."""

    cdef object server, decoder, stats
    cdef DecisionTable table
    cdef TrailRecorder trail      # None without a trail
    cdef long idle_ms             # the receive timeout while idle: the trail's checkpoint_seconds (0: none)
    cdef int sock_fd, root_fd, proc_fd, wakeup_fd
    cdef uint32_t host_euid, host_egid
    cdef gw_fsids ids             # CREATE's switch to the guest's ids (its capability sets kept)
    cdef int valid_open_flags, name_only_flags, tmpfile_bits
    cdef bint getversion_supported, fast_ok, compiled_requests
    # The tenant's id map (policy ids:), or None: LSTAT's owner shown as the guest's ids, CREATE handed
    # over (its record names the host ids). A small cache per direction, filled by the map itself.
    cdef object id_map
    cdef uint32_t id_host[2][64]
    cdef uint32_t id_guest[2][64]
    cdef uint64_t id_known[2]
    cdef unsigned char *rbuf
    cdef Py_ssize_t rpos, rend
    cdef char canon[PATH_MAX + 2]
    cdef Py_ssize_t canon_len, name_off, raw_off, raw_len, tail_off, tail_len
    # counters handed to ServeStats
    cdef uint64_t requests, denied
    # what this loop served and handed over (tests and benchmarks read them)
    cdef public uint64_t served, handed
    # set by Server.request_reload/request_reopen (from a signal handler): act between two requests
    cdef public bint signalled

    def __cinit__(self) -> None:
        self.rbuf = <unsigned char *> malloc(RBUF)
        if not self.rbuf:
            raise MemoryError()

    def __dealloc__(self) -> None:
        free(self.rbuf)

    def __init__(self, server: object, *, compiled_requests: bool = True) -> None:
        self.server = server
        self.compiled_requests = compiled_requests
        self.decoder = server.decoder
        self.stats = server.stats
        self.sock_fd = server.sock.fileno()
        self.root_fd = server.executor.root_fd
        self.proc_fd = server.executor.proc_fd
        self.getversion_supported = bool(server.executor.getversion_supported)
        self.wakeup_fd = -1 if server.wakeup_fd is None else server.wakeup_fd
        self.host_euid = geteuid()
        self.host_egid = getegid()
        self.valid_open_flags = _executor._VALID_OPEN_FLAGS
        self.name_only_flags = _executor._NAME_ONLY_FLAGS
        self.tmpfile_bits = O_TMPFILE & ~O_DIRECTORY
        self.table = DecisionTable()
        self.trail = None if server.audit is None else TrailRecorder(server.audit, _SERVED)
        self.idle_ms = 0 if server.audit is None else int(min(server.audit.checkpoint_seconds, 3600) * 1000)
        self.rpos = self.rend = 0
        self.served = self.handed = 0
        self._pull()

    @property
    def decisions_computed(self) -> int:
        """How many decisions the Python engine computed for the table (the rest were found in it)."""
        return self.table.computed

    # -- state shared with the Python pipeline -------------------------------------------------------

    cdef int _pull(self) except -1:
        """After Python code ran: the policy, the server's limits and the trail's state, taken again."""
        server = self.server
        self.table.set_policy(server.policy)
        self.fast_ok = self.compiled_requests and server.rate is None
        id_map = None if server.ids is None else server.ids.ids
        if id_map is not self.id_map:
            self.id_map = id_map
            self.id_known[0] = self.id_known[1] = 0
        self.ids.cached = 0  # Python code ran: capget again before the next switch
        if self.trail is not None:
            self.trail.pull()
        return 0

    cdef int _push(self) except -1:
        """Before Python code runs: the trail's state and the counters handed back."""
        if self.trail is not None:
            self.trail.push()
        if self.requests or self.denied:
            self.stats.requests += self.requests
            self.stats.denied += self.denied
            self.requests = self.denied = 0
        return 0

    # -- the loop ------------------------------------------------------------------------------------

    def serve(self) -> object:
        """Serve until the client goes away or the stream can no longer be framed (the contract of
        Server.serve); returns the server's ServeStats."""
        cdef uint32_t rtype, size
        cdef Py_ssize_t avail, frame
        cdef ssize_t n
        cdef int r, e
        cdef bint stop
        try:
            for sig in _WRAPPED_SIGNALS:
                if gw_wrap_signal(sig, self.sock_fd) < 0:
                    raise OSError(errno, f"sigaction({sig}): {os.strerror(errno)}")
            if self.idle_ms and gw_signals_seen(self.sock_fd, self.idle_ms) < 0:
                raise OSError(errno, "setsockopt SO_RCVTIMEO: " + os.strerror(errno))
            if self.server.signals_pending and self._signals():
                return self.stats  # those that came while no loop was serving (waiting for the client)
            while True:
                avail = self.rend - self.rpos
                if avail >= 8:
                    memcpy(&rtype, self.rbuf + self.rpos, 4)
                    memcpy(&size, self.rbuf + self.rpos + 4, 4)
                    if size > MAX_PAYLOAD:
                        # Fatal: the pipeline's decoder names it and the session ends.
                        self._hand_over(self.rpos, avail)
                        return self.stats
                    frame = 8 + <Py_ssize_t> size
                    if avail >= frame:
                        r = HANDED
                        if self.fast_ok and rtype < 32 and _SERVED_MASK & ((<uint32_t> 1) << rtype):
                            r = self._serve_fast(rtype, self.rpos + 8, size)
                        if r == END:
                            return self.stats
                        PyErr_CheckSignals()  # run the handlers of signals that came meanwhile
                        stop = self.signalled and self._signals()
                        self.rpos += frame
                        if r == SERVED:
                            self.served += 1
                        else:
                            self.handed += 1
                            if not self._hand_over(self.rpos - frame, frame):
                                return self.stats
                        if stop:
                            return self.stats  # after this frame's reply: no request is cut short
                        if self.rpos == self.rend:
                            self.rpos = self.rend = 0
                        continue
                # Need data: keep what is buffered at the front, wait, read.
                if self.rpos:
                    memmove(self.rbuf, self.rbuf + self.rpos, avail)
                    self.rend = avail
                    self.rpos = 0
                # No poll before the read (one system call less per request): a signal interrupts the
                # blocking recv, and one that lands just before it makes it return at once (EAGAIN,
                # the receive timeout its wrapped handler sets: fastloop_c.h).
                # The GIL is let go while waiting, so that a policy reload compiling in its thread
                # (gateway.reload_worker) runs while the guest is idle, and between two requests.
                with nogil:
                    n = recv(self.sock_fd, self.rbuf + self.rend, RBUF - self.rend, 0)
                    e = errno
                if n < 0:
                    if e == EINTR or e == EAGAIN:
                        if self._signals():
                            return self.stats
                        continue
                    self._push()
                    self.stats.end = f"read error: {os.strerror(e)}"
                    return self.stats
                if n == 0:
                    # EOF: what is left is a truncated frame (Fatal) or nothing (Closed).
                    self._push()
                    if self.rend:
                        self.decoder.feed(PyBytes_FromStringAndSize(<char *> self.rbuf, self.rend))
                        self.rend = 0
                    self.decoder.feed(b"")
                    self.server.serve_event(self.decoder.next_event())
                    return self.stats
                self.rend += n
        finally:
            for sig in _WRAPPED_SIGNALS:
                gw_unwrap_signal(sig)
            self._push()

    cdef int _signals(self) except -1:
        """Run the Python handlers of the signals that came, and act on them (between two requests);
        1: a stop was asked for (SIGTERM or SIGINT), the session ends."""
        cdef bint keep = True
        self.signalled = False
        if gw_signals_seen(self.sock_fd, self.idle_ms) < 0:
            raise OSError(errno, "setsockopt SO_RCVTIMEO: " + os.strerror(errno))
        PyErr_CheckSignals()
        self._push()
        server = self.server
        if self.trail is not None:
            server.audit.checkpoint_if_due()  # (woken by the idle timeout: the records before it sealed)
        if self.wakeup_fd >= 0:
            server._take_wakeup()
        if server.signals_pending:
            keep = server.act_on_signals()
        self._pull()
        return 0 if keep else 1

    cdef bint _hand_over(self, Py_ssize_t start, Py_ssize_t length) except -1:
        """One frame (or the bytes that end the stream) served by the pipeline; False ends the session."""
        self._push()
        self.decoder.feed(PyBytes_FromStringAndSize(<char *> self.rbuf + start, length))
        cont = self.server.serve_event(self.decoder.next_event())
        self._pull()
        return bool(cont)

    # -- one request ---------------------------------------------------------------------------------

    cdef int _canonical(self, Py_ssize_t start, uint32_t size, int tail) noexcept:
        """The frame's path, checked and normalised into self.canon, and where its fixed fields are;
        0 when the pipeline must serve it. self.name_off: where the final component starts in canon."""
        cdef unsigned char *buf = self.rbuf + start
        cdef Py_ssize_t length, full, i, j, comp
        cdef unsigned char c
        if size < 2:
            return 0
        full = buf[0] | (buf[1] << 8)
        if 2 + full + tail > size:
            return 0  # short: the pipeline answers it as Malformed
        self.tail_off = start + 2 + full
        self.tail_len = tail
        buf += 2
        length = full
        for i in range(full):  # a NUL ends the path (QEMU sends one)
            if buf[i] == 0:
                length = i
                break
        if length == 0 or length >= PATH_MAX or buf[length - 1] == 0x2F:
            return 0
        j = 0
        comp = -1
        i = 0
        while i < length:
            c = buf[i]
            if c == 0x2F:
                i += 1
                continue
            if c == 0x2E and (i + 1 == length or buf[i + 1] == 0x2F or
                              (buf[i + 1] == 0x2E and (i + 2 == length or buf[i + 2] == 0x2F))):
                return 0  # '.' or '..'
            self.canon[j] = 0x2F
            j += 1
            comp = j
            while i < length and buf[i] != 0x2F:
                c = buf[i]
                if not _plain_byte(c):
                    return 0
                self.canon[j] = <char> c
                j += 1
                i += 1
        if comp < 0:
            return 0  # only slashes: the root
        self.canon[j] = 0
        self.canon_len = j
        self.name_off = comp
        self.raw_off = start + 2
        self.raw_len = length
        return 1

    cdef int _parent(self, int *dirfd) noexcept:
        """The final component's parent resolved beneath the root (Resolver.name): 0 and *dirfd, or the
        errno that decides the request where it was heading (ENOENT, ENOTDIR: the normalised path);
        -1 when only the pipeline can say (a symlink on the way, anything else)."""
        cdef int e
        if self.name_off == 1:
            dirfd[0] = self.root_fd
            return 0
        self.canon[self.name_off - 1] = 0
        dirfd[0] = gw_openat2(self.root_fd, self.canon, O_PATH | O_DIRECTORY)
        e = errno
        self.canon[self.name_off - 1] = 0x2F
        if dirfd[0] >= 0:
            return 0
        if e == ENOENT or e == ENOTDIR:
            return e
        return -1

    cdef int _serve_fast(self, uint32_t rtype, Py_ssize_t start, uint32_t size) except -1:
        cdef int64_t t0 = gw_mono_ns()
        cdef int dirfd = -1, fd = -1, out_fd = -1, err = 0, r, idx, flags = 0, kind, shape
        cdef Py_ssize_t payload_len = 0
        cdef uint64_t version = 0
        cdef uint32_t uid = 0, gid = 0, mode = 0
        cdef ssize_t n
        cdef Entry *entry
        cdef unsigned char reply[8 + 2 + PATH_MAX + 8]
        cdef unsigned char tail_buf[32]
        if not self._canonical(start, size, _TAIL[rtype]):
            return HANDED
        if self.trail is not None and not self.trail.ok:
            return HANDED
        if self.tail_len:
            memcpy(tail_buf, self.rbuf + self.tail_off, self.tail_len)
        shape = _SHAPE[rtype]
        # Resolve once (gateway/core/resolve.py's forms, for the shapes served here).
        if rtype == T_OPEN:
            flags = <int> gw_get32(tail_buf)
            if flags & (O_CREAT | O_NOFOLLOW | self.tmpfile_bits):
                # Form.CREATE or Form.NOFOLLOW, or O_TMPFILE (whose EINVAL comes before the resolution's
                # errno in Executor._open_or_create): the pipeline's
                return HANDED
        if rtype == T_UTIME and gw_get64(tail_buf + 8) == UTIME_OMIT and gw_get64(tail_buf + 24) == UTIME_OMIT:
            # utimensat answers 0 for two omitted times before it looks the name up; the pipeline acts on
            # the object it resolved, so a missing name is ENOENT there: its answer, not the kernel's.
            return HANDED
        if rtype == T_CREATE:
            if self.id_map is not None:
                return HANDED  # the pipeline maps the owner to the host's ids and records both
            flags = <int> gw_get32(tail_buf)
            mode = gw_get32(tail_buf + 4)
            uid = gw_get32(tail_buf + 8)
            gid = gw_get32(tail_buf + 12)
            if (not flags & O_CREAT or flags & (O_DIRECTORY | self.tmpfile_bits)
                    or uid == 0xFFFFFFFF or gid == 0xFFFFFFFF):
                return HANDED
        if rtype == T_STATFS or rtype == T_GETVERSION or rtype == T_CHMOD or rtype == T_OPEN:
            # Form.FOLLOW: what the whole path leads to.
            fd = gw_openat2(self.root_fd, self.canon, O_PATH)
            if fd < 0:
                err = errno
                if err != ENOENT and err != ENOTDIR:
                    return HANDED
        else:
            r = self._parent(&dirfd)
            if r < 0:
                return HANDED
            err = r
            if not err:
                if rtype == T_LSTAT:
                    # Form.NOFOLLOW, stat only: read now, the object's attributes as they were resolved.
                    if gw_lstat_at(dirfd, self.canon + self.name_off, reply + 8) < 0:
                        err = _err(errno)
                    else:
                        payload_len = 116
                elif rtype == T_CREATE:
                    # Form.CREATE, served only when nothing is there (else the pipeline's rules apply).
                    if fstatat(dirfd, self.canon + self.name_off, <void *> reply, AT_SYMLINK_NOFOLLOW) == 0 \
                            or errno != ENOENT:
                        self._close_dir(dirfd)
                        return HANDED
            elif rtype == T_CREATE:
                return HANDED
        # Decide.
        try:
            idx = self.table.find(rtype, self.rbuf + self.tail_off, self.tail_len, self.canon, self.canon_len)
        except BaseException:  # the engine raised (a bug, or KeyboardInterrupt): nothing left open
            self._close_dir(dirfd)
            if fd >= 0:
                close(fd)
            raise
        if idx < 0:
            self._close_dir(dirfd)
            if fd >= 0:
                close(fd)
            return HANDED
        entry = self.table.entry(idx)
        # Room for the record, before anything is performed (the writer's reserve()).
        if self.trail is not None:
            if not self.trail.has_room(self.raw_len + entry.weight + self.canon_len, entry.fraglen):
                self._close_dir(dirfd)
                if fd >= 0:
                    close(fd)
                return HANDED  # the pipeline reserves (fallocate) or refuses
        # Perform (gateway/core/executor.py's operations, on what was resolved).
        if entry.outcome == OUT_DENY:
            err = entry.err
            payload_len = 0
            self.denied += 1
        elif rtype == T_GETVERSION and not self.getversion_supported:
            # As the reference and Executor.getversion: 0 without looking at the path.
            err = 0
            gw_put64(reply + 8, 0)
            payload_len = 8
        elif rtype == T_READLINK and <int> gw_get32(tail_buf) <= 1:
            err = EINVAL  # the reference reads into bufsize - 1 bytes: checked before the path
        elif not err:
            if rtype == T_STATFS:
                if gw_statfs_payload(fd, reply + 8) < 0:
                    err = _err(errno)
                else:
                    payload_len = 88
            elif rtype == T_GETVERSION:
                kind = gw_fd_type(fd)
                if kind < 0 or not gw_openable_type(kind):  # no attributes, or never opened: ENXIO
                    err = ENXIO
                elif gw_getversion(self.proc_fd, fd, &version) < 0:
                    err = _err(errno)
                else:
                    gw_put64(reply + 8, version)
                    payload_len = 8
            elif rtype == T_CHMOD:
                if gw_chmod_fd(self.proc_fd, fd, gw_get32(tail_buf)) < 0:
                    err = _err(errno)
            elif rtype == T_UTIME:
                # By name in the resolved parent (gw_utime_at says why that is the same object).
                if gw_utime_at(dirfd, self.canon + self.name_off, tail_buf) < 0:
                    err = _err(errno)
            elif rtype == T_REMOVE:
                if gw_remove_at(dirfd, self.canon + self.name_off) < 0:
                    err = _err(errno)
            elif rtype == T_READLINK:
                # By name in the resolved parent, as UTIME: readlinkat answers EINVAL for anything but a
                # symlink, as Executor.readlink does after its fstat.
                n = readlinkat(dirfd, self.canon + self.name_off, <char *> reply + 10, PATH_MAX)
                if n < 0:
                    err = _err(errno)
                else:
                    if n > <int> gw_get32(tail_buf) - 1:
                        n = <int> gw_get32(tail_buf) - 1
                    gw_put16(reply + 8, <uint16_t> n)
                    payload_len = 2 + n
            elif rtype == T_OPEN:
                flags &= self.valid_open_flags
                kind = gw_fd_type(fd)
                if kind < 0:
                    err = _err(errno)
                elif flags & O_DIRECTORY and kind != S_IFDIR:
                    err = ENOTDIR
                elif not gw_openable_type(kind):
                    err = ENXIO
                else:
                    out_fd = gw_reopen(self.proc_fd, fd, flags & ~self.name_only_flags)
                    if out_fd < 0:
                        err = _err(errno)
            elif rtype == T_CREATE:
                flags &= self.valid_open_flags
                if gw_fsids_enter(&self.ids, uid, gid, self.host_euid, self.host_egid) < 0:
                    err = _err(errno)
                else:
                    out_fd = gw_create_at(dirfd, self.canon + self.name_off, flags, mode & 0o7777)
                    if out_fd < 0:
                        err = _err(errno)
                    gw_fsids_exit(&self.ids, self.host_euid, self.host_egid)
        self._close_dir(dirfd)
        if fd >= 0:
            close(fd)
        if err:
            payload_len = 0
        self.requests += 1
        # Record, before the reply.
        if self.trail is not None:
            try:
                r = self.trail.record(rtype, <char *> self.rbuf + self.raw_off, self.raw_len, self.canon,
                                      self.canon_len, entry, err, t0)
            except BaseException:
                if out_fd >= 0:
                    close(out_fd)
                raise
            if r < 0:
                err = EIO
                payload_len = 0
                if out_fd >= 0:
                    close(out_fd)
                    out_fd = -1
        if rtype == T_LSTAT and not err and self.id_map is not None:
            # IdTranslator.stat_payload_to_guest: the owner as the guest sees it.
            gw_put32(reply + 8 + 28, self._guest_id(gw_get32(reply + 8 + 28), 0))
            gw_put32(reply + 8 + 32, self._guest_id(gw_get32(reply + 8 + 32), 1))
        # Reply.
        if shape == SHAPE_FD:
            if out_fd >= 0:
                return self._send_fd(rtype, out_fd)
            gw_put32(reply, <uint32_t> (-(err if err else EIO)))
            return SERVED if self._send_all(reply, 4) else END
        if err:
            gw_put32(reply, 1)
            gw_put32(reply + 4, 4)
            gw_put32(reply + 8, <uint32_t> (-err))
            payload_len = 4
        elif shape == SHAPE_STATUS:
            gw_put32(reply, 0)
            gw_put32(reply + 4, 4)
            gw_put32(reply + 8, 0)
            payload_len = 4
        else:
            gw_put32(reply, 0)
            gw_put32(reply + 4, <uint32_t> payload_len)
        return SERVED if self._send_all(reply, 8 + payload_len) else END

    cdef uint32_t _guest_id(self, uint32_t host, int group) except? 0xFFFFFFFF:
        """A host uid (group 0) or gid (group 1) as the guest sees it, through the policy's id map."""
        cdef int slot = host & 63
        cdef uint64_t bit = (<uint64_t> 1) << slot
        if self.id_known[group] & bit and self.id_host[group][slot] == host:
            return self.id_guest[group][slot]
        guest = self.id_map.gid_to_guest(host) if group else self.id_map.uid_to_guest(host)
        self.id_host[group][slot] = host
        self.id_guest[group][slot] = <uint32_t> guest
        self.id_known[group] |= bit
        return <uint32_t> guest

    cdef inline void _close_dir(self, int dirfd) noexcept:
        if dirfd >= 0 and dirfd != self.root_fd:
            close(dirfd)

    cdef int _send_fd(self, uint32_t rtype, int fd) except -1:
        """The fd reply (SCM_RIGHTS). Too many fds in flight (ETOOMANYREFS): the pipeline's answer."""
        cdef ssize_t n = gw_send_fd(self.sock_fd, fd)
        cdef int e = errno
        close(fd)
        if n >= 0:
            return SERVED
        if e != ETOOMANYREFS:
            self._push()
            self.stats.end = f"write error: {os.strerror(e)}"
            return END
        self._push()
        try:
            self.server.fd_not_sent(p.RequestType(rtype), os.strerror(e))
        except OSError as exc:
            self.stats.end = f"write error: {exc.strerror}"
            return END
        self._pull()
        return SERVED

    cdef bint _send_all(self, const unsigned char *data, Py_ssize_t n) except -1:
        cdef ssize_t k
        while n > 0:
            k = send(self.sock_fd, data, n, 0)
            if k < 0:
                if errno == EINTR:
                    continue
                self._push()
                self.stats.end = f"write error: {os.strerror(errno)}"
                return False
            data += k
            n -= k
        return True

def build_info() -> dict[str, str]:
    """Which build of the data plane is serving, for the start record: this module is only ever a C
    extension (there is no interpreted twin), so a start record without it was not served by it."""
    import gateway.fastloop as me

    return {"build": "compiled" if not me.__file__.endswith((".py", ".pyx")) else "interpreted",
            "module": os.path.basename(me.__file__)}
