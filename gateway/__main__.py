"""`python -m gateway`. SIGHUP and SIGUSR1 are held before anything else is imported: serving's imports
take a few hundred milliseconds, and either signal would kill the process meanwhile (gateway.signals)."""

import sys

if sys.argv[1:2] == ["serve"]:
    from gateway.signals import hold_reload_signals

    hold_reload_signals()

from gateway.cli import main

raise SystemExit(main())
