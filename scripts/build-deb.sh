#!/usr/bin/env bash
# A .deb of gateway, with Debian's own dpkg-deb: the venv at /opt/gateway (the pinned dependencies,
# constraints.txt), /usr/bin/gateway and gateway-proxy-helper symlinks into it, the systemd units and
# their generator, the logrotate snippet, the man pages and the bash/zsh completions.
#
#   scripts/build-deb.sh OUTDIR [WHEEL]     -> OUTDIR/gateway_VERSION-1_ARCH.deb
#
# WHEEL: an already built gateway wheel (default: built here from the checkout). The man pages and
# completions are generated with the venv being packaged. Needs python3-venv, gcc, python3-dev,
# libssl-dev, libcap-dev (scripts/setup.sh installs them).
#
# Relocation: a venv's scripts carry the absolute path of its python in their shebangs. The venv is
# built inside a staging root at STAGE/opt/gateway, then every occurrence of STAGE/opt/gateway in its
# scripts and pyvenv.cfg is rewritten to /opt/gateway, and its bytecode recompiled with /opt/gateway
# paths (compileall -s STAGE -p /). Nothing else in a venv names its own location: bin/python links
# to /usr/bin/python3, which the package depends on (python3.11: the compiled modules are cp311).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: build-deb.sh OUTDIR [WHEEL]}
wheel=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PIP_CONSTRAINT="$repo/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=/opt/gateway

if [ -z "$wheel" ]; then
    "$repo/.venv/bin/pip" wheel -q --no-deps -w "$work/wheel" "$repo"
    wheel=$(ls "$work"/wheel/gateway-*.whl)
fi
wheel=$(realpath "$wheel")

/usr/bin/python3 -m venv "$stage$venv"
"$stage$venv/bin/pip" install -q "gateway[docs] @ file://$wheel"
version=$("$stage$venv/bin/python" -c 'import gateway; print(gateway.__version__)')
arch=$(dpkg --print-architecture)

# the docs, generated from the packaged code, before the venv is relocated
"$repo/scripts/build-docs.sh" "$work/docs" "$stage$venv/bin/python" >/dev/null
# pip, setuptools and the docs tools are the build's, not the package's
"$stage$venv/bin/pip" uninstall -q -y argparse-manpage shtab pip setuptools
rm -f "$stage$venv"/bin/argparse-manpage "$stage$venv"/bin/shtab

# relocate: STAGE/opt/gateway -> /opt/gateway
grep -rlF "$stage$venv" "$stage$venv/bin" "$stage$venv/pyvenv.cfg" | while read -r f; do
    sed -i "s|$stage$venv|$venv|g" "$f"
done
find "$stage$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
"$stage$venv/bin/python" -m compileall -q -j 0 -s "$stage" -p / "$stage$venv/lib" >/dev/null
if grep -rqF "$stage" "$stage$venv"; then
    echo "build-deb: the staging path is still named in:" >&2
    grep -rlF "$stage" "$stage$venv" >&2
    exit 1
fi

install -d "$stage/usr/bin"
ln -s "$venv/bin/gateway" "$stage/usr/bin/gateway"
ln -s "$venv/bin/gateway-proxy-helper" "$stage/usr/bin/gateway-proxy-helper"
ln -s "$venv/bin/gateway-virtiofsd" "$stage/usr/bin/gateway-virtiofsd"
install -D -m 0644 "$repo/contrib/vhost-user/50-gateway-virtiofsd.json" \
    "$stage/usr/share/qemu/vhost-user/50-gateway-virtiofsd.json"
install -D -m 0644 "$repo/contrib/systemd/gateway@.service" "$stage/lib/systemd/system/gateway@.service"
install -D -m 0644 "$repo/contrib/systemd/gateway@.socket" "$stage/lib/systemd/system/gateway@.socket"
install -D -m 0755 "$repo/contrib/systemd/gateway-env-generator" \
    "$stage/usr/lib/systemd/system-generators/gateway-env-generator"
install -D -m 0644 "$repo/contrib/logrotate/gateway" "$stage/etc/logrotate.d/gateway"
install -d "$stage/usr/share/man/man1"
for page in "$work"/docs/man/man1/*.1; do
    gzip -9n < "$page" > "$stage/usr/share/man/man1/$(basename "$page").gz"
done
# the .so link is read by man from the same directory: point it at the compressed page's name
printf '.so man1/gateway-serve.1\n' | gzip -9n > "$stage/usr/share/man/man1/gateway-proxy-helper.1.gz"
install -D -m 0644 "$work/docs/completions/bash/gateway" "$stage/usr/share/bash-completion/completions/gateway"
install -D -m 0644 "$work/docs/completions/zsh/_gateway" "$stage/usr/share/zsh/vendor-completions/_gateway"
install -D -m 0644 "$repo/README.md" "$stage/usr/share/doc/gateway/README.md"
install -d -m 0755 "$stage/etc/gateway/tenants"

install -d "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: gateway
Version: $version-1
Architecture: $arch
Maintainer: gateway maintainers <root@localhost>
Installed-Size: $size
Depends: python3.11, libseccomp2, libcap2, libssl3
Recommends: qemu-system-x86, logrotate
Section: admin
Priority: optional
Description: policy-enforcing, audited, confined replacement for virtfs-proxy-helper
 gateway serves QEMU's 9p proxy file system protocol (-fsdev proxy) like virtfs-proxy-helper, with
 every request decided by a YAML policy, performed beneath the export's root and recorded in a
 hash-chained audit trail, inside a chroot, Landlock and seccomp sandbox.
 .
 The program and its Python dependencies live in a virtualenv in /opt/gateway.
CONTROL
echo "/etc/logrotate.d/gateway" > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTINST
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
# bytecode Python wrote beside the package's files
if [ "$1" = remove ] || [ "$1" = purge ]; then
    rm -rf /opt/gateway
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"
deb="$out/gateway_${version}-1_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "build-deb: $deb"
