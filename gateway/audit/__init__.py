"""The audit trail: the writer on the request path, and the readers behind `gateway audit`.

Only the writer's side is imported here; it must stay light (no rich: a rich line costs 100-500 µs).
The review side (reader, verify, filters, views, console) is imported by those who need it.
"""

from gateway.audit.fields import request_fields, request_fragment
from gateway.audit.writer import (
    ZERO_HASH,
    AuditError,
    AuditWriter,
    TrailFailed,
    TrailFull,
    default_audit_path,
)

__all__ = [
    "ZERO_HASH", "AuditError", "AuditWriter", "TrailFailed", "TrailFull", "default_audit_path",
    "request_fields", "request_fragment",
]  # fmt: skip
