"""ddt.halving on hand-made curves: the keep rule, blocking, the decision record and the device-hours (fast)."""
import json
import math

import pytest

from ddt.halving import decide_rung, decision_path, read_decisions, record_decision, rung_table, study_cost

T_975_1 = 12.706204736174707  # scipy.stats.t.ppf(0.975, 1): two seeds
RUNG = 200


def run(cid: str, seed: int, value: float | None, metric: str = "fid", num_samples: int = 1000,
        status: str = "completed", **extra) -> dict:
    """A results.json as the runner leaves it: a point at step 100 and, unless value is None, one at the rung."""
    curve = [{"step": 100, metric: 99.0, "num_samples": num_samples, "final": False}]
    if value is not None:
        curve.append({"step": RUNG, metric: value, "num_samples": num_samples, "final": False})
    return {"run_dir": f"/study/{cid}-s{seed}", "config_id": cid, "config": {"seed": seed}, "status": status,
            "curve": curve, **extra}


def pair(cid: str, low: float, high: float, **kw) -> list[dict]:
    """Two seeds of a configuration: mean (low + high) / 2, 95% interval t(0.975, 1) * (high - low) / 2."""
    return [run(cid, 0, low, **kw), run(cid, 1, high, **kw)]


def by_id(decision) -> dict:
    return {c.config_id: c for c in decision.configs}


def test_overlap_keeps_a_configuration_below_the_cut():
    runs = pair("a", 10.0, 10.2) + pair("b", 11.0, 11.2) + pair("c", 12.0, 12.2) + pair("d", 20.0, 20.2)
    d = decide_rung(runs, RUNG, eta=2)
    # n = 4, keep ceil(4/2) = 2: a and b by rank; c's [12.1 ± 1.27] reaches the best's [10.1 ± 1.27]; d does not.
    assert d.status == "decided" and (d.n, d.keep) == (4, 2)
    assert d.cut == pytest.approx(11.1) and d.best == "a"
    assert set(d.kept) == {"a", "b", "c"} and d.pruned == ["d"]
    c = by_id(d)
    assert [c[k].rule for k in "abcd"] == ["rank", "rank", "overlap", "cut"]
    assert [c[k].rank for k in "abcd"] == [1, 2, 3, 4]
    assert c["c"].value == pytest.approx(12.1) and c["c"].ci95 == pytest.approx(T_975_1 * 0.1)
    assert c["c"].n == 2 and c["c"].seeds == [0, 1] and c["c"].runs == ["c-s0", "c-s1"]


def test_intervals_apart_from_the_best_are_cut():
    # c's interval 12.1 ± 0.127 (seeds 0.01 apart) no longer reaches a's 10.1 ± 0.127
    runs = pair("a", 10.09, 10.11) + pair("b", 11.0, 11.2) + pair("c", 12.09, 12.11) + pair("d", 20.0, 20.2)
    d = decide_rung(runs, RUNG, eta=2)
    assert set(d.kept) == {"a", "b"} and set(d.pruned) == {"c", "d"}
    assert by_id(d)["c"].rule == "cut" and "apart" in by_id(d)["c"].reason


def test_one_seed_rank_alone_decides_and_says_so():
    runs = [run("a", 0, 10.0), run("b", 0, 11.0), run("c", 0, 12.0), run("d", 0, 20.0)]
    d = decide_rung(runs, RUNG, eta=2)
    assert set(d.kept) == {"a", "b"} and set(d.pruned) == {"c", "d"}
    c = by_id(d)["c"]
    assert c.ci95 is None and c.interval == "one seed" and c.rule == "cut" and "one seed" in c.reason
    assert "one seed" in by_id(d)["a"].reason


def test_ties_at_the_cut_are_kept():
    runs = [run("a", 0, 10.0), run("b", 0, 12.0), run("c", 0, 12.0), run("d", 0, 15.0)]
    d = decide_rung(runs, RUNG, eta=3)  # keep ceil(4/3) = 2; b and c share the 2nd place
    assert (d.keep, d.cut) == (2, 12.0)
    assert set(d.kept) == {"a", "b", "c"} and d.pruned == ["d"]
    c = by_id(d)
    assert (c["b"].rule, c["c"].rule, c["a"].rule) == ("tie at the cut", "tie at the cut", "rank")
    assert (c["b"].rank, c["c"].rank, c["d"].rank) == (2, 2, 4)


