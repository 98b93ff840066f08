"""Installing on stock Debian 12 without the system Python: scripts/install.sh (a venv in /opt/gateway,
/usr/local/bin symlinks) and scripts/build-deb.sh (a .deb by dpkg-deb), each installed into a temporary
root and run from outside the checkout: --version, and `gateway demo` with all its steps as expected.
Everything pip installs is pinned by constraints.txt."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_root

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
# a clean environment: nothing from the checkout or this venv leaks into the installed copy
CLEAN = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "COLUMNS": "160", "LANG": "C.UTF-8"}


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def freeze(python: Path | str) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    got = {}
    for line in out.splitlines():
        name, _, version = line.partition("==")
        got[re.sub(r"[-_.]+", "-", name).lower()] = version
    return {k: v for k, v in got.items() if k not in ("pip", "setuptools", "gateway")}


def test_every_installed_package_is_pinned_and_every_installer_uses_the_pins() -> None:
    want = pins()
    have = freeze(sys.executable)
    assert {k: v for k, v in have.items() if want.get(k) != v} == {}, "constraints.txt is out of date"
    for script in ("scripts/setup.sh", "scripts/install.sh", "scripts/build-deb.sh"):
        assert 'PIP_CONSTRAINT="$repo/constraints.txt"' in (ROOT / script).read_text(), script


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PIP_CONSTRAINT": str(CONSTRAINTS)}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, env=env, timeout=600)  # fmt: skip
    (found,) = out.glob("gateway-*.whl")
    return found


def demo(command: list[str], cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, "demo", *extra], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=CLEAN)  # fmt: skip


def test_install_script_gives_a_working_gateway_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    require_root()
    prefix, bindir, datadir = tmp_path / "opt" / "gateway", tmp_path / "bin", tmp_path / "share"
    args = ["--prefix", str(prefix), "--bindir", str(bindir), "--datadir", str(datadir)]
    subprocess.run([str(ROOT / "scripts/install.sh"), *args, "--from", str(wheel), "--no-apt"],
                   check=True, timeout=600, capture_output=True)  # fmt: skip
    gw = bindir / "gateway"
    assert os.readlink(gw) == str(prefix / "bin" / "gateway")
    assert (prefix / "bin" / "gateway").read_text().splitlines()[0] == f"#!{prefix}/bin/python3"
    out = subprocess.run([str(gw), "--version"], capture_output=True, text=True, env=CLEAN, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("gateway ")
    where = subprocess.run([str(prefix / "bin/python"), "-c", "import gateway; print(gateway.__file__)"],
                           capture_output=True, text=True, check=True, env=CLEAN, cwd=tmp_path)  # fmt: skip
    assert where.stdout.startswith(str(prefix))  # the installed copy, not the checkout
    installed = freeze(prefix / "bin" / "python")
    assert {k: v for k, v in installed.items() if pins().get(k) != v} == {}  # exactly the pins
    for page in ("gateway.1", "gateway-serve.1", "gateway-proxy-helper.1"):
        assert (datadir / "man" / "man1" / page).is_file()
    assert (datadir / "bash-completion/completions/gateway").is_file()
    assert (datadir / "zsh/site-functions/_gateway").is_file()

    ran = demo([str(gw)], tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "16 of 16 steps went as expected" in ran.stdout and "host secret untouched: True" in ran.stdout
    assert "site-packages/gateway/examples/policy.yaml" in ran.stdout.replace("\n", "")
    # a step that goes otherwise (allow-all performs what the demo expects denied) fails the demo
    ran = demo([str(gw)], tmp_path, "--policy", str(ROOT / "policies/allow-all.yaml"))
    assert ran.returncode == 1 and "demo failed" in ran.stdout

    subprocess.run([str(ROOT / "scripts/install.sh"), *args, "--uninstall"], check=True, capture_output=True)
    assert not prefix.exists() and not gw.exists() and not gw.is_symlink()


def test_deb_installs_into_a_clean_root_and_runs_the_demo(wheel: Path, tmp_path: Path) -> None:
    require_root()
    for tool in ("dpkg-deb", "systemd-analyze"):
        assert shutil.which(tool), f"{tool} is missing (scripts/setup.sh installs it)"
    subprocess.run([str(ROOT / "scripts/build-deb.sh"), str(tmp_path / "out"), str(wheel)],
                   check=True, timeout=900, capture_output=True)  # fmt: skip
    (deb,) = (tmp_path / "out").glob("gateway_*_*.deb")
    info = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "Package: gateway" in info and "Depends: python3.11" in info
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in ("./lib/systemd/system/gateway@.service", "./lib/systemd/system/gateway@.socket",
                 "./usr/lib/systemd/system-generators/gateway-env-generator", "./etc/logrotate.d/gateway",
                 "./usr/share/man/man1/gateway.1.gz", "./usr/share/man/man1/gateway-serve.1.gz",
                 "./usr/share/bash-completion/completions/gateway",
                 "./usr/share/zsh/vendor-completions/_gateway",
                 "./opt/gateway/bin/gateway", "./usr/bin/gateway -> /opt/gateway/bin/gateway",
                 "./usr/bin/gateway-virtiofsd -> /opt/gateway/bin/gateway-virtiofsd",
                 "./usr/share/qemu/vhost-user/50-gateway-virtiofsd.json"):  # fmt: skip
        assert path in files, path

    root = tmp_path / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    venv = root / "opt" / "gateway"
    # relocated: built in a staging root, its scripts name /opt/gateway, nothing names the staging root
    assert (venv / "bin" / "gateway").read_text().splitlines()[0] == "#!/opt/gateway/bin/python3"
    assert "/opt/gateway" in (venv / "pyvenv.cfg").read_text()
    leftovers = subprocess.run(["grep", "-rlE", "/tmp/tmp[^/]*/root/opt", str(venv)], capture_output=True)
    assert leftovers.stdout == b"", leftovers.stdout.decode()

    python = [str(venv / "bin" / "python"), "-m", "gateway"]
    out = subprocess.run([*python, "--version"], capture_output=True, text=True, env=CLEAN, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("gateway ")
    # libvirt's probe of the vhost-user binary the packaged description names answers as virtiofsd's does
    described = json.loads((root / "usr/share/qemu/vhost-user/50-gateway-virtiofsd.json").read_text())
    assert described["type"] == "fs" and described["binary"] == "/usr/bin/gateway-virtiofsd"
    # (run through the venv's python: the script's #! names /opt/gateway, which this root is not)
    caps = subprocess.run([str(venv / "bin" / "python"), str(venv / "bin" / "gateway-virtiofsd"),
                           "--print-capabilities"],
                          capture_output=True, text=True, env=CLEAN, cwd=tmp_path)  # fmt: skip
    assert caps.returncode == 0 and json.loads(caps.stdout)["type"] == "fs", caps.stdout + caps.stderr
    ran = demo(python, tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "16 of 16 steps went as expected" in ran.stdout and "trail intact" in ran.stdout
    assert str(venv) in ran.stdout.replace("\n", "")  # its own shipped policy

    # the packaged units verify with the packaged man pages
    units = root / "lib" / "systemd" / "system"
    both = [str(units / "gateway@.service"), str(units / "gateway@.socket")]
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=yes", *both],
        capture_output=True, text=True, env={**os.environ, "MANPATH": str(root / "usr/share/man")},
    )  # fmt: skip
    assert res.returncode == 0 and res.stderr == "", res.stderr
