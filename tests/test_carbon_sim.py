"""Carbon in the simulator: fleet sites (PUE, grid intensity schedules), grams per policy, and
the efficiency policy's carbon objective."""

from __future__ import annotations

import json

import pytest
import yaml

from policies import make_policy
from policies.base import BackendView, RequestInfo
from policies.efficiency import Efficiency
from proxy.sim.fleet import FleetError, load_fleet, parse_fleet, simulate
from proxy.sim.simulate_cli import main_simulate
from proxy.sim.sites import CarbonSchedule, read_schedule_csv
from proxy.sim.traces import TraceRequest, main_trace, synth_trace
from tests.test_efficiency import h100_like

REQ = RequestInfo(model="llama-3.1-8b")
H100 = "h100-llama3.1-8b"


def two_sites(solar_kwh: float | str = 100, steady_kwh: float = 450) -> dict:
    solar = {"csv": solar_kwh} if isinstance(solar_kwh, str) else {"gco2e_per_kwh": solar_kwh}
    return {"sites": [{"name": "steady", "pue": 1.3, "carbon": {"gco2e_per_kwh": steady_kwh}},
                      {"name": "solar", "pue": 1.1, "carbon": solar}],
            # The dirty site is listed first: joules routing, indifferent between equal GPUs,
            # packs there; carbon routing must not.
            "backends": [{"name": "dirty", "profile": H100, "site": "steady"},
                         {"name": "clean", "profile": H100, "site": "solar"}]}


def test_schedule_is_a_step_function_held_at_both_ends(tmp_path) -> None:
    path = tmp_path / "grid.csv"
    path.write_text("t_s,gco2e_per_kwh\n10,400\n20,40\n30,200\n")
    s = read_schedule_csv(str(path))
    assert [s.at(t) for t in (0, 10, 19.9, 20, 29, 30, 1e9)] == [400, 400, 400, 40, 40, 200, 200]
    assert CarbonSchedule.constant(450).at(123.0) == 450


@pytest.mark.parametrize("body, match", [
    ("t_s,kwh\n0,1\n", "header"),
    ("t_s,gco2e_per_kwh\n0,1\n0,2\n", "must increase"),
    ("t_s,gco2e_per_kwh\n0,x\n", ":2: expected a t_s and a number"),
    ("t_s,gco2e_per_kwh\n0,-1\n", ">= 0"),
    ("t_s,gco2e_per_kwh\n", "no rows"),
])
def test_bad_schedule_csv_is_one_line_naming_the_row(tmp_path, body: str, match: str) -> None:
    (tmp_path / "grid.csv").write_text(body)
    (tmp_path / "fleet.yaml").write_text(
        "sites: [{name: s, pue: 1.2, carbon: {csv: grid.csv}}]\n"
        f"backends: [{{name: a, profile: {H100}, site: s}}]\n")
    with pytest.raises(FleetError, match=match):
        load_fleet(str(tmp_path / "fleet.yaml"))


def test_fleet_sites_resolve_and_csv_is_read_beside_the_fleet_file(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "grid.csv").write_text("t_s,gco2e_per_kwh\n0,300\n60,30\n")
    fleet_path = tmp_path / "sub" / "fleet.yaml"
    fleet_path.write_text(
        "sites:\n  - {name: solar, pue: 1.1, carbon: {csv: grid.csv}}\n"
        "  - {name: steady, carbon: {gco2e_per_kwh: 450}}\n"
        f"backends:\n  - {{name: a, profile: {H100}, count: 2, site: solar}}\n"
        f"  - {{name: b, profile: {H100}, site: steady}}\n")
    fleet = load_fleet(str(fleet_path))
    assert [b.site.name for b in fleet if b.site] == ["solar", "solar", "steady"]
    assert fleet[0].site is not None and fleet[0].site.carbon.at(61) == 30
    assert fleet[2].site is not None and fleet[2].site.pue == 1.0  # PUE defaults to 1
    assert parse_fleet({"backends": [{"profile": H100}]})[0].site is None  # sites optional


@pytest.mark.parametrize("change, match", [
    (lambda d: d["backends"][0].pop("site"), "site must name one of"),
    (lambda d: d["backends"][0].update(site="mars"), "site must name one of"),
    (lambda d: d["sites"][0].update(pue=0.9), "pue must be"),
    (lambda d: d["sites"][0].update(carbon={"gco2e_per_kwh": 1, "csv": "x"}), "carbon must be"),
    (lambda d: d["sites"][0].update(grid="x"), "unknown field 'grid'"),
    (lambda d: d["sites"].append(dict(d["sites"][0])), "appears twice"),
])
def test_bad_sites_are_refused(change, match: str) -> None:
    data = two_sites()
    change(data)
    with pytest.raises(FleetError, match=match):
        parse_fleet(data)


