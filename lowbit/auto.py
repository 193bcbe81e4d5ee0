"""Compression to a budget: ``lowbit compress --method auto --max-bytes ...``.

1. The FP model (``--from``, or trained here).
2. The per-layer sensitivity table (``lowbit.sensitivity``): for every layer and candidate
   codec, the accuracy drop when only that layer is quantized, and its bytes, energy and
   measured runtime latency.
3. A greedy search picks one codec per layer (``plan``):

   - start with every layer on the candidate with the least drop (ties: more bytes, the
     safer codec);
   - while a resource budget (bytes, energy, latency) is exceeded, apply the move (one
     layer to another candidate) with the smallest accuracy cost per unit of the excess
     it removes: ``max(d_drop, eps) / sum_r min(saved_r / excess_r, 1)`` over the
     exceeded resources, never breaking the accuracy budget;
   - with an accuracy budget (``max_accuracy_drop``), then keep compressing: moves that
     save bytes, cheapest drop per byte first, while the estimated drop stays inside it.

   Estimates: a model's bytes / energy / latency = the sum of its layers' figures plus
   what the rest of the model costs (normalization, pooling, additions: the whole-model
   figure minus its layers', taken with every layer on the plan's most common codec); its
   accuracy drop = the sum of the layers' drops (layers are assumed independent; QAT
   afterwards usually recovers much of it). A greedy search is not optimal (a knapsack
   over the same table would be, for a single budget); it is simple, fast and explains
   each step (``plan()["steps"]``).
4. If no plan meets the budgets, lowbit says so before training, with the closest plan it
   reached and the smallest figure each resource can reach.
5. QAT with the chosen recipe (written to ``OUT/recipe.toml``: edit it and rerun with
   ``lowbit compress --recipe OUT/recipe.toml ...``), freeze, pack, and the budget checked
   on the packed model: bytes = the packed tensors, energy = the cost model of the frozen
   model, latency = lowbit's runtime on this machine (batch 1, one thread, median).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .sensitivity import DEFAULT_CANDIDATES

__all__ = ["Budget", "plan", "plan_recipe", "recipe_toml", "compress_auto", "BudgetError"]

_RES = {"bytes": "max_bytes", "energy_pj": "max_energy_pj", "latency_ms": "max_latency_ms"}


class BudgetError(ValueError):
    """No plan meets the budget (raised before any training)."""


@dataclass(frozen=True)
class Budget:
    max_bytes: float | None = None
    max_energy_pj: float | None = None
    max_latency_ms: float | None = None
    max_accuracy_drop: float | None = None  # points

    def __post_init__(self):
        for k, v in asdict(self).items():
            if v is not None and not v > 0 and not (k == "max_accuracy_drop" and v == 0):
                raise ValueError(f"budget {k} must be positive, got {v}")
        if all(v is None for v in asdict(self).values()):
            raise ValueError(
                "--method auto needs a budget: --max-bytes, --max-energy-pj, "
                "--max-latency-ms and/or --max-accuracy-drop"
            )

    def limits(self) -> dict[str, float]:
        return {r: getattr(self, k) for r, k in _RES.items() if getattr(self, k) is not None}


def _tables(sens: dict[str, Any]):
    """(layer -> cand -> {drop, bytes, energy_pj, latency_ms}, other costs per candidate)."""
    per: dict[str, dict[str, dict[str, float | None]]] = {n: {} for n in sens["layers"]}
    for r in sens["rows"]:
        per[r["layer"]][r["candidate"]] = {
            "drop": r["drop"], "bytes": r["bytes"], "energy_pj": r["energy_pj"],
            "latency_ms": r["latency_ms"],
        }  # fmt: skip
    other: dict[str, dict[str, float | None]] = {}
    for cand, whole in sens.get("whole", {}).items():
        other[cand] = {}
        for res in _RES:
            vals = [per[n].get(cand, {}).get(res) for n in per]
            tot = whole.get(res)
            ok = tot is not None and all(v is not None for v in vals)
            other[cand][res] = tot - sum(vals) if ok else None
    return per, other


def _totals(assign: dict[str, str], per, other) -> dict[str, float | None]:
    counts: dict[str, int] = {}
    for c in assign.values():
        counts[c] = counts.get(c, 0) + 1
    common = max(counts, key=counts.get)
    out: dict[str, float | None] = {"drop": sum(per[n][c]["drop"] for n, c in assign.items())}
    for res in _RES:
        vals = [per[n][c][res] for n, c in assign.items()]
        rest = other.get(common, {}).get(res)
        out[res] = None if rest is None or any(v is None for v in vals) else sum(vals) + rest
    return out


def plan(sens: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Choose a codec per layer from a sensitivity result (see the module docstring).
    Returns ``{"assignment", "estimate", "feasible", "violations", "steps", "floor"}``."""
    per, other = _tables(sens)
    limits = budget.limits()
    for res in limits:
        if _totals({n: next(iter(c)) for n, c in per.items() if c}, per, other)[res] is None:
            raise ValueError(
                f"the sensitivity table has no {res} figures (was it run with --no-latency?)"
            )
    missing = [n for n, c in per.items() if not c]
    if missing:
        raise ValueError(f"no candidate codec fits layer(s) {', '.join(missing)}")
    assign = {
        n: min(c, key=lambda k, c=c: (c[k]["drop"], -(c[k]["bytes"] or 0))) for n, c in per.items()
    }
    max_drop = budget.max_accuracy_drop
    steps: list[dict[str, Any]] = []

    def drop_ok(total: float) -> bool:
        return max_drop is None or total <= max_drop + 1e-9

    for _ in range(len(per) * len(sens["candidates"]) + 1):  # phase 1: resource budgets
        tot = _totals(assign, per, other)
        excess = {r: tot[r] - lim for r, lim in limits.items() if tot[r] > lim}
        if not excess:
            break
        best = None
        for n, cands in per.items():
            cur = cands[assign[n]]
            for c, v in cands.items():
                if c == assign[n]:
                    continue
                gain = sum(min(max(cur[r] - v[r], 0.0) / e, 1.0) for r, e in excess.items())
                d = v["drop"] - cur["drop"]
                if gain <= 0 or not drop_ok(tot["drop"] + d):
                    continue
                score = max(d, 1e-3) / gain
                if best is None or score < best[0]:
                    best = (score, n, c, d)
        if best is None:
            break
        _, n, c, d = best
        steps.append({"layer": n, "from": assign[n], "to": c, "drop_change": d, "phase": 1})
        assign[n] = c
    tot = _totals(assign, per, other)
    if max_drop is not None and all(tot[r] <= lim for r, lim in limits.items()):
        for _ in range(len(per) * len(sens["candidates"])):  # phase 2: compress within drop
            best = None
            for n, cands in per.items():
                cur = cands[assign[n]]
                for c, v in cands.items():
                    saved = cur["bytes"] - v["bytes"]
                    d = v["drop"] - cur["drop"]
                    if c == assign[n] or saved <= 0 or not drop_ok(tot["drop"] + d):
                        continue
                    trial = _totals({**assign, n: c}, per, other)
                    if any(trial[r] > lim for r, lim in limits.items()):
                        continue
                    score = max(d, 1e-3) / saved
                    if best is None or score < best[0]:
                        best = (score, n, c, d)
            if best is None:
                break
            _, n, c, d = best
            steps.append({"layer": n, "from": assign[n], "to": c, "drop_change": d, "phase": 2})
            assign[n] = c
            tot = _totals(assign, per, other)
    violations = {r: {"limit": lim, "estimate": tot[r]} for r, lim in limits.items()
                  if tot[r] > lim}  # fmt: skip
    if max_drop is not None and not drop_ok(tot["drop"]):
        violations["accuracy_drop"] = {"limit": max_drop, "estimate": tot["drop"]}
    floor = {}  # the least each resource can reach, every layer on its cheapest candidate
    for res in _RES:
        cheapest = {n: min(c, key=lambda k, c=c, r=res: c[k][r] or 0.0) for n, c in per.items()}
        floor[res] = _totals(cheapest, per, other)[res]
    return {"assignment": assign, "estimate": tot, "feasible": not violations,
            "violations": violations, "steps": steps, "floor": floor}  # fmt: skip


