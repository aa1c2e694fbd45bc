"""policies/: round robin and least loaded over BackendView snapshots."""

from __future__ import annotations

import pytest

from policies import POLICIES, BackendView, RequestInfo, make_policy
from policies.least_loaded import LeastLoaded
from policies.round_robin import RoundRobin

LLAMA = RequestInfo(model="llama-3.1-8b")
QWEN = RequestInfo(model="qwen-2.5-7b")


def view(name: str, *, healthy: bool = True, in_flight: int = 0, queued: int = 0,
         running: int | None = None, max_concurrency: int | None = None) -> BackendView:
    return BackendView(name=name, healthy=healthy, in_flight=in_flight, queued=queued,
                       running=running, max_concurrency=max_concurrency)


def picks(policy: RoundRobin | LeastLoaded, request: RequestInfo, views: list[BackendView], n: int) -> list[str | None]:
    return [policy.choose(request, views, now_s=float(i)) for i in range(n)]


# -- round robin -------------------------------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    views = [view("a"), view("b"), view("c")]
    assert picks(RoundRobin(), LLAMA, views, 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_keeps_a_turn_per_model() -> None:
    rr = RoundRobin()
    views = [view("a"), view("b")]
    assert rr.choose(LLAMA, views, 0.0) == "a"
    assert rr.choose(LLAMA, views, 0.0) == "b"
    # Another model's turn is its own: it starts at the first backend.
    assert rr.choose(QWEN, views, 0.0) == "a"
    assert rr.choose(LLAMA, views, 0.0) == "a"
    assert rr.choose(QWEN, views, 0.0) == "b"


def test_round_robin_skips_unhealthy() -> None:
    views = [view("a"), view("b", healthy=False), view("c")]
    chosen = picks(RoundRobin(), LLAMA, views, 6)
    assert "b" not in chosen
    assert chosen.count("a") == 3 and chosen.count("c") == 3


def test_round_robin_skips_full_backends() -> None:
    views = [view("a", in_flight=2, max_concurrency=2), view("b", in_flight=1, max_concurrency=2), view("c")]
    chosen = picks(RoundRobin(), LLAMA, views, 4)
    assert "a" not in chosen
    assert set(chosen) == {"b", "c"}


def test_round_robin_over_capacity_is_full_too() -> None:
    views = [view("a", in_flight=5, max_concurrency=2), view("b")]
    assert picks(RoundRobin(), LLAMA, views, 3) == ["b", "b", "b"]


def test_round_robin_none_when_nothing_eligible() -> None:
    rr = RoundRobin()
    assert rr.choose(LLAMA, [], 0.0) is None
    views = [view("a", healthy=False), view("b", in_flight=1, max_concurrency=1)]
    assert rr.choose(LLAMA, views, 0.0) is None


def test_round_robin_ignores_load() -> None:
    views = [view("a", in_flight=50), view("b")]
    assert picks(RoundRobin(), LLAMA, views, 4) == ["a", "b", "a", "b"]


def test_round_robin_backend_comes_back() -> None:
    rr = RoundRobin()
    down = [view("a"), view("b", healthy=False)]
    assert set(picks(rr, LLAMA, down, 3)) == {"a"}
    up = [view("a"), view("b")]
    assert set(picks(rr, LLAMA, up, 4)) == {"a", "b"}


# -- least loaded ------------------------------------------------------------------------------------


def test_least_loaded_picks_fewest_in_flight() -> None:
    views = [view("a", in_flight=3), view("b", in_flight=1), view("c", in_flight=2)]
    assert LeastLoaded().choose(LLAMA, views, 0.0) == "b"


def test_least_loaded_ties_go_to_the_first() -> None:
    views = [view("a", in_flight=2), view("b", in_flight=1), view("c", in_flight=1)]
    assert picks(LeastLoaded(), LLAMA, views, 3) == ["b", "b", "b"]
    assert LeastLoaded().choose(LLAMA, [view("x"), view("y"), view("z")], 0.0) == "x"


def test_least_loaded_counts_the_engines_queue_when_larger() -> None:
    # a: ours 1, engine 2 running + 6 waiting (other proxies) -> load 8
    # b: ours 4, engine reports 3 running + 0 waiting (stale scrape) -> load 4
    views = [view("a", in_flight=1, running=2, queued=6), view("b", in_flight=4, running=3)]
    assert LeastLoaded().choose(LLAMA, views, 0.0) == "b"


def test_least_loaded_counts_in_flight_when_larger() -> None:
    # a: engine says 1 but we have 5 in flight (scrape lags) -> 5; b: engine 2 + 1 -> 3
    views = [view("a", in_flight=5, running=1), view("b", in_flight=0, running=2, queued=1)]
    assert LeastLoaded().choose(LLAMA, views, 0.0) == "b"


def test_least_loaded_queue_without_running_gauge() -> None:
    views = [view("a", in_flight=0, queued=3), view("b", in_flight=2)]
    assert LeastLoaded().choose(LLAMA, views, 0.0) == "b"


@pytest.mark.parametrize(
    ("kwargs", "load"),
    [
        ({"in_flight": 3}, 3),
        ({"in_flight": 3, "running": 1, "queued": 1}, 3),
        ({"in_flight": 3, "running": 2, "queued": 2}, 4),
        ({"in_flight": 0, "running": None, "queued": 2}, 2),
    ],
)
def test_backend_view_load(kwargs: dict, load: int) -> None:
    assert view("a", **kwargs).load == load


def test_least_loaded_skips_unhealthy_and_full() -> None:
    views = [
        view("idle-but-down", healthy=False),
        view("full", in_flight=1, max_concurrency=1),
        view("busy", in_flight=9),
    ]
    assert LeastLoaded().choose(LLAMA, views, 0.0) == "busy"


def test_least_loaded_none_when_nothing_eligible() -> None:
    assert LeastLoaded().choose(LLAMA, [], 0.0) is None
    assert LeastLoaded().choose(LLAMA, [view("a", healthy=False)], 0.0) is None


# -- the registry ------------------------------------------------------------------------------------


def test_make_policy_by_name() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    assert make_policy("round_robin").name == "round_robin"
    assert make_policy("least_loaded").name == "least_loaded"
    assert {"round_robin", "least_loaded"} <= set(POLICIES)


def test_make_policy_gives_fresh_state() -> None:
    first, second = make_policy("round_robin"), make_policy("round_robin")
    views = [view("a"), view("b")]
    assert first.choose(LLAMA, views, 0.0) == "a"
    assert second.choose(LLAMA, views, 0.0) == "a"
