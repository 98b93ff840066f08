"""Real-guest integration harness: boot a QEMU guest whose 9p share is served by a proxy helper.

See harness.py; the entry point is run_guest().
"""

from .harness import (
    FULL_STEPS,
    GATEWAY_HELPER,
    REFERENCE_HELPER,
    GuestResult,
    GuestSetupError,
    Step,
    check_prerequisites,
    full_script,
    run_guest,
    verify_full_export,
)

__all__ = [
    "FULL_STEPS",
    "GATEWAY_HELPER",
    "REFERENCE_HELPER",
    "GuestResult",
    "GuestSetupError",
    "Step",
    "check_prerequisites",
    "full_script",
    "run_guest",
    "verify_full_export",
]
