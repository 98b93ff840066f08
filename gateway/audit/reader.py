"""Reading trails: plain or gzip-rotated files, ordered by their first seq, streamed line by line.

Memory stays constant whatever the size of the input: lines are yielded as they are read. Progress is
reported to a Progress object (views.RichProgress draws it on stderr; rich stays out of this module).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

GZIP_MAGIC = b"\x1f\x8b"
_PROGRESS_EVERY = 8192  # lines between progress updates (tell() and a redraw are not free)


class ReadError(Exception):
    """A file could not be read to its end (missing, not gzip after all, a truncated .gz)."""

    def __init__(self, path: str, line: int, kind: str, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, int, str, str]]:
        # For --summary's worker processes: the default pickles args, which is not __init__'s signature.
        return (ReadError, (self.path, self.line, self.kind, self.message))


def open_log(path: str) -> tuple[IO[bytes], IO[bytes]]:
    """(the stream of lines, the underlying file whose tell() measures progress); '-' is stdin."""
    if path == "-":
        return sys.stdin.buffer, sys.stdin.buffer
    raw = open(path, "rb")  # noqa: SIM115 (returned to the caller, who closes it)
    try:
        if path.endswith(".gz") or raw.read(2) == GZIP_MAGIC:
            raw.seek(0)
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[return-value]
        raw.seek(0)
    except OSError:
        raw.close()
        raise
    return raw, raw


def iter_lines(path: str, progress: Progress | None = None) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without the newline, whether the newline was there). Raises ReadError."""
    lineno = 0
    try:
        stream, raw = open_log(path)
    except OSError as exc:
        raise ReadError(path, 0, "unreadable file", exc.strerror or str(exc)) from None
    if progress is not None and (not progress.active or path == "-"):
        progress = None  # (stdin cannot tell() its position)
    try:
        for line in stream:
            lineno += 1
            if progress is not None and not lineno % _PROGRESS_EVERY:
                progress.update(raw.tell())
            if line.endswith(b"\n"):
                yield lineno, line[:-1], True
            else:
                yield lineno, line, False
    except EOFError:
        raise ReadError(path, lineno + 1, "truncated compressed file", "the gzip stream ends early") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise ReadError(path, lineno + 1, "unreadable file", f"bad gzip data ({exc})") from None
    except OSError as exc:
        raise ReadError(path, lineno + 1, "unreadable file", exc.strerror or str(exc)) from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
            raw.close()


def first_record(path: str) -> dict[str, Any] | None:
    """The file's first line as a record, or None (empty, unreadable, not JSON)."""
    try:
        for _, data, _complete in iter_lines(path):
            record = json.loads(data)
            return record if isinstance(record, dict) else None
    except (ReadError, ValueError):
        return None
    return None


def order_files(paths: list[str], given: bool = False) -> list[str]:
    """Files in trail order: by their first record's seq (so a shell glob's order does not matter:
    t.jsonl.10.gz sorts before t.jsonl.9.gz by name), files without a first record last, in the order
    given. With given=True, or for stdin, the order is kept as it is."""
    if given or "-" in paths or len(paths) < 2:
        return list(paths)

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        index, path = item
        record = first_record(path)
        seq = record.get("seq") if record else None
        return (0, seq, index) if isinstance(seq, int) else (1, 0, index)

    return [path for _, path in sorted(enumerate(paths), key=key)]


