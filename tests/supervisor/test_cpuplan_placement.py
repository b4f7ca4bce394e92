"""CPU plan policy and admission/placement: pure logic, checked exhaustively."""

import pytest

from appliance.config import ConfigError
from appliance.cpuplan import ShardCpus, auto_plan, make_plan, parse_explicit
from appliance.placement import AdmissionRefused, Placement, rtp_port


def test_auto_one_cpu_shares_everything():
    plan = auto_plan([0])
    assert plan.janus_cpus == (0,)
    assert plan.shards == (ShardCpus(0, 0, 0),)


def test_auto_two_cpus_janus_on_first_shard_on_second():
    plan = auto_plan([0, 1])
    assert plan.janus_cpus == (0,)
    assert plan.shards == (ShardCpus(0, 1, 1),)


def test_auto_eight_cpus_quarter_for_janus():
    plan = auto_plan(range(8))
    assert plan.janus_cpus == (0, 1)
    assert [s.media_cpu for s in plan.shards] == [2, 3, 4, 5, 6, 7]
    assert all(s.media_cpu == s.ai_cpu for s in plan.shards)


def test_auto_respects_affinity_mask_gaps():
    plan = auto_plan([2, 5, 7])
    assert plan.janus_cpus == (2,)
    assert [s.media_cpu for s in plan.shards] == [5, 7]


def test_auto_explicit_count_wraps_round_robin():
    plan = auto_plan([0, 1, 2], shard_count=5)
    assert [s.media_cpu for s in plan.shards] == [1, 2, 1, 2, 1]
    assert [s.shard for s in plan.shards] == [0, 1, 2, 3, 4]


def test_explicit_plan_with_and_without_janus():
    plan = parse_explicit("1:1,2:3", [0, 1, 2, 3])
    assert plan.shards == (ShardCpus(0, 1, 1), ShardCpus(1, 2, 3))
    assert plan.janus_cpus == (0,)
    plan = parse_explicit("janus=0-1;2:2,3", [0, 1, 2, 3])
    assert plan.janus_cpus == (0, 1)
    assert plan.shards[1] == ShardCpus(1, 3, 3)


@pytest.mark.parametrize(
    "text, fragment",
    [("1:x", "media:ai"), (",", "no shards"), ("janux=0;1:1", "janus=CPUS"), ("9:9", "not available"),
     ("janus=3-1;1:1", "bad CPU range")],
)
def test_explicit_plan_errors_name_the_key(text, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        make_plan(text, cpus=[0, 1])
    assert "shards.cpu_plan" in str(err.value)


def test_explicit_plan_count_mismatch():
    with pytest.raises(ConfigError, match=r"shards\.count"):
        make_plan("1:1", shard_count=2, cpus=[0, 1])


def test_make_plan_uses_real_affinity():
    plan = make_plan()
    assert plan.shard_count >= 1 and plan.janus_cpus


def test_least_loaded_placement_and_capacity():
    p = Placement(3, 2, 40000, 40100)
    placed = [p.admit(f"s{i}") for i in range(6)]
    # spread: shard 0, 1, 2, then back to 0 ...
    assert [x.shard for x in placed] == [0, 1, 2, 0, 1, 2]
    assert p.active == 6 and p.free_fraction() == 0.0
    with pytest.raises(AdmissionRefused) as err:
        p.admit("s7")
    assert err.value.retry_after > 0 and "capacity" in err.value.reason
    p.release(placed[4].shard, placed[4].slot)
    again = p.admit("s8")
    assert (again.shard, again.slot) == (placed[4].shard, placed[4].slot)


def test_ports_are_deterministic_and_unique():
    p = Placement(2, 4, 40000, 40015)
    ports = {p.port(k, s) for k in range(2) for s in range(4)}
    assert len(ports) == 8 and min(ports) == 40000 and max(ports) == 40014
    assert all(port % 2 == 0 for port in ports)
    assert rtp_port(40000, 4, 1, 2) == 40012


def test_port_range_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="rtp_port_max"):
        Placement(2, 4, 40000, 40014)


def test_freed_slot_goes_to_back_of_queue():
    p = Placement(1, 3, 40000, 40100)
    a = p.admit("a")
    p.release(a.shard, a.slot)
    b = p.admit("b")
    assert b.slot != a.slot


def test_draining_refuses_and_reports_zero_free():
    p = Placement(1, 2, 40000, 40100)
    p.draining = True
    with pytest.raises(AdmissionRefused, match="draining"):
        p.admit("x")
    assert p.free_fraction() == 0.0


def test_down_shard_gets_no_new_sessions():
    p = Placement(2, 2, 40000, 40100)
    p.set_up(0, False)
    assert {p.admit(str(i)).shard for i in range(2)} == {1}
    with pytest.raises(AdmissionRefused):
        p.admit("x")


def test_claim_and_release_are_idempotent():
    p = Placement(1, 2, 40000, 40100)
    p.claim(0, 1, "old")
    p.claim(0, 1, "old")
    assert p.session_at(0, 1) == "old"
    with pytest.raises(ValueError):
        p.claim(0, 1, "other")
    assert p.admit("new").slot == 0
    p.release(0, 1)
    p.release(0, 1)
    assert p.active == 1
