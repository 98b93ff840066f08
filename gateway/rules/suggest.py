"""``gateway check POLICY --suggest TRAIL...``: allow rules proposed from a trail's denials (aa-logprof).

Every request record of the trails is re-decided under POLICY (on the facts the server decided on, as
``--replay`` does), and the ones it still denies or would deny are the work list. Only a denial the
*default* decided can be lifted by an allow rule: deny overrides allow, so a record a deny rule refuses
(directly, or as an alias) is reported with that rule and never "fixed" by widening an allow.

The paths are generalised the way aa-logprof offers, in three steps, each one only as far as the trail
shows the guest going:

1. one path alone in its directory stays exact (``/srv/data/a.csv``);
2. several paths in one directory become ``dir/*.ext`` when they share an extension, else ``dir/*``;
3. when MERGE_MIN or more such directories sit in one parent at least two components deep, they become
   ``parent/**`` (``parent/**/*.ext`` when they share an extension). Never at ``/`` or a top-level
   directory: a guest that wrote in three homes does not earn ``/home/**`` without a person saying so.

Each proposal is one allow rule on its globs, for the ops its records needed (a read-group op becomes
``read``, an open for writing ``open``, any other op its own name), with the records' count, example paths
and broader or narrower alternatives for an interactive review. Suggestions are never about ids: a rule
proposed from alice's denials allows that path to every uid the policy's other rules do not stop.

Pure and rich-free; gateway/check_authoring.py shows it.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway import names
from gateway.rules import loader, requests
from gateway.rules.compiler import model_path
from gateway.rules.engine import decide, slot_of
from gateway.rules.model import GROUPS, OPEN_WRITE, Policy
from gateway.rules.replay import _NOT_RECORDED, _as_decided, _recorded_object

MERGE_MIN = 3  # sibling directories that earn their parent's `**`
EXAMPLES = 3
_GLOB_SPECIAL = re.compile(r"([*?\[\]{}\\,])")
_READ_SLOTS = GROUPS["read"]


def escape(path: str) -> str:
    """A path as a glob that matches exactly it."""
    return _GLOB_SPECIAL.sub(r"\\\1", path)


def op_word(request: Any) -> str:
    """The narrowest ``ops`` word that lets this request through."""
    slot = slot_of(request)
    if slot in _READ_SLOTS:
        return "read"
    if slot == OPEN_WRITE:
        return "open"
    return names.OP_NAMES[request.type]


def _ext(path: str) -> str:
    base = posixpath.basename(path)
    stem, dot, ext = base.rpartition(".")
    return ext if dot and stem and _GLOB_SPECIAL.search(ext) is None else ""


@dataclass
class Proposal:
    """One allow rule: its globs, its ops, the records it lets through."""

    paths: list[str]  # globs
    ops: list[str]
    count: int
    examples: list[str]  # real paths from the trail
    alternatives: list[list[str]] = field(default_factory=list)  # other glob lists, narrowest first
    id: str = ""

    def rule(self) -> dict[str, Any]:
        return {"id": self.id, "effect": "allow", "ops": list(self.ops), "paths": list(self.paths),
                "description": f"suggested from {self.count} denied record(s), e.g. {self.examples[0]}"}


@dataclass
class Suggestions:
    records: int = 0  # request records read
    denied: int = 0  # of them, denied or would-deny under the policy now
    errors: int = 0  # unreadable lines
    proposals: list[Proposal] = field(default_factory=list)
    by_deny_rule: Counter[str] = field(default_factory=Counter)  # denials an allow cannot lift
    deny_examples: dict[str, list[str]] = field(default_factory=dict)
    skipped: int = 0  # denials whose path is not UTF-8 (no rule text can name them)

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "denied": self.denied, "errors": self.errors,
                "proposals": [{**p.rule(), "count": p.count, "examples": p.examples,
                               "alternatives": p.alternatives} for p in self.proposals],
                "denied_by_rules": [{"rule": r, "count": n, "examples": self.deny_examples.get(r, [])}
                                    for r, n in self.by_deny_rule.most_common()],
                "skipped_not_utf8": self.skipped}


def _paths_of(request: Any) -> list[str]:
    """The path(s) the request is decided on (both names of a RENAME or LINK)."""
    out = [model_path(request.path)]
    if hasattr(request, "path2"):
        out.append(model_path(request.path2))
    return out


def collect(trails: Iterable[Iterator[bytes]], policy: Policy) -> tuple[Suggestions, dict[str, Counter[str]]]:
    """Re-decide every request record; return the report so far and, per path the default denied, how
    many records needed each op word there."""
    report = Suggestions()
    need: dict[str, Counter[str]] = {}
    for lines in trails:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or record.get("event") != "request":
                    continue
                request = requests.from_audit(_as_decided(record))
                facts = _recorded_object(record)
            except (ValueError, requests.RequestError):
                report.errors += 1
                continue
            report.records += 1
            decision = decide(request, policy, None if facts is _NOT_RECORDED else (lambda _p, f=facts: f))
            if decision.outcome == "allow":
                continue
            report.denied += 1
            paths = _paths_of(request)
            if decision.rule is not None:  # a deny rule decided: an allow cannot override it
                report.by_deny_rule[decision.rule] += 1
                kept = report.deny_examples.setdefault(decision.rule, [])
                if len(kept) < EXAMPLES:
                    kept.append(requests.describe(request))
                continue
            try:
                for p in paths:
                    p.encode("utf-8")
            except UnicodeEncodeError:
                report.skipped += 1
                continue
            word = op_word(request)
            for p in paths:
                need.setdefault(p, Counter())[word] += 1
    return report, need


def _group(need: dict[str, Counter[str]]) -> list[tuple[list[str], list[str], list[list[str]]]]:
    """(globs, real paths, alternatives) per proposal, by the three steps of the module's docstring."""
    by_dir: dict[str, list[str]] = {}
    for p in sorted(need):
        by_dir.setdefault(posixpath.dirname(p), []).append(p)

    def under(d: str, tail: str) -> str:
        return (escape(d).rstrip("/") or "") + "/" + tail

    def common_ext(paths: list[str]) -> str:
        exts = {_ext(p) for p in paths}
        return exts.pop() if len(exts) == 1 else ""

    # Step 3 first decides which directories are merged into their parent's tree.
    parents: dict[str, list[str]] = {}
    for d in by_dir:
        parent = posixpath.dirname(d)
        if d != "/" and parent.count("/") >= 2 and parent != "/":
            parents.setdefault(parent, []).append(d)
    merged = {d: parent for parent, ds in parents.items() if len(ds) >= MERGE_MIN for d in ds}
    out = []
    done_parents = set()
    for d, paths in by_dir.items():
        if d in merged:
            parent = merged[d]
            if parent in done_parents:
                continue
            done_parents.add(parent)
            real = [p for dd in parents[parent] for p in by_dir[dd]]
            ext = common_ext(real)
            tree = under(parent, "**")
            glob = under(parent, f"**/*.{ext}") if ext else tree
            dirs = sorted({under(dd, "*") for dd in parents[parent]})
            alts = [[escape(p) for p in real], dirs] + ([[tree]] if glob != tree else [])
            out.append(([glob], real, alts))
            continue
        ext = common_ext(paths)
        star, tree = under(d, "*"), under(d, "**")
        exact = [escape(p) for p in paths]
        if len(paths) == 1:
            glob_list = exact
            alts = ([[under(d, f"*.{ext}")]] if ext else []) + [[star], [tree]]
        else:
            glob_list = [under(d, f"*.{ext}")] if ext else [star]
            alts = [exact] + ([[star]] if ext else []) + [[tree]]
        out.append((glob_list, paths, alts))
    return out