def test_grams_are_joules_times_pue_times_intensity_idle_included() -> None:
    # Constant grids: grams must equal the fleet's joules (the same idle window) x factor,
    # per backend and in total; a split of idle grams the same way.
    fleet = parse_fleet(two_sites(solar_kwh=200, steady_kwh=450))
    trace = synth_trace(4.0, 30.0, seed=5)
    r = simulate(fleet, trace, "round_robin")
    factor = {"dirty": 1.3 * 450 / 3.6e6, "clean": 1.1 * 200 / 3.6e6}
    for name, b in r.backends.items():
        assert b.gco2e == pytest.approx(b.joules * factor[name], rel=1e-6)
    assert r.gco2e_total == pytest.approx(sum(b.joules * factor[b.name]
                                              for b in r.backends.values()), rel=1e-6)
    assert r.idle_gco2e == pytest.approx(sum(b.idle_joules * factor[b.name]
                                             for b in r.backends.values()), rel=1e-6)
    assert r.gco2e_per_1k_output_tokens == pytest.approx(1e3 * r.gco2e_total / r.output_tokens)
    assert simulate(parse_fleet({"backends": [{"profile": H100}]}), trace,
                    "round_robin").gco2e_total is None


def test_grams_follow_a_schedule_over_time(tmp_path) -> None:
    # One GPU idling through a grid that goes 360 -> 36 at 20 s: idle energy before 20 s
    # costs ten times the grams of idle energy after it.
    (tmp_path / "g.csv").write_text("t_s,gco2e_per_kwh\n0,360\n20,36\n")
    (tmp_path / "f.yaml").write_text("sites: [{name: s, pue: 1.0, carbon: {csv: g.csv}}]\n"
                                     f"backends: [{{name: a, profile: {H100}, site: s}}]\n")
    fleet = load_fleet(str(tmp_path / "f.yaml"))
    trace = [TraceRequest(40.0, 10, 2)]  # one tiny request at 40 s: the run spans [0, 40]
    r = simulate(fleet, trace, "round_robin")
    idle_w = fleet[0].profile.idle_w
    expected = idle_w * 20 * (360 + 36) / 3.6e6
    assert r.idle_gco2e == pytest.approx(expected, rel=0.01)


def test_carbon_objective_prices_joules_by_pue_and_grid() -> None:
    models = {"dirty": h100_like(), "clean": h100_like()}
    views = [BackendView("dirty", True, 0, pue=1.3, gco2e_per_kwh=450),
             BackendView("clean", True, 0, pue=1.1, gco2e_per_kwh=100)]
    assert Efficiency(models).choose(REQ, views, 0.0) == "dirty"  # a tie: first listed
    carbon = make_policy("efficiency", models=models, objective="carbon")
    assert carbon.choose(REQ, views, 0.0) == "clean"
    # The clean site's grid turns dirtier than the other: back to the first.
    views[1] = BackendView("clean", True, 0, pue=1.1, gco2e_per_kwh=600)
    assert carbon.choose(REQ, views, 0.0) == "dirty"
    # Unknown intensity is priced at the highest known one: never preferred for it.
    views = [BackendView("clean", True, 0, gco2e_per_kwh=50), BackendView("dirty", True, 0)]
    assert carbon.choose(REQ, views, 0.0) == "clean"  # a tie at 50: the first listed
    views = [BackendView("clean", True, 0, gco2e_per_kwh=50), BackendView("dirty", True, 0),
             BackendView("mid", True, 0, pue=1.5, gco2e_per_kwh=200)]
    assert carbon.choose(REQ, views[1:], 0.0) == "dirty"  # 200 x 1.0 < 200 x 1.5
    with pytest.raises(ValueError):
        Efficiency(models, objective="grams")


def test_carbon_routing_moves_work_to_the_cleaner_site_within_the_slo() -> None:
    fleet = parse_fleet(two_sites(solar_kwh=60, steady_kwh=450))
    trace = synth_trace(4.0, 60.0, seed=2)
    joules = simulate(fleet, trace, "efficiency")
    carbon = simulate(fleet, trace, "efficiency", objective="carbon")
    assert joules.objective == "joules" and carbon.objective == "carbon"
    assert joules.backends["dirty"].requests > joules.backends["clean"].requests
    assert carbon.backends["clean"].requests > carbon.backends["dirty"].requests
    assert carbon.gco2e_per_1k_output_tokens < 0.8 * joules.gco2e_per_1k_output_tokens
    assert carbon.slo_attainment >= joules.slo_attainment - 0.005
    with pytest.raises(ValueError, match="objective carbon needs"):
        simulate(parse_fleet({"backends": [{"profile": H100}]}), trace, "efficiency",
                 objective="carbon")


