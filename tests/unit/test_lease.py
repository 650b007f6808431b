"""Lease JSON as the API server serves it, and liveness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from capacity_api.lease import LeaseInfo, parse_lease

NOW = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)


def test_parse_lease_reads_renewal_and_duration() -> None:
    lease = parse_lease(
        {
            "metadata": {"name": "node-a"},
            "spec": {"renewTime": "2026-11-22T04:59:50.123456Z", "leaseDurationSeconds": 15},
        }
    )
    assert lease == LeaseInfo("node-a", datetime(2026, 11, 22, 4, 59, 50, 123456, tzinfo=UTC), 15)
    assert lease.live(NOW)
    assert not lease.live(NOW + timedelta(seconds=6))


def test_a_lease_never_renewed_is_not_live_and_duration_defaults_to_kubelets() -> None:
    lease = parse_lease({"metadata": {"name": "node-b"}, "spec": {}})
    assert lease.renew_time is None
    assert lease.duration_seconds == 40
    assert not lease.live(NOW)
