"""The policy language and its engine: load, validate, compile, decide, lint.

The request path imports only this package (never rich, never the CLI):

    from gateway.rules import load_policy, decide
    policy = load_policy("policy.yaml")        # raises PolicyError listing every problem
    decision = decide(request, policy, lookup)  # pure; lookup(path) -> os.stat_result | None
"""

from gateway.rules.engine import decide, explain_decision
from gateway.rules.idmap import IdMap, IdRange
from gateway.rules.loader import load_policy, load_policy_bytes, load_policy_text
from gateway.rules.model import Decision, Limits, ObjectAttrs, Policy, PolicyError, Problem, RuleTrace

__all__ = [
    "Decision",
    "IdMap",
    "IdRange",
    "Limits",
    "ObjectAttrs",
    "Policy",
    "PolicyError",
    "Problem",
    "RuleTrace",
    "decide",
    "explain_decision",
    "load_policy",
    "load_policy_bytes",
    "load_policy_text",
]
