#!/usr/bin/env bash
# Install what gateway needs on a fresh Debian 12 machine, as root: Debian packages, a virtualenv in
# .venv with the project and its test tools, and (with --full) what the tests need besides: the
# reference helper (qemu-system-common), QEMU, busybox-static, gcc, strace and the guest kernel.
# Idempotent: a second run installs nothing new.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
full=0
[ "${1:-}" = "--full" ] && full=1

say() { echo "setup: $*"; }
[ "$(id -u)" = 0 ] || { echo "setup: run as root (the gateway chroots and keeps capabilities)" >&2; exit 1; }

# Debian packages. libcap-dev and gcc build python-prctl; libseccomp2 is what pyseccomp loads; gcc,
# python3-dev and libssl-dev build the compiled data plane (gateway/fastloop.pyx, Cython 3 from PyPI).
pkgs=(libcap-dev libseccomp2 gcc python3-venv python3-dev libssl-dev)
if [ "$full" = 1 ]; then
    # systemd: systemd-analyze; strace: tests/test_syscall_counts.py and bench/syscalls.py; man-db
    # (systemd-analyze verify --man, the man page tests), zsh (the completion's syntax), logrotate (the
    # snippet rotates a live trail): tests/test_units.py, test_cli_docs.py; dpkg-deb is in dpkg
    pkgs+=(qemu-system-common qemu-system-x86 busybox-static libc6-dev attr systemd strace man-db zsh logrotate)
fi
# shellcheck source=scripts/apt-ensure.sh
. "$repo/scripts/apt-ensure.sh"
apt_ensure "${pkgs[@]}"

# The virtualenv, with the project installed editable and the test tools, every version pinned by
# constraints.txt (PIP_CONSTRAINT, so that pip's isolated build of the data plane obeys it too).
export PIP_CONSTRAINT="$repo/constraints.txt"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import gateway, gateway.fastloop, prctl, seccomp, cerberus, rich, yaml, re2, pytest, hypothesis, shtab, build_manpages" 2>/dev/null \
    || [ pyproject.toml -nt .venv/.installed ] || [ gateway/fastloop.pyx -nt .venv/.installed ] \
    || [ constraints.txt -nt .venv/.installed ]; then
    say "installing the project into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch .venv/.installed
fi

if [ "$full" = 1 ]; then
    [ -x /usr/lib/qemu/virtfs-proxy-helper ] || { echo "setup: the reference helper is missing" >&2; exit 1; }
    scripts/fetch-guest-kernel.sh
fi
say "ready"
