"""Cerberus, imported without importlib.metadata.

cerberus/__init__ asks importlib.metadata for its own version string, which pulls in email, zipfile,
csv and friends: about 1.5 MB of resident memory in every `gateway serve` (a serving gateway keeps the
schema to validate reloads), for a string nobody reads. During that one import, a stand-in module
answers "not found" (only when nobody has imported the real one yet); Cerberus then calls itself
"unknown", and the real importlib.metadata stays importable for everyone else.
"""

from __future__ import annotations

import sys
import types


def _import_cerberus() -> types.ModuleType:
    if "cerberus" in sys.modules:
        return sys.modules["cerberus"]
    if "importlib.metadata" in sys.modules:  # already paid for (pytest, a CLI): nothing to save
        import cerberus

        return cerberus
    stand_in = types.ModuleType("importlib.metadata")

    class PackageNotFoundError(ModuleNotFoundError):
        pass

    def version(name: str) -> str:
        raise PackageNotFoundError(name)

    stand_in.PackageNotFoundError = PackageNotFoundError  # type: ignore[attr-defined]
    stand_in.version = version  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = stand_in
    try:
        import cerberus
    finally:
        del sys.modules["importlib.metadata"]
    return cerberus


cerberus = _import_cerberus()
TypeDefinition = cerberus.TypeDefinition
Validator = cerberus.Validator
errors = cerberus.errors