def test_simulate_cli_objective_and_json_fields(tmp_path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(two_sites(solar_kwh=80)))
    trace = tmp_path / "trace.csv"
    assert main_trace(["synth", "--rate", "3", "--duration-s", "10", "--out", str(trace)]) == 0
    out = tmp_path / "out.json"
    assert main_simulate(["--fleet", str(fleet), "--trace", str(trace), "--policy",
                          "efficiency", "--objective", "carbon", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    entry = data["policies"]["efficiency"]
    assert entry["gco2e_total"] > 0 and entry["gco2e_per_1k_output_tokens"] > 0
    assert data["objective"] == "carbon"
    assert data["details"]["efficiency"]["backends"]["clean"]["gco2e"] > 0
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"backends: [{{name: a, profile: {H100}}}]\n")
    assert main_simulate(["--fleet", str(plain), "--trace", str(trace), "--objective",
                          "carbon"]) == 2
    assert main_simulate(["--fleet", str(plain), "--trace", str(trace), "--json",
                          str(out)]) == 0
    assert json.loads(out.read_text())["policies"]["efficiency"]["gco2e_total"] is None


def test_carbon_governor_parks_the_dirty_sites_idle_gpus_first() -> None:
    # The dirty site's A100s idle at fewer watts than the clean site's spare H100 but at 8x its
    # grams: under the carbon objective they are parked first.
    fleet = parse_fleet({
        "sites": [{"name": "steady", "pue": 1.3, "carbon": {"gco2e_per_kwh": 450}},
                  {"name": "solar", "pue": 1.1, "carbon": {"gco2e_per_kwh": 60}}],
        "backends": [{"name": "dirty", "profile": "a100-llama3.1-8b", "site": "steady", "count": 2},
                     {"name": "clean", "profile": H100, "site": "solar", "count": 2}]})
    trace = synth_trace(2.0, 120.0, seed=1)
    r = simulate(fleet, trace, "efficiency+governor", objective="carbon")
    assert r.governor is not None
    parked_s = {name: g["parked_s"] for name, g in r.governor.items()}
    assert r.backends["clean-0"].requests == len(trace) and parked_s["clean-0"] == 0.0
    assert min(parked_s["dirty-0"], parked_s["dirty-1"]) > parked_s["clean-1"] > 0.0
    assert r.slo_attainment == 1.0


def test_a_carbon_swap_hands_the_load_over_once_and_parks_the_relieved_backend(tmp_path) -> None:
    # a's grid is the cleaner until 60 s, then the dirtier: the governor wakes the parked b, and
    # a, drained (nothing new routed to it), is parked once empty. Without the drain the router
    # kept feeding a (already busy, so cheaper at the margin), and b idled and was parked again.
    (tmp_path / "g.csv").write_text("t_s,gco2e_per_kwh\n0,50\n60,800\n")
    (tmp_path / "f.yaml").write_text(
        "sites: [{name: sunset, pue: 1.1, carbon: {csv: g.csv}},\n"
        "        {name: steady, pue: 1.3, carbon: {gco2e_per_kwh: 400}}]\n"
        f"backends: [{{name: a, profile: {H100}, site: sunset}}, {{name: b, profile: {H100}, site: steady}}]\n")
    fleet = load_fleet(str(tmp_path / "f.yaml"))
    models: dict = {}
    simulate(fleet, synth_trace(8.0, 60.0, seed=9), "round_robin", models=models)  # both learnt
    r = simulate(fleet, synth_trace(2.0, 150.0, seed=1), "efficiency+governor", objective="carbon",
                 models=models, record_requests=True)
    assert r.governor is not None and r.request_log is not None
    a, b = r.governor["a"], r.governor["b"]
    assert b["parked_intervals_s"][0] == [15.0, 60.0] and b["swap_wakes"] == 1
    assert all(start >= 150.0 for start, _ in b["parked_intervals_s"][1:])  # after the last arrival
    assert a["parked_intervals_s"][0][0] <= 90.0
    # Only b serves from then, until a burst at 124 s that b, capped at its minimum, cannot take
    # within the router's SLO guard: a wakes for it (the only wake-up a gets).
    assert {name for name, sent_s, _ in r.request_log if 90.0 <= sent_s < 124.0} == {"b"}
    assert a["wakes"] == a["burst_wakes"] <= 1
    assert r.slo_attainment == 1.0