# ---------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Progress over the inputs' total size. This one draws nothing; views.RichProgress draws a bar
    (rich stays out of this module, which --verify and the bench use as well)."""

    def __init__(self, paths: list[str]) -> None:
        total = 0
        for path in paths:
            with contextlib.suppress(OSError):
                total += os.stat(path).st_size if path != "-" else 0
        self.total = total
        self.done = 0
        self.active = False  # whether anything is drawn (readers skip the bookkeeping when not)

    def update(self, position: int) -> None:
        """position: bytes read of the current file."""

    def file_done(self, size: int) -> None:
        self.done += size
        self.update(0)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------
# Records


@dataclass
class ReadStats:
    lines: int = 0
    records: int = 0  # parsed and kept
    bad: int = 0  # lines that are not JSON objects
    first_bad: list[str] = field(default_factory=list)
    errors: list[ReadError] = field(default_factory=list)


def _bad(stats: ReadStats, path: str, lineno: int) -> None:
    stats.bad += 1
    if len(stats.first_bad) < 5:
        stats.first_bad.append(f"{path}:{lineno}")


def iter_records(
    paths: list[str],
    *,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    may_match: Callable[[bytes], bool] | None = None,
    stats: ReadStats | None = None,
    progress: Progress | None = None,
) -> Iterator[dict[str, Any]]:
    """Parsed records of the files in the order given (see order_files), those keep() accepts.
    may_match(raw line) may reject a line before it is parsed. Unreadable lines and files are counted
    in stats and skipped: reviewing goes on; --verify is the place that fails on them."""
    stats = stats if stats is not None else ReadStats()
    loads = json.loads
    if progress is not None and not progress.active:
        progress = None
    for path in paths:
        try:
            stream, raw = open_log(path)
        except OSError as exc:
            stats.errors.append(ReadError(path, 0, "unreadable file", exc.strerror or str(exc)))
            continue
        lineno = 0
        bad_before = stats.bad
        try:
            if keep is None and may_match is None and progress is None:
                # The common case (--summary of everything) in its tightest loop.
                for line in stream:
                    lineno += 1
                    try:
                        record = loads(line)
                    except ValueError:
                        record = None
                    if record.__class__ is dict:
                        yield record
                    else:
                        _bad(stats, path, lineno)
                stats.records += lineno - (stats.bad - bad_before)
                continue
            for line in stream:
                lineno += 1
                if progress is not None and not lineno % _PROGRESS_EVERY and path != "-":
                    progress.update(raw.tell())
                if may_match is not None and not may_match(line):
                    continue
                try:
                    record = loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    _bad(stats, path, lineno)
                    continue
                if keep is None or keep(record):
                    stats.records += 1
                    yield record
        except (EOFError, OSError, zlib.error) as exc:
            kind = "truncated compressed file" if isinstance(exc, EOFError) else "unreadable file"
            stats.errors.append(ReadError(path, lineno + 1, kind, str(exc) or kind))
        finally:
            stats.lines += lineno
            if progress is not None:
                progress.file_done(os.fstat(raw.fileno()).st_size if path != "-" else 0)
            if stream is not sys.stdin.buffer:
                stream.close()
                raw.close()


def follow(
    path: str, offset: int = 0, *, poll: float = 0.25, idle_timeout: float | None = None
) -> Iterator[bytes]:
    """Complete lines appended to path from offset on, forever (or until idle_timeout seconds pass
    without one). Follows rotation: when the name points to a new file, the old one is read to its end
    and the new one from its start; a file truncated in place (copytruncate) is read again from 0."""
    f = open(path, "rb")  # noqa: SIM115 (reassigned on rotation; closed in finally)
    try:
        f.seek(offset)
        partial = b""
        idle_since = time.monotonic()
        while True:
            chunk = f.read(65536)
            if chunk:
                idle_since = time.monotonic()
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()  # a line still being written is kept until its newline comes
                yield from lines
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:  # between logrotate's rename and the writer's reopen
                st = None
            if st is not None and st.st_size and not os.path.samestat(st, os.fstat(f.fileno())):
                # The writer's first record in the new file comes after its last one in the old file,
                # so once the new file has a line, the old one is complete: drain it, then move over.
                rest = partial + f.read()
                lines = rest.split(b"\n")
                yield from lines[:-1]
                if lines[-1]:  # a torn last line: shown as unreadable by the caller
                    yield lines[-1]
                f.close()
                f = open(path, "rb")  # noqa: SIM115
                partial = b""
                continue
            if st is not None and st.st_size < f.tell():
                f.seek(0)
                partial = b""
                continue
            if idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                return
            time.sleep(poll)
    finally:
        f.close()


def _lines_backwards(path: str, block: int = 1 << 20) -> Iterator[bytes]:
    """The file's complete lines, last first (a plain file is read backwards a block at a time: the end
    of a large trail is reached at once; a .gz or stdin has to be read whole first)."""
    stream, raw = open_log(path)
    try:
        if stream is not raw or path == "-":
            lines = stream.read().split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            yield from reversed(lines)
            return
        end = raw.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            start = max(0, end - block)
            raw.seek(start)
            chunk = raw.read(end - start) + rest
            end = start
            parts = chunk.split(b"\n")
            rest = parts[0] if start > 0 else b""
            body = parts[1:] if start > 0 else parts
            for line in reversed(body):
                if line:
                    yield line
        if rest:
            yield rest
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
            raw.close()


def iter_records_reversed(
    paths: list[str],
    *,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    may_match: Callable[[bytes], bool] | None = None,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """iter_records, newest first: the files in reverse order, each read from its end."""
    stats = stats if stats is not None else ReadStats()
    loads = json.loads
    for path in reversed(paths):
        try:
            for line in _lines_backwards(path):
                stats.lines += 1
                if may_match is not None and not may_match(line):
                    continue
                try:
                    record = loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    _bad(stats, path, 0)
                    continue
                if keep is None or keep(record):
                    stats.records += 1
                    yield record
        except (EOFError, OSError, zlib.error) as exc:
            kind = "truncated compressed file" if isinstance(exc, EOFError) else "unreadable file"
            stats.errors.append(ReadError(path, 0, kind, str(exc) or kind))
