"""The budget shared across brokers: fair shares by need, each broker's move, and the join check
(pure, with hypothesis for the fairness rule itself)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from poolbroker.broker.decide.cluster import Demand, Plan, fair_shares, join_refusal, permit_count, plan

needs_maps = st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 50), min_size=1)


@given(st.integers(0, 200), needs_maps)
def test_fair_shares_are_max_min_fair(permits: int, needs: dict[str, int]) -> None:
    shares = fair_shares(permits, needs)
    assert sum(shares.values()) == min(permits, sum(needs.values()))  # (nothing wasted, nothing over)
    for name, share in shares.items():
        assert 0 <= share <= needs[name]
        if share < needs[name]:  # short of its need: nobody has more than one permit over it
            assert all(other <= share + 1 for other in shares.values())


def test_shares_fill_the_small_needs_first_then_split_the_rest() -> None:
    assert fair_shares(10, {"a": 2, "b": 20, "c": 20}) == {"a": 2, "b": 4, "c": 4}
    assert fair_shares(3, {"a": 5, "b": 5, "c": 5, "d": 0}) == {"a": 1, "b": 1, "c": 1, "d": 0}
    assert fair_shares(2, {"c": 5, "a": 5, "b": 5}) == {"a": 1, "b": 1, "c": 0}  # (by name: all agree)
    assert fair_shares(100, {"a": 3, "b": 4}) == {"a": 3, "b": 4}


def demand(held: int = 0, busy: int = 0, waiting: int = 0, reserved: int = 2, max_size: int = 20) -> Demand:
    return Demand(reserved=reserved, max_size=max_size, held=held, busy=busy, waiting=waiting)


def test_need_is_beyond_the_reserved_share_and_within_max_size() -> None:
    assert demand(busy=1).need == 0
    assert demand(busy=2, waiting=5).need == 5
    assert demand(busy=20, waiting=100).need == 18


def test_a_broker_with_waiters_claims_free_permits_up_to_its_need() -> None:
    demands = {"a": demand(busy=2, waiting=6), "b": demand(held=1, busy=3)}
    assert plan("a", permits=10, free=9, demands=demands, in_use=0) == Plan(claim=6)
    assert plan("a", permits=10, free=4, demands=demands, in_use=0) == Plan(claim=4)  # (what is free)


def test_a_broker_over_its_share_gives_back_to_one_below_its_own_that_waits() -> None:
    demands = {"a": demand(held=10, busy=12), "b": demand(busy=2, waiting=5)}
    assert plan("a", permits=10, free=0, demands=demands, in_use=10) == Plan(release=5)
    assert plan("b", permits=10, free=0, demands=demands, in_use=0) == Plan(claim=0)  # (none free yet)
    after = {"a": demand(held=5, busy=7, waiting=5), "b": demand(held=0, busy=2, waiting=5)}
    assert plan("b", permits=10, free=5, demands=after, in_use=0) == Plan(claim=5)
    steady = {"a": demand(held=5, busy=7, waiting=5), "b": demand(held=5, busy=7, waiting=3)}
    assert plan("a", permits=10, free=0, demands=steady, in_use=5) == Plan()  # (each at its share)


def test_nobody_waiting_means_nothing_moves_but_permits_that_back_nothing() -> None:
    demands = {"a": demand(held=8, busy=4), "b": demand(busy=1)}
    assert plan("a", permits=10, free=2, demands=demands, in_use=8) == Plan()  # (idle: the reaper's)
    assert plan("a", permits=10, free=2, demands=demands, in_use=3) == Plan(release=5)


def test_the_join_check_counts_every_reserved_share_on_the_roster() -> None:
    assert join_refusal(10, {"a": 4, "b": 3}, "c", 3) is None
    refusal = join_refusal(10, {"a": 4, "b": 3}, "c", 4)
    assert refusal is not None and "11, over cluster_max_size=10" in refusal and "a 4, b 3" in refusal
    assert join_refusal(10, {"a": 4, "c": 9}, "c", 6) is None  # (its own old share is replaced)
    assert permit_count(10, [4, 3]) == 3 and permit_count(5, [4, 3]) == 0


def test_a_read_of_etcd_makes_each_pool_s_view_and_passes_over_what_is_not_ours() -> None:
    from poolbroker.broker.drive.cluster import PREFIX, read_view
    from poolbroker.broker.drive.etcd import Entry

    def entry(key: str, value: str, revision: int = 5) -> Entry:
        return Entry(PREFIX + key.encode(), value.encode(), revision, 0)

    demand = '{"reserved": 1, "max_size": 6, "held": 2, "busy": 3, "waiting": 1}'
    live, views = read_view(
        [
            entry("members/a", "{}"),
            entry("pools/p/budget", "6", 9),
            entry("pools/p/reserved/a", "1"),
            entry("pools/p/reserved/b", "2"),
            entry("pools/p/demand/a", demand),
            entry("pools/p/demand/b", "not json"),  # (passed over)
            entry("pools/p/permits/0", "a"),
            entry("pools/p/last/0", "a", 7),
            entry("pools/p/last/x", "a"),  # (not a permit's number)
            entry("elsewhere/key", "?"),
        ]
    )
    assert live == {"a"}
    view = views["p"]
    assert (view.budget, view.budget_revision, view.roster) == (6, 9, {"a": 1, "b": 2})
    assert view.demands == {"a": Demand(reserved=1, max_size=6, held=2, busy=3, waiting=1)}
    assert (view.permits, view.last) == ({0: "a"}, {0: ("a", 7)})
