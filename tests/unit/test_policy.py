"""The node-restriction policy: its CEL, evaluated here on admission requests as the API server
would (a small evaluator of the part of CEL the policy uses), lets an agent write its own
CapacityNode and its own CapacityBallot, and no CapacityClaim at all."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from capacity_api import policy

AGENT = "system:serviceaccount:capacity-system:capacity-platform-agent"
SIMULATOR = "system:serviceaccount:capacity-system:capacity-platform-simulator"
PREFIX = "kwok-node-"
Obj = dict[str, Any]


def _validations() -> list[dict[str, str]]:
    spec = policy.node_restriction_policy("p")["spec"]
    return list(spec["validations"])


def test_every_refusal_names_its_rule() -> None:
    said = [v.get("message") or v["messageExpression"] for v in _validations()]
    for rule in policy.RULES:
        assert sum(f"node restriction ({rule})" in text for text in said) == 1, rule


def test_only_the_agent_accounts_are_matched() -> None:
    (condition,) = policy.node_restriction_policy("p")["spec"]["matchConditions"]
    assert policy.AGENT_USER in condition["expression"]
    assert policy.SIMULATOR_USER in condition["expression"]


# -- a small CEL evaluator --------------------------------------------------------------------


class CelError(Exception):
    """A CEL evaluation error (no such key, wrong type): ``||`` and ``&&`` absorb it when the
    other side decides."""


_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+)|(?P<str>'(?:[^'\\]|\\.)*')|(?P<id>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|&&|\|\||[-+!<>?:.,()\[\]]))"
)
Node = tuple[Any, ...]


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    at = 0
    while text[at:].strip():
        found = _TOKEN.match(text, at)
        assert found is not None, f"CEL the evaluator does not know at {text[at : at + 40]!r}"
        kind = found.lastgroup
        assert kind is not None
        out.append((kind, found.group(kind)))
        at = found.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else None

    def take(self, want: str | None = None) -> tuple[str, str]:
        token = self.tokens[self.at]
        assert want is None or token[1] == want, f"expected {want}, got {token[1]}"
        self.at += 1
        return token

    def parse(self) -> Node:
        node = self.conditional()
        assert self.at == len(self.tokens), f"left over: {self.tokens[self.at :]}"
        return node

    def conditional(self) -> Node:
        test = self.binary(0)
        if self.peek() != "?":
            return test
        self.take("?")
        then = self.conditional()
        self.take(":")
        return ("?", test, then, self.conditional())

    LEVELS = (("||",), ("&&",), ("==", "!=", "<", ">", "<=", ">=", "in"), ("+", "-"))

    def binary(self, level: int) -> Node:
        if level == len(self.LEVELS):
            return self.unary()
        node = self.binary(level + 1)
        while self.peek() in self.LEVELS[level]:
            op = self.take()[1]
            node = (op, node, self.binary(level + 1))
        return node

    def unary(self) -> Node:
        if self.peek() == "!":
            self.take()
            return ("not", self.unary())
        return self.member()

    def arguments(self) -> list[Node]:
        self.take("(")
        args: list[Node] = []
        while self.peek() != ")":
            args.append(self.conditional())
            if self.peek() == ",":
                self.take()
        self.take(")")
        return args

    def member(self) -> Node:
        node = self.primary()
        while self.peek() in (".", "["):
            if self.take()[1] == "[":
                node = ("index", node, self.conditional())
                self.take("]")
                continue
            name = self.take()[1]
            node = (
                ("call", name, node, self.arguments())
                if self.peek() == "("
                else ("get", node, name)
            )
        return node

    def primary(self) -> Node:
        kind, text = self.take()
        if kind == "num":
            return ("lit", int(text))
        if kind == "str":
            return ("lit", re.sub(r"\\(.)", r"\1", text[1:-1]))
        if text == "(":
            node = self.conditional()
            self.take(")")
            return node
        assert kind == "id", text
        if text in ("true", "false", "null"):
            return ("lit", {"true": True, "false": False, "null": None}[text])
        if self.peek() == "(":
            return ("call", text, None, self.arguments())
        return ("var", text)


def _evaluate(node: Node, env: Obj) -> Any:  # noqa: PLR0911, PLR0912
    op = node[0]
    if op == "lit":
        return node[1]
    if op == "var":
        if node[1] not in env:
            raise CelError(f"undeclared {node[1]}")
        return env[node[1]]
    if op in ("||", "&&"):
        decides = op == "||"
        error: CelError | None = None
        for side in node[1:]:
            try:
                if bool(_evaluate(side, env)) is decides:
                    return decides
            except CelError as e:
                error = e
        if error is not None:
            raise error
        return not decides
    if op == "?":
        return _evaluate(node[2] if _evaluate(node[1], env) else node[3], env)
    if op == "not":
        return not _evaluate(node[1], env)
    if op == "get":
        value = _evaluate(node[1], env)
        if not isinstance(value, dict) or node[2] not in value:
            raise CelError(f"no such key: {node[2]}")
        return value[node[2]]
    if op == "index":
        value, key = _evaluate(node[1], env), _evaluate(node[2], env)
        try:
            return value[key]
        except (KeyError, IndexError, TypeError) as e:
            raise CelError(f"no such key: {key}") from e
    if op == "call":
        return _call(node, env)
    left, right = _evaluate(node[1], env), _evaluate(node[2], env)
    binary: dict[str, Callable[[Any, Any], Any]] = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
        "in": lambda a, b: a in b,
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
    }
    try:
        return binary[op](left, right)
    except TypeError as e:
        raise CelError(str(e)) from e


def _call(node: Node, env: Obj) -> Any:
    _, name, target, args = node
    if name == "has":
        ((kind, holder, field),) = args
        assert kind == "get", "has() takes a field selection"
        value = _evaluate(holder, env)
        if not isinstance(value, dict):
            raise CelError("has() on a non-object")
        return field in value
    if name == "size":
        return len(_evaluate(args[0], env))
    value = _evaluate(target, env)
    if name == "startsWith":
        return str(value).startswith(_evaluate(args[0], env))
    if name == "all":
        (_, var), predicate = args
        return all(_evaluate(predicate, {**env, var: item}) for item in value)
    raise AssertionError(f"CEL function the evaluator does not know: {name}")


def cel(expression: str, env: Obj) -> Any:
    return _evaluate(_Parser(expression).parse(), env)


def test_the_evaluator_follows_cel_on_errors_and_precedence() -> None:
    env: Obj = {"o": {"a": {"b": "x"}}, "n": None}
    assert cel("has(o.a) && has(o.a.b) ? o.a.b : ''", env) == "x"
    assert cel("has(o.z) && has(o.z.b) ? o.z.b : ''", env) == ""
    assert cel("o.z.b == 'x' || true", env) is True
    with pytest.raises(CelError):
        cel("o.z.b == 'x' || false", env)
    assert cel("'a\\'s' + o.a.b", env) == "a'sx"
    assert cel("n == null && !(1 > 2)", env) is True


# -- the policy as the API server applies it ---------------------------------------------------


def _filled(value: Any) -> Any:
    """The policy as Helm renders it for release capacity-platform in capacity-system."""
    if isinstance(value, dict):
        return {k: _filled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(v) for v in value]
    if isinstance(value, str):
        value = value.replace(policy.AGENT_USER, AGENT).replace(policy.SIMULATOR_USER, SIMULATOR)
        return value.replace(policy.SIMULATOR_PREFIX, PREFIX)
    return value


POLICY = _filled(policy.node_restriction_policy("capacity-platform-node-restriction"))["spec"]


def _matched(request: Obj) -> bool:
    resource = request["resource"]["resource"]
    if request.get("subResource"):
        resource += "/" + request["subResource"]
    return any(
        request["operation"] in rule["operations"] and resource in rule["resources"]
        for rule in POLICY["matchConstraints"]["resourceRules"]
    )


def admit(
    user: str,
    operation: str,
    resource: str,
    name: str,
    obj: Obj | None = None,
    *,
    old: Obj | None = None,
    node: str | None = None,
    namespace: str = "",
    sub: str = "",
) -> list[str]:
    """The refusals (their messages) of the request; [] when the policy lets it through or
    does not apply to it."""
    extra = {policy.NODE_NAME_EXTRA: [node]} if node is not None else {}
    request: Obj = {
        "operation": operation,
        "name": name,
        "namespace": namespace,
        "resource": {"group": "capacity.platform.dev", "resource": resource},
        "subResource": sub,
        "userInfo": {"username": user, "extra": extra},
    }
    env: Obj = {"request": request, "object": obj, "oldObject": old}
    if not _matched(request):
        return []
    if not all(cel(c["expression"], env) for c in POLICY["matchConditions"]):
        return []
    env["variables"] = {v["name"]: cel(v["expression"], env) for v in POLICY["variables"]}
    refused: list[str] = []
    for validation in POLICY["validations"]:
        try:
            passed = cel(validation["expression"], env) is True
        except CelError:  # failurePolicy: Fail
            passed = False
        if not passed:
            text = validation.get("message") or cel(validation["messageExpression"], env)
            refused.append(str(text))
    return refused


def _rules(refusals: list[str]) -> set[str]:
    return {m.split("(", 1)[1].split(")", 1)[0] for m in refusals}


def ballot(name: str, node_name: str | None = None, votes: Obj | None = None) -> Obj:
    body: Obj = {
        "apiVersion": "capacity.platform.dev/v1alpha1",
        "kind": "CapacityBallot",
        "metadata": {"name": name},
        "spec": {"nodeName": name if node_name is None else node_name},
    }
    if votes is not None:
        body["status"] = {"votes": votes}
    return body


VOTE: Obj = {"vote": "YES", "role": "placement", "epoch": 3, "claim": "team-a/web"}


def claim(status: Obj | None = None) -> Obj:
    body: Obj = {"metadata": {"name": "web", "namespace": "team-a"}, "spec": {}}
    if status is not None:
        body["status"] = status
    return body


def node_object(name: str, status: Obj | None = None) -> Obj:
    body: Obj = {"metadata": {"name": name}, "spec": {}}
    if status is not None:
        body["status"] = status
    return body


def _as_agent(*args: Any, **kwargs: Any) -> list[str]:
    kwargs.setdefault("node", "node-a")
    return admit(AGENT, *args, **kwargs)


def test_every_expression_is_cel_the_evaluator_reads() -> None:
    for validation in POLICY["validations"]:
        _Parser(validation["expression"]).parse()
        if "messageExpression" in validation:
            _Parser(validation["messageExpression"]).parse()


def test_agent_creates_and_votes_in_its_own_ballot() -> None:
    assert _as_agent("CREATE", "capacityballots", "node-a", ballot("node-a")) == []
    old, new = ballot("node-a"), ballot("node-a", votes={"uid-1": VOTE})
    assert _as_agent("UPDATE", "capacityballots", "node-a", new, old=old, sub="status") == []
    assert (
        _as_agent("UPDATE", "capacityballots", "node-a", ballot("node-a"), old=new, sub="status")
        == []
    )


def test_a_forged_ballot_for_another_node_is_refused() -> None:
    refused = _as_agent("CREATE", "capacityballots", "node-b", ballot("node-b"))
    assert _rules(refused) == {policy.RULE_OWN_BALLOT}, refused
    (message,) = refused
    assert message.startswith(f"node restriction ({policy.RULE_OWN_BALLOT}): agent {AGENT}")
    assert "its own node (node-a)" in message, message
    assert "not node-b with spec.nodeName node-b" in message, message
    old, new = ballot("node-b"), ballot("node-b", votes={"uid-1": VOTE})
    refused = _as_agent("UPDATE", "capacityballots", "node-b", new, old=old, sub="status")
    assert _rules(refused) == {policy.RULE_OWN_BALLOT}, refused


def test_a_ballot_whose_node_name_differs_from_its_name_is_refused() -> None:
    refused = _as_agent("CREATE", "capacityballots", "node-a", ballot("node-a", "node-b"))
    assert _rules(refused) == {policy.RULE_OWN_BALLOT}, refused
    assert "not node-a with spec.nodeName node-b" in refused[0], refused
    old = ballot("node-a", "node-b")
    new = ballot("node-a", "node-b", votes={"uid-1": VOTE})
    refused = _as_agent("UPDATE", "capacityballots", "node-a", new, old=old, sub="status")
    assert _rules(refused) == {policy.RULE_OWN_BALLOT}, refused
    nameless = ballot("node-a")
    del nameless["spec"]
    refused = _as_agent("CREATE", "capacityballots", "node-a", nameless)
    assert "with spec.nodeName (none)" in refused[0], refused


@pytest.mark.parametrize(
    ("operation", "sub", "obj", "old"),
    [
        ("UPDATE", "status", claim({"votes": {"node-a": VOTE}}), claim({})),
        ("UPDATE", "status", claim({"phase": "Admitted"}), claim({"phase": "Voting"})),
        ("UPDATE", "status", claim({}), claim({})),
        ("UPDATE", "", claim(), claim()),
        ("CREATE", "", claim(), None),
        ("DELETE", "", None, claim()),
    ],
    ids=["own-vote", "phase", "no-change", "object", "create", "delete"],
)
def test_an_agent_never_writes_a_claim(
    operation: str, sub: str, obj: Obj | None, old: Obj | None
) -> None:
    refused = _as_agent(
        operation, "capacityclaims", "web", obj, old=old, namespace="team-a", sub=sub
    )
    assert _rules(refused) == {policy.RULE_NO_CLAIMS}, refused
    assert "may not write capacity claim team-a/web" in refused[0], refused
    assert admit(SIMULATOR, operation, "capacityclaims", "web", obj, old=old, sub=sub) != []


def test_the_simulator_writes_the_ballots_of_its_prefix_only() -> None:
    def as_simulator(name: str, node_name: str | None = None) -> list[str]:
        return admit(SIMULATOR, "CREATE", "capacityballots", name, ballot(name, node_name))

    assert as_simulator(f"{PREFIX}3") == []
    refused = as_simulator("node-a")
    assert _rules(refused) == {policy.RULE_OWN_BALLOT}, refused
    assert f"its own node ({PREFIX}*)" in refused[0], refused
    assert _rules(as_simulator(f"{PREFIX}1", f"{PREFIX}2")) == {policy.RULE_OWN_BALLOT}


def test_agent_writes_its_own_capacitynode_never_its_allocation() -> None:
    assert _as_agent("CREATE", "capacitynodes", "node-a", node_object("node-a")) == []
    refused = _as_agent("CREATE", "capacitynodes", "node-b", node_object("node-b"))
    assert _rules(refused) == {policy.RULE_OWN_NODE}, refused
    assert "its own node (node-a), not node-b" in refused[0], refused
    old = node_object("node-a", {"allocated": {"host": {"share": 0.1}}})
    new = node_object("node-a", {"allocated": {"host": {"share": 0.99}}})
    refused = _as_agent("UPDATE", "capacitynodes", "node-a", new, old=old, sub="status")
    assert _rules(refused) == {policy.RULE_NO_ALLOCATION}, refused
    kept = node_object("node-a", {"allocated": {"host": {"share": 0.1}}, "conditions": []})
    assert _as_agent("UPDATE", "capacitynodes", "node-a", kept, old=old, sub="status") == []


def test_a_token_without_a_node_name_is_refused() -> None:
    refused = admit(AGENT, "CREATE", "capacityballots", "node-a", ballot("node-a"))
    assert policy.RULE_NODE_NAME in _rules(refused), refused


def test_other_users_are_not_matched() -> None:
    operator = "system:serviceaccount:capacity-system:capacity-platform-operator"
    assert admit(operator, "UPDATE", "capacityclaims", "web", claim({}), old=claim({})) == []
    assert admit(operator, "CREATE", "capacityballots", "node-b", ballot("node-b", "x")) == []


def _all_resources() -> Iterator[str]:
    for rule in POLICY["matchConstraints"]["resourceRules"]:
        yield from rule["resources"]


def test_ballots_claims_and_nodes_are_matched_with_their_status() -> None:
    assert set(_all_resources()) == {
        f"{plural}{sub}"
        for plural in ("capacitynodes", "capacityballots", "capacityclaims")
        for sub in ("", "/status")
    }
