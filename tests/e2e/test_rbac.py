"""Each component runs with its own ServiceAccount and nothing more: what each may do
(`kubectl auth can-i --list`), cluster-wide and in the platform namespace, is exactly the
checked-in expectation in tests/e2e/rbac/<component>.txt (less what every authenticated user
may do) (regenerate with
CAPACITY_E2E_WRITE_RBAC=1 after a deliberate change, and review the diff)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.conftest import NAMESPACE, Platform, Run

EXPECTED = Path(__file__).parent / "rbac"


def _can_i(kubectl: Run, component: str, namespace: str) -> list[str]:
    user = f"system:serviceaccount:{NAMESPACE}:capacity-platform-{component}"
    out = kubectl(
        "auth", "can-i", "--list", "-n", namespace, f"--as={user}",
        "--as-group=system:serviceaccounts", f"--as-group=system:serviceaccounts:{NAMESPACE}",
        "--as-group=system:authenticated",
    ).stdout  # fmt: skip
    rows = [" ".join(line.split()) for line in out.splitlines()[1:] if line.strip()]
    # what Kubernetes' default roles give every authenticated user (system:basic-user,
    # system:discovery, system:public-info-viewer, service-account-issuer-discovery)
    return sorted(r for r in rows if not r.startswith(("[", "selfsubject")))


@pytest.mark.parametrize("component", ["operator", "webhook", "agent", "simulator"])
def test_component_may_do_exactly_what_is_expected(
    platform: Platform, kubectl: Run, component: str
) -> None:
    if component == "simulator" and not platform.local:
        pytest.skip("the simulator is installed on the local cluster only")
    text = ""
    for namespace in (NAMESPACE, "default"):
        text += f"# in namespace {namespace}\n" + "\n".join(_can_i(kubectl, component, namespace))
        text += "\n"
    path = EXPECTED / f"{component}.txt"
    if os.environ.get("CAPACITY_E2E_WRITE_RBAC") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{component} may do other things than {path} says"
