"""A real QEMU 7.2 guest (Debian's 6.1 kernel, its fuse.ko and virtiofs.ko) mounts `-t virtiofs` a share
served by `gateway virtiofsd`, and by QEMU's own C virtiofsd as the reference, and reads it.

The guest is the 9p harness's (tests/guest: busybox, gtool, the step/expect_fail console protocol);
what differs is appended as a second cpio: an /init that loads the virtio and FUSE modules and mounts
virtiofs instead of 9p, and the modules themselves, taken from the cached kernel package.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import select
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

# As tests/test_guest.py: tests/ is on sys.path (no __init__.py), so the package is `guest`.
try:
    from guest import harness
except ImportError:  # pragma: no cover - depends on the layout of tests/
    from tests.guest import harness  # type: ignore[no-redef]

REFERENCE = ["/usr/lib/qemu/virtiofsd"]
GATEWAY = [sys.executable, "-m", "gateway", "virtiofsd"]
VIRTIO = ["virtio_ring.ko", "virtio.ko", "virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko",
          "virtio_pci.ko"]
BOOT_TIMEOUT = 240.0

SCRIPT = r"""
step read same content "hello, guest" "$(cat $M/hello.txt)"
step readdir eval 'ls -a $M | tr "\n" " "'
step readdir_names same names ". .. big dir escape hello.txt" "$(ls -a $M | tr '\n' ' ' | sed 's/ $//')"
step lsl eval 'ls -l $M/dir'
step stat has_stat $M/hello.txt size=13
step big same sum "$(cat /guest/big.md5)" "$(md5sum $M/big | cut -d" " -f1)"
step subdir same content "bb" "$(cat $M/dir/b)"
step symlink same target "/etc/passwd" "$(readlink $M/escape)"
step df eval 'df $M | tail -n 1'
"""
# Only for the gateway, which serves read-only for now (the reference writes).
READ_ONLY_SCRIPT = r"""
expect_fail create eval 'echo x > $M/new'
expect_fail mkdir mkdir $M/newdir
expect_fail remove rm $M/hello.txt
"""
STEPS = ["mount", "read", "readdir", "readdir_names", "lsl", "stat", "big", "subdir", "symlink", "df",
         "umount"]
READ_ONLY_STEPS = ["create", "mkdir", "remove"]


def _modules(cache: Path) -> dict[str, bytes]:
    """fuse.ko and virtiofs.ko from the cached Debian kernel package (a .deb is an ar archive)."""
    debs = sorted((harness.CACHE / "download").glob("linux-image-*.deb"))
    if not debs:
        pytest.skip("no cached kernel package: run scripts/setup.sh")
    out = cache / "fuse-modules"
    if not (out / "virtiofs.ko").is_file():
        out.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
            for member in archive.getmembers():
                if member.name.endswith(("/fs/fuse/fuse.ko", "/fs/fuse/virtiofs.ko")):
                    data = archive.extractfile(member)
                    assert data is not None
                    (out / os.path.basename(member.name)).write_bytes(data.read())
    return {name: (out / name).read_bytes() for name in ("fuse.ko", "virtiofs.ko")}


def _initramfs(dest: Path, cache: Path, big_md5: str, script: str) -> Path:
    base = harness.build_base_initramfs()
    init = harness.INIT_SCRIPT.read_text()
    nine_p = 'mount -t 9p -o trans=virtio,version=9p2000.L share "$M"'
    assert nine_p in init
    extra = harness.CpioWriter()
    extra.file("init", init.replace(nine_p, 'mount -t virtiofs share "$M"').encode(), 0o755)
    extra.file("guest/script.sh", script.encode(), 0o755)
    extra.file("guest/big.md5", big_md5.encode())
    for name, data in _modules(cache).items():
        extra.file(f"lib/modules/{name}", data)
    order = [*VIRTIO, "fuse.ko", "virtiofs.ko"]
    extra.file("lib/modules/load-order", "".join(f"{m}\n" for m in order).encode())
    dest.write_bytes(base.read_bytes() + gzip.compress(extra.finish(), mtime=0))
    return dest


def _export(root: Path) -> str:
    (root / "dir").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, guest\n")
    big = os.urandom(3 << 20) + b"tail"
    (root / "big").write_bytes(big)
    (root / "dir" / "a").write_bytes(b"a")
    (root / "dir" / "b").write_bytes(b"bb")
    os.symlink("/etc/passwd", root / "escape")
    return hashlib.md5(big).hexdigest()


def _boot(backend: list[str], tmp: Path, script: str) -> tuple[dict[str, harness.Step], str, str]:
    export = tmp / "export"
    md5 = _export(export)
    initrd = _initramfs(tmp / "initrd.gz", tmp, md5, script)
    sock = tmp / "vfs.sock"
    log = (tmp / "backend.log").open("w+")
    back = subprocess.Popen([*backend, f"--socket-path={sock}", "-o", f"source={export}", "-o", "cache=none"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=harness.REPO)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert back.poll() is None and time.monotonic() < deadline, "the back-end did not listen"
            time.sleep(0.05)
        cmd = harness.qemu_command(harness.CACHE / "vmlinuz", initrd, "unused")
        cmd = [*cmd[:cmd.index("-fsdev")],
               "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
               "-chardev", f"socket,id=c0,path={sock}", "-device", "vhost-user-fs-pci,chardev=c0,tag=share"]
        qemu = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        console = b""
        deadline = time.monotonic() + BOOT_TIMEOUT
        assert qemu.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([qemu.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(qemu.stdout.fileno(), 65536)
                if not chunk:
                    break
                console += chunk
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
        try:
            back.wait(10)  # QEMU gone: the back-end ends by itself
        except subprocess.TimeoutExpired:
            back.kill()
            back.wait()
    finally:
        if back.poll() is None:
            back.kill()
            back.wait()
    log.seek(0)
    text = console.decode(errors="replace").replace("\r", "")
    return harness.parse_console(text), text, log.read()


def _skip_unless_ready() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    problems = harness.missing_prerequisites()
    if problems:
        pytest.skip("; ".join(problems))
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not found")


@pytest.mark.guest
@pytest.mark.root
@pytest.mark.parametrize("backend", [pytest.param(GATEWAY, id="gateway"),
                                     pytest.param(REFERENCE, id="reference")])
def test_guest_reads_a_virtiofs_share(backend: list[str], tmp_path: Path) -> None:
    _skip_unless_ready()
    if backend is REFERENCE and not os.access(REFERENCE[0], os.X_OK):
        pytest.skip("QEMU 7.2's virtiofsd is not installed")
    read_only = backend is GATEWAY
    steps, console, log = _boot(backend, tmp_path, SCRIPT + (READ_ONLY_SCRIPT if read_only else ""))
    report = f"--- back-end log ---\n{log[-3000:]}\n--- console ---\n{console[-6000:]}"
    missing = [s for s in STEPS + (READ_ONLY_STEPS if read_only else []) if s not in steps]
    failed = [f"{s.name}: {s.detail}" for s in steps.values() if not s.ok]
    assert not missing and not failed, f"missing {missing}, failed {failed}\n{report}"
    if read_only:
        assert "event_idx=on indirect_desc=on" in log, report  # what Linux 6.1 and QEMU 7.2 take
        # The writes failed because the back-end refused them, not because of something in the guest.
        for name in ("create", "mkdir", "remove"):
            assert "Read-only file system" in steps[name].detail, report
