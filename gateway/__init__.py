"""gateway: a policy-enforcing, audited, sandboxed drop-in replacement for QEMU's virtfs-proxy-helper."""

__version__ = "0.1.0"
