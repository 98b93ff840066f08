"""``gateway check --coverage``: which rules the policy's own tests exercised (``opa test --coverage``).

Each test is decided with the explanation on, so that a rule counts as *matching* a test when it matched
on any path of the request, deciding or not (a deny that lost nothing, an allow a deny overrode), and as
*deciding* when the decision names it (an alias deny too). A rule no test ever matched is untested: the
tests would pass whatever it says. Rich-free; gateway/check_authoring.py shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.rules.engine import decide
from gateway.rules.model import ObjectAttrs, Policy, PolicyTest
from gateway.rules.testing import TestResult, run_test


@dataclass
class RuleCoverage:
    id: str
    line: int
    effect: str
    deciding: list[str] = field(default_factory=list)  # the tests' labels
    matching: list[str] = field(default_factory=list)  # deciding included

    @property
    def status(self) -> str:
        return "decides" if self.deciding else "matches" if self.matching else "never"


def label(test: PolicyTest) -> str:
    return test.name or f"#{test.index}"


def coverage(policy: Policy, tests: tuple[PolicyTest, ...]) -> tuple[list[TestResult], list[RuleCoverage]]:
    rules = {r.id: RuleCoverage(r.id, r.line, r.effect) for r in policy.rules}
    results = []
    for test in tests:
        results.append(run_test(policy, test))

        def lookup(_path: str, obj: ObjectAttrs | None = test.object) -> ObjectAttrs | None:
            return obj

        explained = decide(test.request, policy, lookup, explain=True)
        matched = {t.rule for t in explained.explanation or () if t.status in ("decides", "matched")}
        matched.update(explained.matched)
        if explained.rule is not None:
            matched.add(explained.rule)
            if explained.rule in rules:
                rules[explained.rule].deciding.append(label(test))
        for rule_id in sorted(matched):
            if rule_id in rules:
                rules[rule_id].matching.append(label(test))
    return results, sorted(rules.values(), key=lambda r: (r.line, r.id))


def as_dict(results: list[TestResult], rules: list[RuleCoverage]) -> dict[str, Any]:
    covered = sum(r.status != "never" for r in rules)
    return {"tests": [{"test": label(r.test), "line": r.test.line, "passed": r.passed,
                       "outcome": r.decision.outcome, "rule": r.decision.rule, "failures": list(r.failures)}
                      for r in results],
            "rules": [{"id": r.id, "line": r.line, "effect": r.effect, "status": r.status,
                       "deciding": r.deciding, "matching": r.matching} for r in rules],
            "covered": covered, "total": len(rules),
            "never": [r.id for r in rules if r.status == "never"]}