def plan_recipe(assignment: dict[str, str]):
    """The Recipe of a plan: one rule per layer (by name), int8 activations."""
    from .ptq import parse_weight_codec
    from .recipes import Recipe, Rule

    rules = [Rule(parse_weight_codec(c), "int8", name=n) for n, c in assignment.items()]
    return Recipe("auto", rules, {"assignment": dict(assignment)})


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if v is None:
        raise ValueError("TOML has no null")
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _codec_table(codec) -> dict[str, Any]:
    d = codec.to_dict()
    return {"type": d["_type"], **{k: v for k, v in d["_data"].items() if v is not None}}


def recipe_toml(recipe, comment: str = "") -> str:
    """A recipe as TOML (``Recipe.load`` reads it back)."""
    lines = [f"# {line}" for line in comment.splitlines()] + [
        f"method = {_toml_value(recipe.method)}",
        "",
    ]
    for r in recipe.rules:
        sel = f"name = {_toml_value(r.name)}" if r.name else f"select = {_toml_value(r.select)}"
        lines += [
            "[[rules]]",
            sel,
            f"weights = {_toml_value(_codec_table(r.weights))}",
            f"activations = {_toml_value(_codec_table(r.activations))}",
            "",
        ]
    return "\n".join(lines)


def _measure_latency(path: str, repeats: int = 30) -> float:
    import time

    import numpy as np

    from .runtime import load

    engine = load(path, threads=1)
    x = np.zeros((1, *engine.input_shape), np.float32)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine(x)
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def compress_auto(
    method: str,
    model: str,
    data: str,
    out: str | os.PathLike,
    config,
    data_dir=None,
    model_kwargs: dict[str, Any] | None = None,
    from_checkpoint=None,
    fp_config=None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    method_options: dict[str, Any] | None = None,
    convention: str = "operand-width",
    resume: bool = False,
) -> dict[str, Any]:
    """``lowbit compress --method auto``: same arguments and result keys as
    ``lowbit.workflow.compress_model`` (which dispatches here) plus ``budget`` and
    ``plan``. ``method_options``: the budget (max_bytes, max_energy_pj, max_latency_ms,
    max_accuracy_drop), ``candidates`` (comma-separated codecs), ``calib_images``,
    ``holdout``, and where the sensitivity pass runs: ``workers`` (local processes) or
    ``ray`` (a Ray address; see ``lowbit.sweep``)."""
    from .sensitivity import run_sensitivity
    from .utils import atomic_write, write_json
    from .workflow import compress_model, train_model

    opts = dict(method_options or {})
    known = set(_RES.values()) | {"max_accuracy_drop", "candidates", "calib_images", "holdout",
                                  "workers", "ray"}  # fmt: skip
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"unknown auto option(s) {unknown}; valid: {', '.join(sorted(known))}")
    budget = Budget(**{k: float(opts[k]) for k in (*_RES.values(), "max_accuracy_drop")
                       if opts.get(k) is not None})  # fmt: skip
    cands = opts.get("candidates") or ",".join(DEFAULT_CANDIDATES)
    cands = [c.strip() for c in str(cands).split(",") if c.strip()]
    out = Path(out)
    if from_checkpoint is None:
        fp = train_model(model, data, out / "fp", fp_config or config, data_dir, model_kwargs,
                         limit_train, limit_test)  # fmt: skip
        from_checkpoint = fp["checkpoint"]
    sens = run_sensitivity(
        from_checkpoint, out / "sensitivity", data=data, data_dir=data_dir, candidates=cands,
        calib_images=int(opts.get("calib_images", 256)), holdout=int(opts.get("holdout", 1000)),
        convention=convention, latency=budget.max_latency_ms is not None, seed=config.seed,
        workers=int(opts.get("workers", 1)), ray_address=opts.get("ray"),
    )  # fmt: skip
    chosen = plan(sens, budget)
    write_json(out / "plan.json", chosen)
    if not chosen["feasible"]:
        raise BudgetError(_infeasible_message(chosen, budget))
    recipe = plan_recipe(chosen["assignment"])
    est = chosen["estimate"]
    note = (
        f"lowbit auto recipe for {model} on {data}; budget {budget.limits()} "
        f"max_accuracy_drop={budget.max_accuracy_drop}\n"
        f"estimate: {est}\nrerun: lowbit compress --recipe THIS_FILE --model {model} "
        f"--data {data} --from FP_CKPT --out DIR"
    )
    with atomic_write(out / "recipe.toml", "w") as f:
        f.write(recipe_toml(recipe, note))
    result = compress_model(
        "auto", model, data, out, config, data_dir, model_kwargs, from_checkpoint, fp_config,
        limit_train, limit_test, None, convention, resume, recipe=recipe,
    )  # fmt: skip
    measured = {"bytes": result["storage_bytes"], "energy_pj": result["energy_pj"]}
    if budget.max_latency_ms is not None and result.get("packed"):
        measured["latency_ms"] = _measure_latency(result["packed"])
    check = {
        r: {"limit": lim, "estimate": est[r], "measured": measured.get(r),
            "met": measured.get(r) is not None and measured[r] <= lim}
        for r, lim in budget.limits().items()
    }  # fmt: skip
    if budget.max_accuracy_drop is not None and result.get("fp_test_accuracy") is not None:
        drop = 100 * (result["fp_test_accuracy"] - result["test_accuracy"])
        check["accuracy_drop"] = {
            "limit": budget.max_accuracy_drop,
            "estimate": est["drop"],
            "measured": drop,
            "met": drop <= budget.max_accuracy_drop,
        }
    result.update(
        {
            "budget": check,
            "budget_met": all(v["met"] for v in check.values()),
            "plan": chosen["assignment"],
            "recipe_file": str(out / "recipe.toml"),
        }
    )
    write_json(out / "result.json", result)
    return result


def _infeasible_message(chosen: dict[str, Any], budget: Budget) -> str:
    parts = [
        f"{r}: limit {v['limit']:.6g}, closest plan reaches {v['estimate']:.6g}"
        + (f" (the least reachable is {chosen['floor'][r]:.6g})" if r in chosen["floor"] else "")
        for r, v in chosen["violations"].items()
    ]
    return (
        "the budget cannot be met with these candidate codecs (estimated from the sensitivity "
        "table, before any training): " + "; ".join(parts) + ". Relax the budget or add "
        "cheaper candidates (--method-arg candidates=...); the plan is in plan.json."
    )