def _slug(globs: list[str]) -> str:
    text = re.sub(r"[^A-Za-z0-9]+", "-", globs[0].replace("**", "tree").replace("*", "any")).strip("-")
    return text[:48].strip("-") or "root"


def suggest(trails: Iterable[Iterator[bytes]], policy: Policy) -> Suggestions:
    report, need = collect(trails, policy)
    taken = {r.id for r in policy.rules}
    for globs, real, alts in _group(need):
        ops: Counter[str] = Counter()
        for p in real:
            ops.update(need[p])
        base = "suggested-" + _slug(globs)
        rule_id, n = base, 2
        while rule_id in taken:
            rule_id, n = f"{base}-{n}", n + 1
        taken.add(rule_id)
        # The count is of records: a RENAME both of whose names land here counts once per name, which
        # is what the rule lets through on each.
        report.proposals.append(Proposal(globs, sorted(ops), sum(ops.values()), real[:EXAMPLES], alts,
                                         rule_id))
    report.proposals.sort(key=lambda p: (-p.count, p.paths))
    return report


def patch_text(proposals: list[Proposal], header: str = "") -> str:
    """The rules as a YAML document (``rules:`` and the list to append to a policy's own). Strings are
    written as JSON strings, which are YAML double-quoted scalars."""
    q = json.dumps
    lines = [f"# {line}" for line in header.splitlines()] + ["rules:"]
    for p in proposals:
        lines.append(f"  # {p.count} record(s), e.g. {', '.join(p.examples)}")
        lines.append(f"  - id: {q(p.id)}")
        lines.append("    effect: allow")
        lines.append(f"    ops: [{', '.join(q(o) for o in p.ops)}]")
        lines.append(f"    paths: [{', '.join(q(g) for g in p.paths)}]")
        lines.append(f"    description: {q(p.rule()['description'])}")
    if not proposals:
        lines[-1] = "rules: []"
    return "\n".join(lines) + "\n"


def with_rules(source: str, rules: list[dict[str, Any]]) -> Policy:
    """The policy file with ``rules`` appended, loaded (PolicyError as for any policy). The document is
    re-read and written back as JSON, a YAML subset, so that the result loads through the one loader."""
    with open(source, "rb") as f:
        raw = loader.read_bounded(f)
    data, _lines = loader.read_yaml(raw.decode("utf-8"), source)
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a policy mapping")
    data = dict(data)
    data["rules"] = list(data.get("rules") or []) + rules
    return loader.load_policy_bytes(json.dumps(data).encode(), source)