def test_higher_is_better_metric_keeps_the_largest():
    runs = [run("a", 0, 5.0, metric="isc_mean"), run("b", 0, 9.0, metric="isc_mean"), run("c", 0, 7.0, metric="isc_mean")]
    d = decide_rung(runs, RUNG, eta=3, metric="isc_mean")
    assert d.higher_is_better and d.kept == ["b"] and d.cut == 9.0
    assert [(c.config_id, c.rank) for c in d.configs] == [("b", 1), ("c", 2), ("a", 3)]
    lower = [run(r["config_id"], 0, r["curve"][-1]["isc_mean"]) for r in runs]  # same numbers read as FID
    assert decide_rung(lower, RUNG, eta=3).kept == ["a"]
    with pytest.raises(ValueError, match="direction"):
        decide_rung(runs, RUNG, metric="isc_std")


def test_a_failed_or_missing_point_blocks_the_decision():
    runs = pair("a", 10.0, 10.2) + [run("b", 0, 30.0), run("b", 1, None, status="failed"),
                                     run("c", 0, None, status="running", state="pending"), run("c", 1, 40.0)]
    d = decide_rung(runs, RUNG, eta=2)
    assert d.status == "blocked" and d.configs == [] and d.kept == []
    assert d.blocked == [{"run": "b-s1", "config_id": "b", "seed": 1, "reason": "failed"},
                         {"run": "c-s0", "config_id": "c", "seed": 0, "reason": "not reached (pending)"}]
    with pytest.raises(ValueError, match="only a taken decision"):
        record_decision("/nonexistent", RUNG, d)


def test_another_sample_count_blocks():
    runs = pair("a", 10.0, 10.2) + [run("b", 0, 30.0), run("b", 1, 31.0, num_samples=500)]
    d = decide_rung(runs, RUNG, eta=2)
    assert d.status == "blocked" and d.num_samples == 1000
    assert d.blocked == [{"run": "b-s1", "config_id": "b", "seed": 1, "reason": "num_samples 500, the rung's is 1000"}]


def test_dropping_the_failed_point_unblocks_it():
    runs = pair("a", 10.0, 10.2) + [run("b", 0, 30.0), run("b", 1, None, status="failed")]
    for dropped in (["b-s1"], ["/study/b-s1"]):
        d = decide_rung(runs, RUNG, eta=2, dropped=dropped)
        assert d.status == "decided" and d.dropped == ["b-s1"]
        assert d.kept == ["a"] and d.pruned == ["b"]  # keep ceil(2/2) = 1; b has one seed left: rank decides
        b = by_id(d)["b"]
        assert (b.n, b.ci95, b.value, b.runs) == (1, None, 30.0, ["b-s0"]) and "one seed" in b.reason


def test_configurations_pruned_earlier_are_not_counted():
    runs = [run("a", 0, 10.0), run("b", 0, 11.0), run("c", 0, None, status="failed")]
    d = decide_rung(runs, RUNG, eta=2, pruned=["c"])  # c stopped at an earlier rung: neither counted nor blocking
    assert (d.n, d.keep, d.kept, d.pruned) == (2, 1, ["a"], ["b"])


def test_a_written_decision_is_not_changed_by_a_second_call(tmp_path):
    first = decide_rung([run("a", 0, 10.0), run("b", 0, 11.0)], RUNG, eta=2)
    assert record_decision(tmp_path, RUNG, first) == first
    written = decision_path(tmp_path, RUNG).read_bytes()
    other = decide_rung([run("a", 0, 12.0), run("b", 0, 11.0)], RUNG, eta=2)
    assert other.kept == ["b"]
    again = record_decision(tmp_path, RUNG, other)
    assert again.kept == ["a"] and again == first
    assert decision_path(tmp_path, RUNG).read_bytes() == written
    assert json.loads(written)["configs"][0]["config_id"] == "a"
    assert read_decisions(tmp_path) == {RUNG: first}
    assert [p.name for p in decision_path(tmp_path, RUNG).parent.iterdir()] == [f"rung_{RUNG}.json"]


