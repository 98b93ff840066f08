"""Forward-secure seals for the trail's checkpoints: HMAC-SHA256 under a key that evolves at every seal.

Scheme (the model is systemd-journal's Forward Secure Sealing, with its CVE-2023-31439 lesson):

- ``gateway audit keygen`` draws k[0] (32 random bytes). The *verification key* file holds k[0] and is
  meant to leave the host (an auditor's machine, a safe); the *sealing key* file holds (epoch 0, k[0])
  and is given to the gateway (``--audit-seal-key FILE``).
- Checkpoint number i is sealed with k[i]: seal = HMAC-SHA256(k[i], message(checkpoint)). Right after
  the checkpoint is written, the gateway computes k[i+1] = SHA-256("gateway-seal-evolve" || k[i]),
  overwrites its key file in place with (i+1, k[i+1]) (pwrite on an fd opened before the sandbox, then
  fsync) and overwrites k[i] in memory. SHA-256 cannot be run backwards, so whoever takes over the host
  at epoch j learns k[j] and every later key, never an earlier one: the checkpoints sealed before the
  intrusion, and everything their chain heads cover, cannot be resealed.
- The verifier derives k[i] from k[0] and requires the checkpoints' epochs to run 0, 1, 2, ... in trail
  order, each exactly one more than the one before. (A restart may reuse the previous epoch once: a
  crash between writing a checkpoint and evolving the key file leaves the file one epoch behind. Reusing
  an epoch needs that epoch's key, so it gains an intruder nothing.) A seal made with a later key over an
  earlier range therefore fails on its epoch, whatever its MAC: that was CVE-2023-31439.

Why HMAC and not Ed25519: with Ed25519 a verifier would need no secret, but a forward-secure signature
scheme needs a new key pair per epoch whose public halves are committed in advance (or a certified
chain of them), and pyca/cryptography is not a dependency of the gateway. HMAC with a hash-evolved key
is a dozen lines over the standard library and OpenSSL, costs ~2 µs a seal, and the price is that the
verification key is a secret: kept off the host, as FSS keeps its verification key.

What a seal does not do: it does not stop anyone from reading the current key out of a running gateway
(or its key file) and sealing whatever they like from that epoch on. It proves that the records up to
the last checkpoint sealed *before* an intrusion are as they were written.

Erasure is best effort: the key lives in a bytearray that is overwritten in place, but Python and
OpenSSL may have made copies (the HMAC's padded key) that are freed without being wiped.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

EVOLVE = b"gateway-seal-evolve"
ID_TAG = b"gateway-seal-id"
SEAL_TAG = "gateway-seal-v1"
KEY_BYTES = 32

# Both files are one fixed-length text line, so the sealing key file is overwritten in place by one
# pwrite of the same length (no truncate: Landlock may forbid it, and a shorter write would leave a tail).
_SEAL_LINE = re.compile(rb"gateway-seal-key 1 ([0-9a-f]{16}) ([0-9]{20}) ([0-9a-f]{64})\n\Z")
_VERIFY_LINE = re.compile(rb"gateway-verify-key 1 ([0-9a-f]{16}) ([0-9a-f]{64})\n\Z")


def evolve(key: bytes | bytearray) -> bytes:
    """k[i+1] from k[i]."""
    return hashlib.sha256(EVOLVE + bytes(key)).digest()


def key_id(k0: bytes) -> str:
    """A public name for a key pair (k[0]): recorded in each checkpoint, so a verifier tells keys apart."""
    return hashlib.sha256(ID_TAG + k0).hexdigest()[:16]


def seal_message(record: dict[str, Any]) -> bytes:
    """What a checkpoint's seal covers: its position (seq, the range it closes, its epoch, final) and the
    chain head, the hash of the line before it, which in turn covers every line before that."""
    parts = [
        SEAL_TAG, str(record.get("key_id")), str(record.get("epoch")), str(record.get("seq")),
        str(record.get("first")), str(record.get("last")), str(record.get("head")),
        "final" if record.get("final") is True else "open",
    ]  # fmt: skip
    return "\n".join(parts).encode("ascii", "backslashreplace")


def compute_seal(key: bytes | bytearray, record: dict[str, Any]) -> str:
    return hmac.new(bytes(key), seal_message(record), hashlib.sha256).hexdigest()


def _seal_line(kid: str, epoch: int, key: bytes | bytearray) -> bytes:
    return b"gateway-seal-key 1 %s %020d %s\n" % (kid.encode(), epoch, bytes(key).hex().encode())


def keygen(seal_path: str, verify_path: str) -> str:
    """Write a new key pair (both files created, never overwritten, mode 0600); returns the key id."""
    k0 = secrets.token_bytes(KEY_BYTES)
    kid = key_id(k0)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    written: list[str] = []
    try:
        for path, data in (
            (verify_path, b"gateway-verify-key 1 %s %s\n" % (kid.encode(), k0.hex().encode())),
            (seal_path, _seal_line(kid, 0, k0)),
        ):
            fd = os.open(path, flags, 0o600)
            written.append(path)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return kid


@dataclass(frozen=True)
class VerifyKey:
    key_id: str
    k0: bytes

    @classmethod
    def load(cls, path: str) -> VerifyKey:
        with open(path, "rb") as f:
            data = f.read(4096)
        m = _VERIFY_LINE.match(data)
        if m is None:
            raise ValueError(f"{path} is not a gateway verification key (`gateway audit keygen` writes one)")
        k0 = bytes.fromhex(m.group(2).decode())
        if key_id(k0) != m.group(1).decode():
            raise ValueError(f"{path}: the key id does not match the key (the file is damaged)")
        return cls(m.group(1).decode(), k0)


class KeyChain:
    """The verifier's walk along the keys: k[i] for increasing i, each derived from the one before
    (a trail's checkpoints come in epoch order, so deriving the next costs one hash)."""

    def __init__(self, key: VerifyKey) -> None:
        self._epoch = 0
        self._key = key.k0

    def key(self, epoch: int) -> bytes | None:
        """k[epoch], or None for an epoch before the last one asked (keys cannot be run backwards;
        the verifier asks in order)."""
        if epoch < self._epoch:
            return None
        while self._epoch < epoch:
            self._key = evolve(self._key)
            self._epoch += 1
        return self._key


class SealKey:
    """The gateway's sealing key: the key file's fd (opened before the sandbox), the epoch and k[epoch].

    seal() signs one checkpoint; advance() then moves to the next epoch, rewriting the file first."""

    __slots__ = ("_fd", "_key", "epoch", "key_id", "path")

    def __init__(self, fd: int, path: str, kid: str, epoch: int, key: bytes) -> None:
        self._fd = fd
        self.path = path
        self.key_id = kid
        self.epoch = epoch
        self._key = bytearray(key)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SealKey:
        """Open the sealing key file read-write (not through a symlink); ValueError if it is not one."""
        path = os.fspath(path)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(fd, 4096, 0)
            m = _SEAL_LINE.match(data)
            if m is None:
                raise ValueError(f"{path} is not a gateway sealing key (`gateway audit keygen` writes one)")
            key = bytes.fromhex(m.group(3).decode())
            return cls(fd, path, m.group(1).decode(), int(m.group(2)), key)
        except BaseException:
            os.close(fd)
            raise

    def seal(self, record: dict[str, Any]) -> str:
        if self._fd < 0:
            raise ValueError("the sealing key is closed")
        return compute_seal(self._key, record)

    def advance(self, to_epoch: int | None = None) -> None:
        """k[i] -> k[i+1] (or on to to_epoch): the file first (pwrite of the same length, fsync), then
        memory, where the old key is overwritten. OSError if the file cannot be rewritten: the caller
        must stop sealing (a key that cannot be forgotten on disk is no longer forward-secure)."""
        target = self.epoch + 1 if to_epoch is None else to_epoch
        key = bytes(self._key)
        for _ in range(target - self.epoch):
            key = evolve(key)
        line = _seal_line(self.key_id, target, key)
        if os.pwrite(self._fd, line, 0) != len(line):
            raise OSError(5, "short write to the sealing key file")
        os.fsync(self._fd)
        self._key[:] = key  # same length: overwrites the old key's bytes in place
        self.epoch = target

    def close(self) -> None:
        for i in range(len(self._key)):
            self._key[i] = 0
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def fileno(self) -> int:
        return self._fd


def open_seal_key(path: str | None) -> SealKey | None:
    """`gateway serve --audit-seal-key FILE`: the key file opened before the sandbox (its fd is what
    the gateway writes the next key through once confined: pwrite and fsync are in the filter's
    allowlist, and Landlock checks only opens). None without the option. ValueError or OSError: the
    gateway refuses to start, as for a trail it cannot open."""
    if not path:
        return None
    try:
        return SealKey.open(path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open the sealing key {path}: {exc.strerror}") from None
