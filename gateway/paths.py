"""Lexical path normalisation, the one pure definition shared by the rules (globs match on it), the
canonicaliser (its fallback when nothing resolves) and symlink-target conditions: collapse '//' and '.',
resolve '..' without looking at the file system, clamp at the root. Inside the export, as a chrooted
guest sees it, '/..' is '/'."""

from __future__ import annotations


def normalise(path: str) -> str:
    if "/." not in path and path[:1] != ".":
        # No '.' or '..' component, so only '//' and a trailing '/' to drop: done in C. The loop below
        # costs ~0.1 us a component, and a guest's 4 KiB path has 2,048 of them (that loop was most of
        # the worst decision's time).
        return "/" + "/".join(filter(None, path.split("/")))
    stack: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if stack:
                stack.pop()
        else:
            stack.append(part)
    return "/" + "/".join(stack)


def normalise_bytes(path: bytes) -> bytes:
    return normalise(path.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
