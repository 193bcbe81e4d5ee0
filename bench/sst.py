"""SST: compression from the frozen model's stored tensors, and accuracy at equal budget.

Parts (``--part``, default all; results merge into bench/results/sst.json and sst.md):

- ``compression``: full-width ``vgg_small`` (shapes only: random weights, one batch to set
  the activation ranges), each preset frozen; the ratio against fp32 counted from what
  the frozen model stores (codes at their packing, scales, biases, requantization
  constants) for the SST layers alone and for the whole model, checked against the
  packed file's payload.
- ``speed``: whole SST(8, 2) ``vgg_small`` on the int8 GEMM vs the look-up-table kernel.
- ``linear``: one 1024 x 1024 linear layer, SST(8, 2) on the look-up-table kernel against
  the same layer ternary (the kernel a ternary layer runs) and SST on the int8 GEMM, batch
  1 and 32 (the target of the runtime issue: at batch 1 the look-up path should win).
- ``mnist``: ``lenet300`` on MNIST. Budget E = FP1 + QAT epochs: FP for FP1 epochs, then
  SST QAT from it; the same-budget reference is FP for all E epochs.
- ``cifar``: ``vgg_small`` width 0.25 on CIFAR-10, the same scheme.

Runs live under bench/runs/sst and resume (rerun the same command to continue).

    LOWBIT_DATA=../shared/data python bench/sst.py --part compression
    LOWBIT_DATA=../shared/data python bench/sst.py --part mnist
    LOWBIT_DATA=../shared/data python bench/sst.py --part cifar --presets 8,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lowbit  # noqa: E402
from lowbit import sstcode  # noqa: E402
from lowbit.freeze import freeze  # noqa: E402
from lowbit.methods.sst import sst_recipe  # noqa: E402
from lowbit.packfile import save  # noqa: E402
from lowbit.train import TrainConfig, load_checkpoint  # noqa: E402
from lowbit.utils import write_json  # noqa: E402
from lowbit.workflow import compress_model, train_model  # noqa: E402

RESULTS = HERE / "results" / "sst.json"
PRESETS = ((8, 2), (4, 1), (8, 1))
PAPER = "x23 to x32 (fully connected DNN, VGG-9 about x29, AlexNet about x32)"


def compression(presets) -> dict:
    rows = []
    for n, k in presets:
        torch.manual_seed(0)
        net = lowbit.compress_(lowbit.models.create("vgg_small"), sst_recipe(n=n, k=k))
        net.train()
        with torch.no_grad():
            net(torch.randn(32, 3, 32, 32))
        frozen = freeze(net.eval(), torch.zeros(1, 3, 32, 32))
        report = lowbit.analyze(frozen)
        sst_fp32 = sst_bits = 0.0
        for op, layer in zip(frozen.layers(), report["layers"], strict=True):
            if op.attrs["weight_codec"]["_type"] != "sst":
                continue
            w = op.tensors["codes"].numel()
            b = op.tensors["codes"].shape[0] if op.attrs.get("has_bias") else 0
            sst_fp32 += 32.0 * (w + b)
            sst_bits += layer["storage_bits"]
        with tempfile.TemporaryDirectory() as d:
            info = save(frozen, Path(d) / "m.lowbit")
        rows.append({
            "n": n, "k": k,
            "codebook": sstcode.codebook_size(n, k),
            "index_bits": sstcode.index_bits(n, k),
            "sst_layers_vs_fp32": sst_fp32 / sst_bits,
            "whole_model_vs_fp32": report["ratios"]["storage_vs_fp32"],
            "storage_bytes": report["totals"]["storage_bytes"],
            "payload_bytes": info["payload_bytes"],
            "header_bytes": info["header_bytes"],
            "fp32_bytes": report["baselines"]["fp32_storage_bytes"],
        })  # fmt: skip
    return {
        "model": "vgg_small (full width, 4.6M weights); first conv int8 (first=auto)",
        "command": "python bench/sst.py --part compression",
        "rows": rows,
    }


def speed(args) -> dict:
    """Whole-model latency of one SST(8, 2) vgg_small (full width and width 0.25) with its
    SST layers on the int8 GEMM and on the look-up-table kernel, side by side with
    PyTorch fp32 (the same float model), batch 1, one thread, medians of ``repeats``."""
    import numpy as np

    from lowbit.runtime import engine

    def _ms(fn, x, n: int = 5) -> float:
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts))

    torch.set_num_threads(1)
    rows = []
    for width in (1.0, 0.25):
        torch.manual_seed(0)
        fp = lowbit.models.create("vgg_small", width=width).eval()
        net = lowbit.compress_(lowbit.models.create("vgg_small", width=width), sst_recipe())
        net.load_state_dict(fp.state_dict(), strict=False)
        net.train()
        with torch.no_grad():
            net(torch.randn(32, 3, 32, 32))
        frozen = freeze(net.eval(), torch.zeros(1, 3, 32, 32))
        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
        xt = torch.from_numpy(x)
        with tempfile.TemporaryDirectory() as d:
            save(frozen, Path(d) / "m.lowbit")
            e_gemm = engine.load(Path(d) / "m.lowbit", threads=1)
            e_lut = engine.load(Path(d) / "m.lowbit", threads=1, sst_kernel="lut")
        assert np.array_equal(e_gemm(x), e_lut(x))
        times = {"gemm": [], "lut": [], "torch": []}
        for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
            times["gemm"].append(_ms(e_gemm, x))
            times["lut"].append(_ms(e_lut, x))
            with torch.no_grad():
                times["torch"].append(_ms(fp, xt))
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"width": width, **{f"{k}_ms": v for k, v in med.items()},
                     "lut_vs_gemm": med["gemm"] / med["lut"],
                     "gemm_vs_torch": med["torch"] / med["gemm"],
                     "lut_vs_torch": med["torch"] / med["lut"]})  # fmt: skip
    return {"command": f"python bench/sst.py --part speed --repeats {args.repeats}",
            "batch": 1, "threads": 1, "repeats": args.repeats, "rows": rows}  # fmt: skip


def linear(args) -> dict:
    """One linear 1024 -> 1024 layer with int8 input: SST(8, 2) on the look-up-table kernel,
    the same layer with ternary weights (absmean, per channel) on its kernel, and SST(8, 2) on
    the int8 GEMM; one thread, medians of ``repeats`` interleaved rounds of 20 calls."""
    import numpy as np

    from lowbit.codecs import Int8Act, Ternary
    from lowbit.methods.sst import SST
    from lowbit.recipes import Recipe, Rule
    from lowbit.runtime import engine

    def frozen_linear(codec):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 1024))
        recipe = Recipe("bench", [Rule(select="linear", weights=codec, activations=Int8Act())])
        net = lowbit.compress_(net, recipe, torch.zeros(1, 1024, 1, 1)).train()
        with torch.no_grad():
            net(torch.randn(64, 1024, 1, 1))  # sets the input range
        return freeze(net.eval(), torch.zeros(1, 1024, 1, 1))

    def per_call_ms(e, x, calls=20):
        e(x)
        t = time.perf_counter()
        for _ in range(calls):
            e(x)
        return 1e3 * (time.perf_counter() - t) / calls

    rows = []
    with tempfile.TemporaryDirectory() as d:
        save(frozen_linear(SST(n=8, k=2)), Path(d) / "sst.lowbit")
        save(frozen_linear(Ternary()), Path(d) / "ternary.lowbit")
        engines = {
            "sst_lut": engine.load(Path(d) / "sst.lowbit", threads=1, sst_kernel="lut"),
            "sst_gemm": engine.load(Path(d) / "sst.lowbit", threads=1),
            "ternary": engine.load(Path(d) / "ternary.lowbit", threads=1),
        }
    for batch in (1, 32):
        x = np.random.default_rng(0).standard_normal((batch, 1024, 1, 1)).astype(np.float32)
        assert np.array_equal(engines["sst_lut"](x), engines["sst_gemm"](x))
        kernels = {
            k: [r["kernel"] for r in e.profile(x) if r.get("kernel")] for k, e in engines.items()
        }
        times: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(args.repeats):
            for k, e in engines.items():
                times[k].append(per_call_ms(e, x))
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"batch": batch, **{f"{k}_ms": v for k, v in med.items()},
                     "kernels": kernels,
                     "lut_vs_ternary": med["ternary"] / med["sst_lut"],
                     "lut_vs_sst_gemm": med["sst_gemm"] / med["sst_lut"]})  # fmt: skip
    return {"command": f"python bench/sst.py --part linear --repeats {args.repeats}",
            "threads": 1, "repeats": args.repeats, "rows": rows,
            "load_1min": os.getloadavg()[0]}  # fmt: skip


def _fp_run(model, data, out: Path, cfg: TrainConfig, kwargs) -> dict:
    last = out / "last.pt"
    if last.exists():
        ck = load_checkpoint(last)
        if ck.get("epoch", 0) >= cfg.epochs:
            return {"checkpoint": str(last), "test_accuracy": ck["history"][-1]["test_accuracy"],
                    "seconds": sum(h.get("seconds", 0) for h in ck["history"])}  # fmt: skip
    return train_model(model, data, out, cfg, model_kwargs=kwargs,
                       resume=last if last.exists() else None)  # fmt: skip


def accuracy(task: str, presets, args) -> dict:
    model, data, kwargs, lr, wd = {
        "mnist": ("lenet300", "mnist", {}, 0.05, 1e-4),
        "cifar": ("vgg_small", "cifar10", {"width": 0.25}, 0.05, 5e-4),
    }[task]
    fp1, qat = (args.mnist_fp_epochs, args.mnist_qat_epochs) if task == "mnist" else (
        args.cifar_fp_epochs, args.cifar_qat_epochs)  # fmt: skip
    root = Path(args.runs_dir) / task
    progress = sys.stderr.isatty()
    sfx = f"-s{args.seed}" if args.seed else ""  # seed 0 keeps the folder names of old runs

    def cfg(epochs, lr_):
        return TrainConfig(epochs=epochs, batch_size=128, optimizer="sgd", lr=lr_,
                           weight_decay=wd, seed=args.seed, progress=progress)  # fmt: skip

    fp_start = _fp_run(model, data, root / f"fp{fp1}{sfx}", cfg(fp1, lr), kwargs)
    ref = _fp_run(model, data, root / f"fp{fp1 + qat}{sfx}", cfg(fp1 + qat, lr), kwargs)
    rows = []
    for n, k in presets:
        res = compress_model(
            # one folder per setting: a resumed run must never pick up another's checkpoint
            "sst", model, data, root / f"sst-{n}-{k}-fp{fp1}-qat{qat}-lr{args.qat_lr:g}{sfx}",
            cfg(qat, args.qat_lr),
            from_checkpoint=fp_start["checkpoint"], method_options={"n": n, "k": k},
            resume=True,
        )  # fmt: skip
        rows.append({
            "n": n, "k": k,
            "test_accuracy": res["test_accuracy"],
            "frozen_test_accuracy": res.get("frozen_test_accuracy"),
            "frozen_agreement": res.get("frozen_agreement"),
            "compression_vs_fp32": res["compression_vs_fp32"],
            "qat_seconds": res["seconds"],
        })  # fmt: skip
    return {
        "model": model + (f" width {kwargs['width']}" if kwargs else ""),
        "data": data,
        "command": f"LOWBIT_DATA=../shared/data python bench/sst.py --part {task} "
        f"--{task}-fp-epochs {fp1} --{task}-qat-epochs {qat} --qat-lr {args.qat_lr} "
        f"--presets {' '.join(f'{n},{k}' for n, k in presets)}"
        + (f" --seed {args.seed}" if args.seed else ""),
        "seed": args.seed,
        "threads": args.threads,
        "fp_epochs": fp1,
        "qat_epochs": qat,
        "fp_lr": lr,
        "qat_lr": args.qat_lr,
        "fp_start_test_accuracy": fp_start["test_accuracy"],
        "same_budget_fp_test_accuracy": ref["test_accuracy"],
        "same_budget_fp_epochs": fp1 + qat,
        "rows": rows,
    }


def markdown(res: dict) -> str:
    out = ["# SST (structured sparse ternary coding)", ""]
    c = res.get("compression")
    if c:
        out += [
            "## Compression against fp32 (computed from the frozen model's stored tensors)",
            "",
            f"Model: {c['model']}. Command: `{c['command']}`. Paper: {PAPER}.",
            "",
            "| (N, K) | codebook | bits/group | SST layers vs fp32 | whole model vs fp32 | "
            "payload B | header B |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            out.append(
                f"| ({r['n']}, {r['k']}) | {r['codebook']} | {r['index_bits']} | "
                f"x{r['sst_layers_vs_fp32']:.2f} | x{r['whole_model_vs_fp32']:.2f} | "
                f"{r['payload_bytes']:,} | {r['header_bytes']:,} |"
            )
        out += [
            "",
            "SST layers: 32-bit weights (and biases) of those layers over every bit the frozen "
            "layer keeps (group indices, per-channel Delta folded with BatchNorm into the "
            "requantization multiplier or output scale, biases). Whole model: the unpruned fp32 "
            "model (BatchNorm included) over the packed payload.",
            "",
        ]
    sp = res.get("speed")
    if sp:
        out += [
            "## Runtime: SST layers on the int8 GEMM vs the look-up-table kernel",
            "",
            f"Command: `{sp['command']}`; batch {sp['batch']}, {sp['threads']} thread, "
            f"medians of {sp['repeats']} interleaved runs; SST(8, 2) vgg_small, random "
            "weights (speed does not depend on them).",
            "",
            "| width | lowbit gemm-int8 ms | lowbit sst-lut ms | PyTorch fp32 ms | "
            "LUT vs GEMM | GEMM vs PyTorch |",
            "|---|---|---|---|---|---|",
        ]
        for r in sp["rows"]:
            out.append(
                f"| {r['width']} | {r['gemm_ms']:.2f} | {r['lut_ms']:.2f} | {r['torch_ms']:.2f} "
                f"| {r['lut_vs_gemm']:.2f}x | {r['gemm_vs_torch']:.2f}x |"
            )
        out += [
            "",
            'The look-up-table kernel (`lowbit.runtime.load(path, sst_kernel="lut")`) does '
            "no multiplications, but on a CPU with VNNI one `vpdpbusd` does 32-64 int8 "
            "multiply-adds, so the GEMM path is the default for SST layers.",
            "",
        ]
    lin = res.get("linear")
    if lin:
        out += [
            "## Runtime: one linear 1024 x 1024, SST(8, 2) look-up tables vs ternary",
            "",
            f"Command: `{lin['command']}`; {lin['threads']} thread, medians of "
            f"{lin['repeats']} interleaved rounds (20 calls each); int8 input, whole engine "
            f"call (input quantization included); 1-minute load average {lin['load_1min']:.2f}.",
            "",
            "| batch | SST look-up ms | ternary ms | SST on int8 GEMM ms | look-up vs ternary "
            "| look-up vs SST GEMM |",
            "|---|---|---|---|---|---|",
        ]
        for r in lin["rows"]:
            out.append(
                f"| {r['batch']} | {r['sst_lut_ms']:.4f} | {r['ternary_ms']:.4f} | "
                f"{r['sst_gemm_ms']:.4f} | {r['lut_vs_ternary']:.2f}x | "
                f"{r['lut_vs_sst_gemm']:.2f}x |"
            )
        k = lin["rows"][0]["kernels"]
        out += ["", f"Kernels: SST look-up `{k['sst_lut']}`, ternary `{k['ternary']}`, SST GEMM "
                f"`{k['sst_gemm']}`. Ratio > 1: the look-up path is faster.", ""]  # fmt: skip
    for task, title in (("mnist", "MNIST"), ("cifar", "CIFAR-10")):
        a = res.get(task)
        if not a:
            continue
        ref = a["same_budget_fp_test_accuracy"]
        out += [
            f"## Accuracy at equal budget: {a['model']}, {title}",
            "",
            f"Command: `{a['command']}` (seed {a['seed']}, {a['threads']} threads, CPU). "
            f"Budget {a['fp_epochs'] + a['qat_epochs']} epochs: SST = {a['fp_epochs']} FP "
            f"epochs (SGD lr {a['fp_lr']}) + {a['qat_epochs']} QAT epochs (SGD lr "
            f"{a['qat_lr']}, K falling from N over the first half); reference = FP for all "
            f"{a['same_budget_fp_epochs']} epochs.",
            "",
            "| model | test acc | gap to FP | frozen acc | frozen = QAT | storage vs fp32 |",
            "|---|---|---|---|---|---|",
            f"| FP, {a['same_budget_fp_epochs']} epochs | {100 * ref:.2f}% | | | | x1 |",
            f"| FP, {a['fp_epochs']} epochs (QAT start) | "
            f"{100 * a['fp_start_test_accuracy']:.2f}% | | | | x1 |",
        ]
        for r in a["rows"]:
            fa = r["frozen_test_accuracy"]
            ag = r["frozen_agreement"]
            out.append(
                f"| SST({r['n']}, {r['k']}) | {100 * r['test_accuracy']:.2f}% | "
                f"{100 * (ref - r['test_accuracy']):.2f} pts | "
                f"{'' if fa is None else f'{100 * fa:.2f}%'} | "
                f"{'' if ag is None else f'{100 * ag:.2f}%'} | x{r['compression_vs_fp32']:.1f} |"
            )
        out.append("")
        tried = res.get(f"{task}_tried", [])
        if len(tried) > 1:
            out += [
                f"Every setting tried on {title} (each its own command; the FP reference "
                "trained with the same seed and budget):",
                "",
                "| FP + QAT epochs | QAT lr | preset | seed | FP ref | SST | gap |",
                "|---|---|---|---|---|---|---|",
            ]
            groups: dict = {}
            for t in tried:
                gap = 100 * (t["fp_reference"] - t["test_accuracy"])
                g = (t["fp_epochs"], t["qat_epochs"], t["qat_lr"], t["n"], t["k"])
                groups.setdefault(g, []).append(gap)
                out.append(
                    f"| {t['fp_epochs']} + {t['qat_epochs']} | {t['qat_lr']} | "
                    f"({t['n']}, {t['k']}) | {t.get('seed', 0)} | "
                    f"{100 * t['fp_reference']:.2f}% | {100 * t['test_accuracy']:.2f}% | "
                    f"{gap:.2f} pts |"
                )
            out.append("")
            for (f, q, lr_, n, k), gaps in groups.items():
                if len(gaps) > 1:
                    out.append(f"- {f} + {q} epochs, QAT lr {lr_}, ({n}, {k}): mean gap over "
                               f"{len(gaps)} seeds {sum(gaps) / len(gaps):.2f} pts "
                               f"({', '.join(f'{v:.2f}' for v in gaps)})")  # fmt: skip
            out.append("")
    return "\n".join(out)


def _remember(res: dict, task: str) -> None:
    """Keep one line per setting ever run (the latest run of a command replaces its line),
    so the table of settings tried shows every split and learning rate, not just the last."""
    a = res[task]
    ref = a["same_budget_fp_test_accuracy"]

    def key(t):
        return (t["fp_epochs"], t["qat_epochs"], t["qat_lr"], t["n"], t["k"], t.get("seed", 0))

    new = [{"command": a["command"], "n": r["n"], "k": r["k"], "fp_epochs": a["fp_epochs"],
            "qat_epochs": a["qat_epochs"], "qat_lr": a["qat_lr"], "seed": a.get("seed", 0),
            "fp_reference": ref, "test_accuracy": r["test_accuracy"]}
           for r in a["rows"]]  # fmt: skip
    keys = {key(t) for t in new}
    res[f"{task}_tried"] = [t for t in res.get(f"{task}_tried", []) if key(t) not in keys] + new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["compression", "speed", "linear", "mnist", "cifar", "all"],
                    default="all")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--presets", nargs="+", default=["8,2", "4,1", "8,1"], help="N,K pairs")
    ap.add_argument("--mnist-fp-epochs", type=int, default=5)
    ap.add_argument("--mnist-qat-epochs", type=int, default=5)
    ap.add_argument("--cifar-fp-epochs", type=int, default=3)
    ap.add_argument("--cifar-qat-epochs", type=int, default=3)
    ap.add_argument("--qat-lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-dir", default=str(HERE / "runs" / "sst"))
    args = ap.parse_args()
    presets = [tuple(int(v) for v in p.split(",")) for p in args.presets]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    new: dict = {}
    if args.part in ("compression", "all"):
        new["compression"] = compression(presets)
    if args.part in ("speed", "all"):
        new["speed"] = speed(args)
    if args.part in ("linear", "all"):
        new["linear"] = linear(args)
    for task in ("mnist", "cifar"):
        if args.part in (task, "all"):
            if not os.environ.get("LOWBIT_DATA"):
                sys.exit("set LOWBIT_DATA to the folder holding mnist/ and cifar10/")
            new[task] = accuracy(task, presets, args)
            new[task]["wall_seconds_this_call"] = round(time.perf_counter() - t0, 1)
    # read the results file only now: another run may have written it meanwhile
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res.update(new)
    for task in ("mnist", "cifar"):
        if task in new:
            _remember(res, task)
    write_json(RESULTS, res)
    md = markdown(res)
    (HERE / "results" / "sst.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
