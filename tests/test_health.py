"""The health judgement of a cluster (several instances on one PostgreSQL database)."""

from __future__ import annotations

from csand.health import cluster_reasons, reasons


def cluster(leader: str | None, *ages: float) -> dict:
    return {"shared": True, "leader": leader,
            "instances": [{"instance": f"vm-{n}", "heartbeat_age_s": age}
                          for n, age in enumerate(ages)]}


def test_a_healthy_cluster_has_nothing_to_say() -> None:
    assert cluster_reasons(cluster("vm-0", 2.0, 4.0)) == []


def test_no_leader_while_instances_are_alive_is_reported() -> None:
    (reason,) = cluster_reasons(cluster(None, 2.0))
    assert "no instance leads" in reason


def test_a_silent_instance_is_named() -> None:
    (reason,) = cluster_reasons(cluster("vm-0", 2.0, 95.0))
    assert "vm-1" in reason and "95 s" in reason


def test_sqlite_has_no_cluster_to_judge() -> None:
    assert cluster_reasons({"shared": False, "leader": None, "instances": []}) == []
    assert cluster_reasons(None) == []


def test_the_cluster_judgement_is_part_of_the_status_judgement() -> None:
    status = {"daemon_heartbeat_at": None, "cluster": cluster(None, 1.0)}
    found = reasons(status, poll_interval=30, now=0.0, daemon_expected=False)
    assert any("no instance leads" in r for r in found)


def test_stale_bulk_exports_are_a_problem() -> None:
    from csand.health import reasons
    status = {"daemon_heartbeat_at": None, "bulk_source": {"stale": ["no incremental "
                                                                     "signatures export"]}}
    assert "no incremental signatures export" in reasons(
        status, poll_interval=30, now=0.0, daemon_expected=False)
    assert reasons({"bulk_source": {"stale": []}}, poll_interval=30, now=0.0,
                   daemon_expected=False) == []
