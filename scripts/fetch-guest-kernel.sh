#!/bin/sh
# Fetch the guest kernel used by the real-guest tests (tests/test_guest.py).
#
# Downloads (never installs) Debian 12's generic linux-image-6.1.0-NN-amd64 with `apt-get download`,
# unpacks it with `dpkg -x` and leaves, under .cache/guest/ in the repository (gitignored):
#   vmlinuz                 the kernel image
#   kernel-version          e.g. 6.1.0-56-amd64
#   modules/*.ko            the 9p/virtio modules, uncompressed
#   modules/load-order      their file names, one a line, in the order insmod must load them
#                           (the .deb ships no modules.dep, so the order is fixed here)
#
# Idempotent: when everything is already there it only re-checks the host tools and exits 0.
# On a fresh Debian 12 machine (after `apt-get update`) it also installs the host tools the tests need
# (busybox-static, gcc + libc6-dev for `gcc -static`, qemu-system-x86) when run as root.
# Exits non-zero with a message on failure.
set -eu

die() {
    echo "fetch-guest-kernel: ERROR: $*" >&2
    exit 1
}
say() {
    echo "fetch-guest-kernel: $*"
}

repo=$(cd "$(dirname "$0")/.." && pwd)
cache="$repo/.cache/guest"
mkdir -p "$cache"

# The load order that works for Debian 12's 6.1 kernel (see /work/shared/spec/QEMU-GUEST.md): each module
# only needs ones listed before it.  The -cloud- flavour cannot be used: it has no 9p at all.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci 9pnet 9pnet_virtio netfs fscache 9p"

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian 12 (bookworm) host"
command -v dpkg >/dev/null 2>&1 || die "dpkg not found: this script needs a Debian 12 (bookworm) host"

# --- host tools -------------------------------------------------------------------------------------------
# Ask dpkg rather than probing files: busybox (dynamic) and busybox-static both install /bin/busybox, and
# only the static one can run inside the initramfs without a libc.
have_pkg() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}
missing=""
# gcc -static needs the static C library (libc.a), which is in libc6-dev.
# qemu-system-common ships the reference helper /usr/lib/qemu/virtfs-proxy-helper.
for p in busybox-static gcc libc6-dev qemu-system-x86 qemu-system-common; do
    have_pkg "$p" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        die "missing host packages:$missing -- run as root, or: apt-get install -y --no-install-recommends$missing"
    fi
    say "installing host packages:$missing"
    # shellcheck disable=SC2086  # word splitting of the package list is wanted
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing \
        || die "apt-get install$missing failed (did you run apt-get update?)"
fi

# --- already done? ----------------------------------------------------------------------------------------
complete() {
    [ -s "$cache/vmlinuz" ] && [ -s "$cache/kernel-version" ] && [ -s "$cache/modules/load-order" ] || return 1
    for m in $MODULES; do
        [ -s "$cache/modules/$m.ko" ] || return 1
    done
    return 0
}
if complete; then
    say "already present: $(cat "$cache/kernel-version") in $cache"
    exit 0
fi

# --- which kernel -----------------------------------------------------------------------------------------
# The metapackage linux-image-amd64 depends on exactly one versioned generic image.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
      | sed -n 's/^ *Depends: \(linux-image-[0-9][0-9.]*-[0-9][0-9]*-amd64\)$/\1/p' | head -n 1)
[ -n "$pkg" ] || die "cannot find the kernel behind linux-image-amd64 (run apt-get update first?)"
kver=${pkg#linux-image-}
say "guest kernel package: $pkg"

# --- download (apt-get download writes into the current directory) ---------------------------------------
dl="$cache/download"
mkdir -p "$dl"
deb=$(ls "$dl"/"${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
    # As root, apt drops privileges to _apt for the download, which must then be able to write here;
    # make the directory world-writable only for the download's duration.
    chmod 0777 "$dl"
    (cd "$dl" && apt-get download "$pkg") || { chmod 0755 "$dl"; die "apt-get download $pkg failed"; }
    chmod 0755 "$dl"
    deb=$(ls "$dl"/"${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
    [ -n "$deb" ] || die "apt-get download $pkg left no .deb in $dl"
fi
say "using $deb"

# --- unpack -----------------------------------------------------------------------------------------------
tree="$cache/unpacked"
rm -rf "$tree"
mkdir -p "$tree"
if ! dpkg -x "$deb" "$tree"; then
    # Most likely an interrupted download: drop it so the next run fetches it again.
    rm -f "$deb"
    rm -rf "$tree"
    die "dpkg -x $deb failed; the .deb was removed, run this script again"
fi

[ -s "$tree/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
moddir="$tree/lib/modules/$kver"
[ -d "$moddir" ] || die "no lib/modules/$kver in $deb"

rm -rf "$cache/modules.new"
mkdir -p "$cache/modules.new"
: >"$cache/modules.new/load-order"
for m in $MODULES; do
    # Module files use either _ or - in their names; match both, and any compression suffix.
    alt=$(echo "$m" | tr '_' '-')
    src=$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) \
          | head -n 1)
    [ -n "$src" ] || die "module $m not found under $moddir (is this the -cloud- kernel? it has no 9p)"
    dst="$cache/modules.new/$m.ko"
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" || die "cannot decompress $src" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" || die "cannot decompress $src" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" || die "cannot decompress $src" ;;
        *) die "unknown module file type: $src" ;;
    esac
    echo "$m.ko" >>"$cache/modules.new/load-order"
done

cp "$tree/boot/vmlinuz-$kver" "$cache/vmlinuz.new"
rm -rf "$cache/modules"
mv "$cache/modules.new" "$cache/modules"
mv "$cache/vmlinuz.new" "$cache/vmlinuz"
echo "$kver" >"$cache/kernel-version"
# The full unpacked tree is ~400 MB and only the files above are needed; the .deb stays for re-runs.
rm -rf "$tree"
# Any initramfs built for another kernel is stale now.
rm -f "$cache"/initramfs-*.cpio.gz

complete || die "internal error: $cache is incomplete after unpacking"
say "done: $kver -> $cache/vmlinuz and $cache/modules/"
