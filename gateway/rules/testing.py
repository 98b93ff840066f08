"""Running a policy's own ``tests:`` section (used by ``gateway check``; rich-free, like all of rules/)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway import names
from gateway.rules.engine import decide
from gateway.rules.model import Decision, ObjectAttrs, Policy, PolicyTest


@dataclass(frozen=True)
class TestResult:
    test: PolicyTest
    decision: Decision
    failures: tuple[str, ...]  # empty when the test passed
    lookups: int  # how often the engine asked for the object's attributes

    @property
    def passed(self) -> bool:
        return not self.failures


def run_test(policy: Policy, test: PolicyTest) -> TestResult:
    calls = 0

    def lookup(path: str) -> ObjectAttrs | None:
        nonlocal calls
        calls += 1
        return test.object  # the test's stated attributes, whatever the path; None: unknown

    decision = decide(test.request, policy, lookup)
    failures = []
    if decision.outcome != test.expect:
        failures.append(f"expected {test.expect}, got {decision.outcome} ({decision.reason})")
    if test.rule_given and decision.rule != test.rule:
        want = f"rule '{test.rule}'" if test.rule else "the default"
        got = f"rule '{decision.rule}'" if decision.rule else "the default"
        failures.append(f"expected {want} to decide, got {got}")
    if test.errno is not None and decision.errno != test.errno:
        failures.append(f"expected errno {names.errno_name(test.errno)}, got "
                        f"{names.errno_name(decision.errno) if decision.errno else 'none'}")
    return TestResult(test, decision, tuple(failures), calls)


def select_tests(policy: Policy, pattern: str | None) -> tuple[PolicyTest, ...]:
    """The tests ``--run PATTERN`` names: a regular expression searched in the test's name, its request
    text and ``#index`` (as OPA's ``--run`` searches test names). None: all of them."""
    if pattern is None:
        return policy.tests
    found = re.compile(pattern)
    return tuple(t for t in policy.tests
                 if found.search(t.name) or found.search(t.text) or found.search(f"#{t.index}"))


def run_tests(policy: Policy, tests: tuple[PolicyTest, ...] | None = None) -> list[TestResult]:
    return [run_test(policy, test) for test in (policy.tests if tests is None else tests)]
