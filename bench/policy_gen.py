"""A fleet-shaped, path-conditioned policy of N rules, as a host that generates its tenants' policies has.

    python bench/policy_gen.py 1000 > /tmp/p1000.yaml

Per-tenant homes (a write allow and a secret deny each), read-only trees, log directories and secret
globs, plus the two rules every benchmark workload needs: reads anywhere, writes under the paths the
benchmarks' workloads touch (``/bench/**``, ``/work/**`` and, for a guest, ``/mnt/**``). Every rule has
a path condition, so the engine's prefix index, not a default, decides each request. The workloads
never touch a generated tenant's paths, so the decisions match an allow-all run's and a bench's figures
measure the policy's cost, never a different answer.
"""

from __future__ import annotations

import sys

# Paths the benchmarks' workloads write under (bench_proxy's export, bench_guest's tree).
WORKLOAD_TREES = ("/bench/**", "/work/**", "/tree/**", "/mnt/**")


def path_policy(n_rules: int = 1000, *, tenant: str = "bench") -> str:
    """YAML text of a valid policy with exactly ``n_rules`` rules (n_rules >= 2)."""
    if n_rules < 2:
        raise ValueError("a path policy needs at least its two workload rules")
    lines = [
        "version: 1",
        f"tenant: {tenant}",
        "default: deny",
        "enforcement: enforce",
        "rules:",
        "  - id: read-anything",
        "    effect: allow",
        "    ops: [read]",
        "  - id: workload-trees",
        "    effect: allow",
        "    ops: [write]",
        f"    paths: [{', '.join(repr(t) for t in WORKLOAD_TREES)}]",
    ]
    kinds = ("home", "secret", "readonly", "logs")
    for i in range(n_rules - 2):
        kind = kinds[i % len(kinds)]
        n = i // len(kinds)
        lines.append(f"  - id: {kind}-{n}")
        if kind == "home":
            lines += ["    effect: allow", "    ops: [write]", f"    paths: ['/home/u{n}/**']"]
        elif kind == "secret":
            lines += [
                "    effect: deny",
                "    ops: [all]",
                f"    paths: ['/home/u{n}/.ssh/**', '/home/u{n}/**/*.key']",
                "    errno: EACCES",
            ]
        elif kind == "readonly":
            lines += ["    effect: deny", "    ops: [write]", f"    paths: ['/srv/ro{n}/**']"]
            lines.append("    errno: EROFS")
        else:
            lines += ["    effect: allow", "    ops: [create, write]", f"    paths: ['/var/log/t{n}/*.log']"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(path_policy(int(sys.argv[1]) if len(sys.argv) > 1 else 1000), end="")
