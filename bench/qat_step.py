"""Cost of one QAT training step against the FP step for the same model.

Builds CIFAR MobileNetV2 (``lowbit.models.create("mobilenetv2")``, input 3x32x32), an FP
copy and a QAT copy (``lowbit.recipes.compress_(copy, method)``, PROM by default: ternary
pointwise weights, int8 weights elsewhere, int8 activations), and times a full training
step (forward, cross-entropy, backward, SGD with momentum) on random data. FP and QAT
steps alternate so both see the same machine noise; medians are reported.

    python bench/qat_step.py                         # batch 64, 2 threads, 20 steps
    python bench/qat_step.py --width 0.5 --steps 10

Writes ``bench/results/qat_step.json`` and ``bench/results/qat_step.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lowbit.models  # noqa: E402
from lowbit.layers import QuantConv2d, QuantLinear  # noqa: E402
from lowbit.recipes import compress_  # noqa: E402

REQUIREMENT = 1.5  # the QAT step may cost at most this many FP steps


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(args) -> tuple[nn.Module, nn.Module]:
    kw = {} if args.width == 1.0 else {"width": args.width}
    torch.manual_seed(0)
    fp = lowbit.models.create(args.model, **kw)
    qat = compress_(copy.deepcopy(fp), args.method)
    return fp.train(), qat.train()


class Stepper:
    """One model, its optimizer and a fixed random batch."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float):
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.loss_fn = nn.CrossEntropyLoss()
        self.times: list[float] = []

    def step(self, record: bool) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return float(loss.detach())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenetv2")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--method", default="prom")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (>= 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", default=str(HERE / "results" / "qat_step"), help="path w/o suffix")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be at least 10")

    torch.set_num_threads(args.threads)
    fp, qat = build(args)
    n_quant = sum(isinstance(m, QuantConv2d | QuantLinear) for m in qat.modules())
    shape = getattr(fp, "default_input_shape", (3, 32, 32))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *shape, generator=g)
    num_classes = fp(x[:2]).shape[1]
    y = torch.randint(0, num_classes, (args.batch,), generator=g)
    runs = {"fp": Stepper(fp, x, y, args.lr), "qat": Stepper(qat, x, y, args.lr)}

    for i in range(args.warmup + args.steps):
        record = i >= args.warmup
        order = ("fp", "qat") if i % 2 == 0 else ("qat", "fp")  # alternate who goes first
        for k in order:
            runs[k].step(record)

    med = {k: statistics.median(r.times) for k, r in runs.items()}
    ratio = med["qat"] / med["fp"]
    ratios = [q / f for f, q in zip(runs["fp"].times, runs["qat"].times)]
    model_desc = args.model + ("" if args.width == 1.0 else f", width={args.width}")
    result = {
        "command": "python bench/qat_step.py " + " ".join(argv if argv else sys.argv[1:]),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "model": model_desc,
        "method": args.method,
        "quantized_layers": n_quant,
        "batch": args.batch,
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "fp_step_s": {"median": med["fp"], "min": min(runs["fp"].times), "all": runs["fp"].times},
        "qat_step_s": {
            "median": med["qat"],
            "min": min(runs["qat"].times),
            "all": runs["qat"].times,
        },
        "ratio_of_medians": ratio,
        "median_of_pairwise_ratios": statistics.median(ratios),
        "requirement": REQUIREMENT,
        "meets_requirement": ratio <= REQUIREMENT,
    }
    print(
        f"{model_desc}, {args.method} ({n_quant} quantized layers), batch {args.batch}, "
        f"{args.threads} threads, {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"FP  step: median {med['fp'] * 1e3:8.1f} ms  (min {min(runs['fp'].times) * 1e3:.1f})")
    print(f"QAT step: median {med['qat'] * 1e3:8.1f} ms  (min {min(runs['qat'].times) * 1e3:.1f})")
    print(
        f"ratio QAT/FP: {ratio:.3f} (median of pairwise ratios "
        f"{statistics.median(ratios):.3f}); requirement <= {REQUIREMENT}: "
        f"{'met' if ratio <= REQUIREMENT else 'NOT met'}"
    )
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(_markdown(result))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return result


def _markdown(r: dict) -> str:
    m = r["machine"]
    fp, q = r["fp_step_s"], r["qat_step_s"]
    return (
        "# QAT training step vs FP training step\n\n"
        f"Command: `{r['command'].strip()}`\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores (shared), Python {m['python']}, "
        f"PyTorch {m['torch']} (CPU, fp32). Date: {r['date']}.\n\n"
        f"Model: {r['model']} (CIFAR, random data), method `{r['method']}` "
        f"({r['quantized_layers']} quantized layers). One step = forward, cross-entropy, "
        f"backward, SGD with momentum; batch {r['batch']}, {r['threads']} threads, "
        f"{r['warmup_steps']} warm-up steps, then {r['timed_steps']} timed steps per model, "
        "FP and QAT steps interleaved.\n\n"
        "| | median step (ms) | min step (ms) |\n|---|---|---|\n"
        f"| FP | {fp['median'] * 1e3:.1f} | {fp['min'] * 1e3:.1f} |\n"
        f"| QAT ({r['method']}) | {q['median'] * 1e3:.1f} | {q['min'] * 1e3:.1f} |\n\n"
        f"Ratio QAT / FP (of the medians): **{r['ratio_of_medians']:.2f}x** "
        f"(median of the pairwise ratios: {r['median_of_pairwise_ratios']:.2f}x); "
        f"requirement <= {r['requirement']}x: "
        f"{'met' if r['meets_requirement'] else 'not met'}.\n"
    )


if __name__ == "__main__":
    main()
