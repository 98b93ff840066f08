# Included by gateway/fastloop.pyx: the decision table of the requests the compiled loop serves.

cdef struct Slot:
    uint64_t hash
    char *key                 # op byte + the request's fixed fields + canonical path; NULL: empty
    uint32_t keylen
    int entry

cdef struct Entry:
    int outcome
    int err
    const char *frag          # the request's fields after its path, then ,"decision":..,"rule":..,"reason":..
    Py_ssize_t fraglen
    Py_ssize_t weight         # what the reason adds to the record's reserved bound (2 * its length)


class NeedsObject(Exception):
    """Raised by the lookup a first decision gets: the rule deciding it needs the object, so the
    decision is not one of the request alone and the request is served by the pipeline."""


def _no_lookup(_path: str) -> object:
    raise NeedsObject




# Per request type served here: its class, the struct of its fixed fields after the path (the frame's
# order, protocol.LAYOUTS) and their size.
_SERVED = (T_OPEN, T_CREATE, T_LSTAT, T_READLINK, T_STATFS, T_CHMOD, T_UTIME, T_REMOVE, T_GETVERSION)
_CLASSES: dict[int, tuple[type, struct.Struct]] = {}
for _t in _SERVED:
    _cls, _codes = p.LAYOUTS[p.RequestType(_t)]
    assert _codes[0] == "p" and "p" not in _codes[1:] and "s" not in _codes[1:]
    _CLASSES[_t] = (_cls, struct.Struct("<" + "".join({"d": "i", "u": "I", "q": "Q"}[c] for c in _codes[1:])))
_OUTCOMES = {"allow": OUT_ALLOW, "would-deny": OUT_WOULD_DENY, "deny": OUT_DENY}


def request_decision(policy: object, rtype: int, path: bytes, fields: bytes) -> tuple[int, int, bytes, int] | None:
    """The decision of a request of this type on this canonical path with these fixed fields (the
    frame's bytes after the path), with the record's fragment from the fields after the path through
    the reason; None when a rule in play needs the object (then only the pipeline decides it)."""
    cls, tail = _CLASSES[rtype]
    values = tail.unpack(fields)
    try:
        # Any rule that asks for the object sends the request to the pipeline, which records the
        # object facts the decision used (also "none there" for a CREATE of a new name).
        d = decide(cls(path, *values), policy, _no_lookup)
    except NeedsObject:
        return None
    prefix = '"op":' + _quote(OP_NAMES[p.RequestType(rtype)]) + ',"path":""'
    fragment = request_fragment(cls(b"", *values))
    assert fragment.startswith(prefix)
    frag = (
        fragment[len(prefix):]
        + ',"decision":' + _quote(d.outcome)
        + ',"rule":' + ("null" if d.rule is None else _quote(d.rule))
        + ',"reason":' + _quote(d.reason)
    )
    return _OUTCOMES[d.outcome], d.errno, frag.encode("ascii"), 2 * len(d.reason)