def costed(cid: str, seed: int, step: int, train_s: float, curve_s: list[float], final_s: float | None) -> dict:
    out = {"run_dir": f"/study/{cid}-s{seed}", "config_id": cid, "config": {"seed": seed},
           "device": {"type": "cuda", "name": "H100", "count": 2}, "train": {"step": step, "total_wall_time_s": train_s},
           "curve": [{"step": 100 * (i + 1), "fid": 1.0, "final": False, "wall_time_s": s} for i, s in enumerate(curve_s)]}
    if final_s is not None:
        out.update(sample={"wall_time_s": final_s / 2}, evaluate={"wall_time_s": final_s / 2})
    return out


def test_device_hours_against_the_full_grid():
    runs = [costed("a", 0, 300, 1800, [36, 36], 180),  # 2 devices: train 1.0 h (1/300 h a step), curve 0.04, final 0.1
            costed("a", 1, 300, 2160, [36, 36], 180),  # train 1.2 h (0.004 h a step), curve 0.04, final 0.1
            costed("b", 0, 100, 900, [36], None)]      # pruned at 100: train 0.5 h (0.005 h a step), curve 0.02
    cost = study_cost(runs, last_rung=300)
    # spent 1.14 + 1.34 + 0.52; full grid trains a0, a1, b0 and b1 (never run: b's rate) to 300, plus the
    # 0.3 h of evaluations spent: 1.0 + 1.2 + 1.5 + 1.5 + 0.3
    assert cost["spent"] == pytest.approx(3.0) and cost["spent_train"] == pytest.approx(2.7)
    assert cost["full_grid_train"] == pytest.approx(5.2) and cost["full_grid"] == pytest.approx(5.5)
    assert cost["saving"] == pytest.approx(2.5) and cost["saving_share"] == pytest.approx(round(2.5 / 5.5, 4))
    assert (cost["grid"], cost["unmeasured"]) == (4, 1)


def test_rung_table_shows_values_decisions_and_reasons():
    first = decide_rung(pair("a", 10.0, 10.2) + pair("b", 11.0, 11.2) + pair("c", 20.0, 20.2), RUNG, eta=2)
    blocked = decide_rung(pair("a", 9.0, 9.2, ) + [run("b", 0, 10.0), run("b", 1, None, status="cancelled")],
                          RUNG, eta=2)
    lines = rung_table([first], labels={"a": "8en4de"}).splitlines()
    assert lines[0] == "halving on fid (lower is better), eta 2"
    assert lines[1].split()[:3] == ["configuration", "rung", "200"]
    ci = f"{T_975_1 * 0.1:.2f}"
    assert lines[2].startswith("8en4de") and f"10.10 ± {ci} (n=2) kept" in lines[2] and "(rank)" in lines[2]
    assert lines[4].startswith("c") and f"20.10 ± {ci} (n=2) PRUNED" in lines[4] and "pruned at 200 (cut)" in lines[4]
    assert "blocked: b-s1 cancelled" in rung_table([blocked])
    assert "(one seed)" in rung_table([decide_rung([run("a", 0, 1.0), run("b", 0, 2.0)], RUNG)])
    assert not math.isnan(first.cut)


def test_runs_as_the_runner_writes_them_group_by_config_id(tmp_path):
    from ddt.config import config_id
    from test_analysis_stats import results_json  # nested config, curve at 100/200/300, seeds x, x + 2, x + 7

    runs = [results_json(depth, seed, tmp_path / f"d{depth}-s{seed}") for depth in (8, 22) for seed in range(3)]
    d = decide_rung(runs, 200, eta=3)  # FID 200/202/207 (split 8) against 120/122/127 (split 22)
    eight, twenty_two = (config_id(results_json(depth, 0, tmp_path)["config"]) for depth in (8, 22))
    assert (d.num_samples, d.n, d.keep, d.kept, d.pruned) == (200, 2, 1, [twenty_two], [eight])
    ci = 4.302652729911275 * math.sqrt(13) / math.sqrt(3)  # t(0.975, 2) * std{0, 2, 7} / sqrt(3)
    c = by_id(d)[eight]
    assert (c.value, c.n, c.seeds, c.rule) == (pytest.approx(203.0), 3, [0, 1, 2], "cut")
    assert c.ci95 == pytest.approx(ci) and c.runs == ["d8-s0", "d8-s1", "d8-s2"]
