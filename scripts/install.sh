#!/usr/bin/env bash
# Install gateway on Debian 12 without touching the system Python (which refuses `pip install`:
# externally-managed-environment): a virtualenv in /opt/gateway with the pinned dependencies
# (constraints.txt), /usr/local/bin/gateway and gateway-proxy-helper as symlinks into it, the man pages
# and the bash/zsh completions. As root, from a checkout:
#
#   scripts/install.sh                # /opt/gateway, /usr/local/bin, /usr/local/share
#   scripts/install.sh --units        # also the systemd units, the generator and the logrotate snippet
#   scripts/install.sh --uninstall    # remove what the above installed (the trails stay)
#
# Options: --prefix DIR (the venv, default /opt/gateway), --bindir DIR (/usr/local/bin), --datadir DIR
# (/usr/local/share: man/man1, bash-completion, zsh/site-functions), --from WHEEL|DIR (what to install,
# default this checkout, built from source), --no-apt (the build's Debian packages are there already).
# The venv is built at its final path, so its scripts' shebangs are right; to move it, reinstall.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/gateway bindir=/usr/local/bin datadir=/usr/local/share from=$repo apt=1 units=0 uninstall=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift ;;
        --bindir) bindir=$2; shift ;;
        --datadir) datadir=$2; shift ;;
        --from) from=$2; shift ;;
        --no-apt) apt=0 ;;
        --units) units=1 ;;
        --uninstall) uninstall=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "install: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
say() { echo "install: $*"; }
unitdir=/etc/systemd/system generatordir=/usr/local/lib/systemd/system-generators

if [ "$uninstall" = 1 ]; then
    rm -f "$bindir/gateway" "$bindir/gateway-proxy-helper" "$bindir/gateway-virtiofsd" \
        "$datadir/man/man1/gateway.1" "$datadir/man/man1/gateway-serve.1" \
        "$datadir/man/man1/gateway-proxy-helper.1" "$datadir/bash-completion/completions/gateway" \
        "$datadir/zsh/site-functions/_gateway"
    rm -rf "$prefix"
    say "removed $prefix and its links (units, if installed, stay: $unitdir/gateway@.*)"
    exit 0
fi

# Debian packages: the venv module, and what builds the compiled data plane and python-prctl
if [ "$apt" = 1 ]; then
    # shellcheck source=scripts/apt-ensure.sh
    . "$repo/scripts/apt-ensure.sh"
    apt_ensure python3-venv gcc python3-dev libssl-dev libcap-dev libseccomp2
fi

python=${PYTHON:-/usr/bin/python3}
if [ ! -x "$prefix/bin/python" ]; then
    say "creating the venv $prefix with $($python --version)"
    "$python" -m venv "$prefix"
fi
export PIP_CONSTRAINT="$repo/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -d "$from" ]; then target="$from[docs]"; else target="gateway[docs] @ file://$(realpath "$from")"; fi
say "installing $from into $prefix (pinned by constraints.txt)"
"$prefix/bin/pip" install -q --upgrade "$target"
"$prefix/bin/python" -c "import gateway.fastloop" # the compiled data plane is there

mkdir -p "$bindir"
ln -sfn "$prefix/bin/gateway" "$bindir/gateway"
ln -sfn "$prefix/bin/gateway-proxy-helper" "$bindir/gateway-proxy-helper"
ln -sfn "$prefix/bin/gateway-virtiofsd" "$bindir/gateway-virtiofsd"

docs=$(mktemp -d)
trap 'rm -rf "$docs"' EXIT
"$repo/scripts/build-docs.sh" "$docs" "$prefix/bin/python" >/dev/null
install -d "$datadir/man/man1" "$datadir/bash-completion/completions" "$datadir/zsh/site-functions"
install -m 0644 "$docs"/man/man1/*.1 "$datadir/man/man1/"
install -m 0644 "$docs/completions/bash/gateway" "$datadir/bash-completion/completions/gateway"
install -m 0644 "$docs/completions/zsh/_gateway" "$datadir/zsh/site-functions/_gateway"

if [ "$units" = 1 ]; then
    # the units run /opt/gateway/bin/gateway: another --prefix needs a drop-in with its ExecStart
    install -m 0644 "$repo/contrib/systemd/gateway@.service" "$repo/contrib/systemd/gateway@.socket" "$unitdir/"
    install -D -m 0755 "$repo/contrib/systemd/gateway-env-generator" "$generatordir/gateway-env-generator"
    install -D -m 0644 "$repo/contrib/logrotate/gateway" /etc/logrotate.d/gateway
    install -d -m 0755 /etc/gateway /etc/gateway/tenants
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
    say "units in $unitdir: systemctl enable --now gateway@NAME.socket (see gateway@.service)"
fi
say "$("$bindir/gateway" --version) in $prefix, $bindir/gateway"
