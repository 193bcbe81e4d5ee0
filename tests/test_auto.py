"""Per-layer sensitivity, the budget search (compress --method auto) and recipe files."""

import json
from pathlib import Path

import pytest

from lowbit.auto import Budget, plan, plan_recipe, recipe_toml
from lowbit.cli import main
from lowbit.recipes import Recipe


def _table(costs: dict[str, dict[str, tuple[float, float]]], other_bytes: float = 100.0):
    """A sensitivity result from {layer: {cand: (drop, bytes)}} (energy = 10 x bytes,
    latency = bytes / 1000), whole-model figures = layers + ``other_bytes``."""
    layers = list(costs)
    cands = list(next(iter(costs.values())))
    rows = [
        {"layer": n, "candidate": c, "drop": d, "bytes": b, "energy_pj": 10 * b,
         "latency_ms": b / 1000, "accuracy": 0.9}
        for n in layers for c, (d, b) in costs[n].items()
    ]  # fmt: skip
    whole = {}
    for c in cands:
        tot = sum(costs[n][c][1] for n in layers) + other_bytes
        whole[c] = {"bytes": tot, "energy_pj": 10 * tot, "latency_ms": tot / 1000}
    return {"layers": layers, "candidates": cands, "rows": rows, "whole": whole}


SENS = _table({
    "a": {"int8": (0.0, 1000), "ternary": (0.1, 250), "binary": (3.0, 125)},
    "b": {"int8": (0.0, 4000), "ternary": (2.0, 1000), "binary": (6.0, 500)},
    "c": {"int8": (0.0, 200), "ternary": (0.5, 50), "binary": (1.0, 25)},
})  # fmt: skip


def test_plan_meets_a_byte_budget_cheapest_in_accuracy_first():
    # 5,300 bytes with all int8; budget 4,500: a -> ternary saves 750 at drop 0.1 (best
    # ratio), still 4,550 > 4,500; then c -> ternary (150 at 0.5) beats b (3,000 at 2.0 per
    # the capped excess): 4,400 bytes, drop 0.6
    p = plan(SENS, Budget(max_bytes=4500))
    assert p["feasible"]
    assert p["assignment"] == {"a": "ternary", "b": "int8", "c": "ternary"}
    assert p["estimate"]["bytes"] == 250 + 4000 + 50 + 100
    assert p["estimate"]["drop"] == pytest.approx(0.6)
    assert [s["layer"] for s in p["steps"]] == ["a", "c"]


def test_plan_with_an_accuracy_budget_keeps_compressing_inside_it():
    p = plan(SENS, Budget(max_accuracy_drop=1.0))
    assert p["feasible"] and p["estimate"]["drop"] <= 1.0 + 1e-9
    # within 1 point: a and c can go to ternary (0.6), not b (2.0)
    assert p["assignment"]["b"] == "int8" and p["assignment"]["a"] == "ternary"
    assert p["estimate"]["bytes"] < 5300


def test_infeasible_budget_reports_the_closest_point_and_the_floor():
    p = plan(SENS, Budget(max_bytes=500))
    assert not p["feasible"]
    assert p["floor"]["bytes"] == 125 + 500 + 25 + 100
    assert p["violations"]["bytes"]["estimate"] >= p["floor"]["bytes"]
    both = plan(SENS, Budget(max_bytes=2000, max_accuracy_drop=1.0))
    assert not both["feasible"]  # bytes need b off int8, which costs >= 2 points


def test_budget_validation():
    with pytest.raises(ValueError, match="needs a budget"):
        Budget()
    with pytest.raises(ValueError, match="positive"):
        Budget(max_bytes=-1)
    with pytest.raises(ValueError, match="latency"):
        plan({**SENS, "whole": {c: {**w, "latency_ms": None} for c, w in SENS["whole"].items()}},
             Budget(max_latency_ms=1.0))  # fmt: skip


def test_recipe_toml_round_trip(tmp_path):
    rec = plan_recipe({"conv1": "int8", "conv2": "sst-8-2", "fc1": "ternary", "fc2": "int4"})
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(rec, "a comment\nover two lines"))
    back = Recipe.load(path)
    assert back.method == "auto"
    assert [(r.name, r.weights, r.activations) for r in back.rules] == [
        (r.name, r.weights, r.activations) for r in rec.rules
    ]


@pytest.fixture(scope="module")
def fp_ckpt(tmp_path_factory):
    from lowbit.train import TrainConfig
    from lowbit.workflow import train_model

    out = tmp_path_factory.mktemp("fp")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False, seed=0)
    return train_model("lenet5", "sample", out, cfg, limit_train=2000, limit_test=300)["checkpoint"]


def test_sensitivity_table_and_plot(fp_ckpt, tmp_path, capsys):
    code = main(["sensitivity", fp_ckpt, "--out", str(tmp_path / "s"), "--candidates",
                 "int8,binary", "--calib-images", "64", "--holdout", "200", "--repeats", "2",
                 "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["layers"] == ["conv1", "conv2", "fc1", "fc2"]
    assert len(res["rows"]) == 8 and not res["skipped"]
    by = {(r["layer"], r["candidate"]): r for r in res["rows"]}
    fc1 = res["fp_layers"]["fc1"]
    assert by["fc1", "int8"]["bytes_saved"] == pytest.approx(
        fc1["bytes"] - by["fc1", "int8"]["bytes"]
    )
    assert by["fc1", "binary"]["bytes"] < by["fc1", "int8"]["bytes"] < fc1["bytes"]
    assert by["fc1", "int8"]["drop"] <= 1.5  # int8 on one layer barely matters
    assert all(r["latency_ms"] is not None and r["latency_ms"] > 0 for r in res["rows"])
    assert (tmp_path / "s" / "sensitivity.png").stat().st_size > 10_000
    assert "| fc1 | binary |" in (tmp_path / "s" / "sensitivity.md").read_text()


def test_compress_auto_meets_the_budget_and_the_recipe_reruns(fp_ckpt, tmp_path, capsys):
    base = ["--model", "lenet5", "--data", "sample", "--from", fp_ckpt, "--epochs", "1",
            "--limit-train", "512", "--limit-test", "200", "--quiet", "--json"]  # fmt: skip
    # LeNet-5 fp32 stores ~1.7 MB; a tenth of it, with the default candidates
    code = main(["compress", "--method", "auto", "--max-bytes", "170000", "--out",
                 str(tmp_path / "a"), "--method-arg", "holdout=200", "--method-arg",
                 "calib_images=64", *base])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["budget_met"] and res["budget"]["bytes"]["measured"] <= 170000
    assert res["storage_bytes"] <= 170000 and Path(res["packed"]).is_file()
    assert set(res["plan"]) == {"conv1", "conv2", "fc1", "fc2"}
    code = main(["compress", "--recipe", res["recipe_file"], "--out", str(tmp_path / "b"), *base])
    out, err = capsys.readouterr()
    assert code == 0, err
    again = json.loads(out)
    assert again["method"] == "auto" and again["storage_bytes"] == res["storage_bytes"]
    code = main(["compress", "--method", "auto", "--max-bytes", "100", "--out",
                 str(tmp_path / "c"), "--method-arg", "holdout=100", "--method-arg",
                 "calib_images=32", *base])  # fmt: skip
    out, _ = capsys.readouterr()
    msg = json.loads(out)["error"]
    assert code != 0 and "cannot be met" in msg and "least reachable" in msg
    assert not (tmp_path / "c" / "qat").exists()  # said before any training