cdef class DecisionTable:
    """The decisions of the requests served in C, keyed by (op, the request's fixed fields, canonical
    path): each computed once by the Python engine (request_decision), then found by a hash and a
    memcmp, with no Python object made. Cleared when the policy changes, or when full."""

    cdef object policy
    cdef Slot *slots
    cdef Py_ssize_t used
    cdef Entry *entries
    cdef int n_entries
    cdef unsigned char *key
    cdef list _frags              # the fragments' bytes, which entries point into
    cdef dict _entry_of           # a fragment -> its entry (a policy has few distinct decisions)
    cdef public uint64_t computed

    def __cinit__(self) -> None:
        self.key = <unsigned char *> malloc(KEY_MAX)
        self.slots = <Slot *> calloc(SLOTS, sizeof(Slot))
        self.entries = <Entry *> calloc(MAX_ENTRIES, sizeof(Entry))
        if not self.key or not self.slots or not self.entries:
            raise MemoryError()
        self._frags = []
        self._entry_of = {}

    def __dealloc__(self) -> None:
        self.clear()
        free(self.key)
        free(self.slots)
        free(self.entries)

    cdef int set_policy(self, object policy) except -1:
        if policy is not self.policy:
            self.policy = policy
            self.clear()
        return 0

    cdef void clear(self) noexcept:
        cdef Py_ssize_t i
        if self.slots:
            for i in range(SLOTS):
                if self.slots[i].key:
                    free(self.slots[i].key)
                    self.slots[i].key = NULL
        self.used = 0
        self.n_entries = 0
        if self._frags is not None:
            self._frags.clear()
            self._entry_of.clear()

    cdef inline Entry *entry(self, int idx) noexcept:
        return &self.entries[idx]

    cdef int find(self, uint32_t rtype, const unsigned char *fields, Py_ssize_t fields_len,
                  const char *canon, Py_ssize_t canon_len) except -2:
        """The entry deciding this request: from the table, else computed once by the engine.
        -1: a rule needs the object (the pipeline decides)."""
        cdef Py_ssize_t keylen = 1 + fields_len + canon_len
        cdef unsigned char *k = self.key
        k[0] = <unsigned char> rtype
        memcpy(k + 1, fields, fields_len)
        memcpy(k + 1 + fields_len, canon, canon_len)
        cdef uint64_t h = gw_fnv1a(k, keylen, 14695981039346656037ULL)
        cdef Py_ssize_t mask = SLOTS - 1
        cdef Py_ssize_t i = <Py_ssize_t> (h & mask)
        cdef Slot *s
        while True:
            s = &self.slots[i]
            if s.key == NULL:
                break
            if s.hash == h and s.keylen == keylen and memcmp(s.key, k, keylen) == 0:
                return s.entry
            i = (i + 1) & mask
        # Not known: the engine decides, once.
        if self.n_entries >= MAX_ENTRIES or self.used >= SLOTS * 3 // 4:
            self.clear()
            return self.find(rtype, fields, fields_len, canon, canon_len)
        self.computed += 1
        got = request_decision(
            self.policy, rtype, PyBytes_FromStringAndSize(canon, canon_len),
            PyBytes_FromStringAndSize(<const char *> fields, fields_len),
        )
        if got is None:
            return -1
        outcome, err, frag, weight = got
        idx = self._entry_of.get(frag)
        if idx is None:
            idx = self.n_entries
            self.n_entries += 1
            self._frags.append(frag)
            self._entry_of[frag] = idx
            self.entries[idx].outcome = outcome
            self.entries[idx].err = err
            self.entries[idx].frag = PyBytes_AS_STRING(frag)
            self.entries[idx].fraglen = PyBytes_GET_SIZE(frag)
            self.entries[idx].weight = weight
        s.key = <char *> malloc(keylen)
        if s.key == NULL:
            return <int> idx  # decided, just not kept
        memcpy(s.key, k, keylen)
        s.hash = h
        s.keylen = <uint32_t> keylen
        s.entry = <int> idx
        self.used += 1
        return <int> idx

    def measure(self, policy: object, rtype: int, path: bytes, fields: bytes, repeat: int) -> tuple | None:
        """For bench/bench_rules.py: (ns of the first find, which the engine computes, and ns per find
        after it, a hit: the compiled loop's decision cost for every later request), or None when a rule
        needs the object (the pipeline decides such a request)."""
        cdef int64_t t0, t1, t2
        cdef Py_ssize_t i
        cdef const unsigned char *f = <const unsigned char *> PyBytes_AS_STRING(fields)
        cdef const char *c = PyBytes_AS_STRING(path)
        cdef Py_ssize_t nf = PyBytes_GET_SIZE(fields), nc = PyBytes_GET_SIZE(path)
        self.set_policy(policy)
        t0 = gw_mono_ns()
        if self.find(rtype, f, nf, c, nc) < 0:
            return None
        t1 = gw_mono_ns()
        for i in range(repeat):
            self.find(rtype, f, nf, c, nc)
        t2 = gw_mono_ns()
        return (t1 - t0, (t2 - t1) / repeat)
