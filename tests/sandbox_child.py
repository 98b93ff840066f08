"""A test-only child: confined by the gateway's own sandbox code path (gateway.sandbox.confine), then it
tries one forbidden thing and prints what happened as JSON. Not part of the gateway: the server has no
hidden request type for this.

    python tests/sandbox_child.py EXPORT MODE ACTION [HOST_FILE]
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

from gateway.sandbox import SandboxConfig, confine

# Calls made raw, so that no Python wrapper can refuse them first: (x86-64 number, arguments).
RAW_SYSCALLS: dict[str, tuple[int, tuple[object, ...]]] = {
    "kill": (62, (1, 0)),  # kill(1, 0): probe init
    "mount": (165, (b"none", b"/", b"tmpfs", 0, None)),
    "unshare": (272, (0x00020000,)),  # CLONE_NEWNS
    "setns": (308, (0, 0)),
    "bpf": (321, (0, None, 0)),
    "chroot": (161, (b"/",)),
}


def attempt(action: str, host_root_fd: int, host_file: str) -> str:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    try:
        if action == "execve":
            os.execv("/bin/true", ["/bin/true"])
        elif action == "socket":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        elif action == "connect":
            # socket() itself is forbidden, so connect() is tried on a socket made before the filter
            s = PRE_MADE_SOCKET
            s.connect(("127.0.0.1", 9))
        elif action == "ptrace":
            if libc.ptrace(16, os.getppid(), 0, 0) != 0:  # PTRACE_ATTACH
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        elif action == "fork":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        elif action in RAW_SYSCALLS:
            number, args = RAW_SYSCALLS[action]
            if libc.syscall(number, *args) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        elif action == "open-outside":
            # A bug-simulating direct open through an fd of the host's "/" kept from before the chroot:
            # chroot does not stop this; Landlock must.
            fd = os.open(host_file.lstrip("/"), os.O_RDONLY, dir_fd=host_root_fd)
            os.close(fd)
        elif action == "open-inside":
            fd = os.open("/inside", os.O_RDONLY)
            os.close(fd)
        elif action == "nothing":
            pass
        else:
            raise SystemExit(f"unknown action {action}")
    except OSError as exc:
        return f"error {exc.errno}"
    return "succeeded"


PRE_MADE_SOCKET: socket.socket


def main() -> None:
    global PRE_MADE_SOCKET
    export, mode, action = sys.argv[1:4]
    host_file = sys.argv[4] if len(sys.argv) > 4 else "/etc/hostname"
    host_root_fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    PRE_MADE_SOCKET = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    export_fd = os.open(export, os.O_PATH | os.O_DIRECTORY)
    state = confine(
        SandboxConfig(export, seccomp=mode, landlock=os.environ.get("NO_LANDLOCK") is None), export_fd
    )
    result = attempt(action, host_root_fd, host_file)
    sys.stdout.write(json.dumps({"result": result, "landlock": state.landlock_abi}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
