"""Where do the frozen model and the QAT model part? Per layer, the fraction of int8
input codes that differ between the two, on a few test images.

The QAT model computes in float32 and rounds each layer's input to its int8 code; the
frozen model computes the same codes in exact integer arithmetic (folded BatchNorm, fused
requantization). Float rounding moves a value that lies within about 1e-7 of a rounding
boundary to the other code; each code that moves changes the next layers' sums, so the
differences grow with depth. This script measures that growth for one QAT checkpoint, to
tell rounding drift (tiny at the first layers, growing) from a freeze bug (a large
fraction at one layer).

    LOWBIT_DATA=../shared/data python bench/frozen_drift.py \\
        bench/runs/prom-cifar/full/prom-fp2-qat3-lr0.05-lsq/qat/last.pt --images 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowbit import data as data_mod  # noqa: E402
from lowbit.codecs import Int8Act  # noqa: E402
from lowbit.freeze import freeze  # noqa: E402
from lowbit.layers import ActQuantizer  # noqa: E402
from lowbit.train import _as_tensors, build_from_checkpoint  # noqa: E402
from lowbit.workflow import data_meta, transforms_for  # noqa: E402


def drift(checkpoint: str, data_dir: str | None, images: int, seed: int = 0) -> dict:
    net, ckpt = build_from_checkpoint(checkpoint)
    net.eval()
    name = (ckpt.get("data") or {}).get("name")
    if not name:
        raise SystemExit(f"{checkpoint} does not record its data set")
    test = data_mod.load(name, "test", data_dir).subset(images, seed=seed)
    _, tf = transforms_for({**data_meta(test), "name": name})
    x, _ = _as_tensors(test)
    x = tf(x)
    frozen = freeze(net, x[:1])
    ops = {op.output: op for op in frozen.ops}
    seen: dict[str, tuple[torch.Tensor, float]] = {}

    def hook(name):
        def f(m, inputs, out):
            seen[name] = (out.detach(), float(m.scale))

        return f

    for n, m in net.named_modules():
        if isinstance(m, ActQuantizer) and isinstance(m.codec, Int8Act):
            m.register_forward_hook(hook(n))
    with torch.no_grad():
        logits_q = net(x)
        env = frozen.forward(x, keep=True)
    rows = []
    for n, (out, scale) in seen.items():
        op = ops.get(n.removesuffix(".act").replace(".", "_"))
        if op is None or env[op.inputs[0]].is_floating_point():
            continue  # no int8 input in the frozen graph to compare with
        diff = (torch.round(out / scale).double() - env[op.inputs[0]].double()).abs()
        rows.append(
            {
                "layer": op.output,
                "codes": diff.numel(),
                "differ": float((diff > 0).double().mean()),
                "max_steps": int(diff.max()),
            }
        )
    agree = float((logits_q.argmax(1) == env[frozen.output_name].argmax(1)).double().mean())
    return {"checkpoint": checkpoint, "images": len(x), "prediction_agreement": agree,
            "layers": rows}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a QAT checkpoint (e.g. a compress run's qat/last.pt)")
    ap.add_argument("--images", type=int, default=100, help="test images (default 100)")
    ap.add_argument("--data-dir", default=os.environ.get("LOWBIT_DATA"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"no checkpoint at {args.checkpoint}")
    torch.set_num_threads(args.threads)
    r = drift(args.checkpoint, args.data_dir, args.images)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    print(f"{r['images']} images, predictions the same: {100 * r['prediction_agreement']:.2f}%")
    print(f"{'layer (its int8 input)':32s} {'codes':>10s} {'differ':>10s} {'max steps':>9s}")
    for row in r["layers"]:
        print(f"{row['layer']:32s} {row['codes']:10d} {row['differ']:10.2e} {row['max_steps']:9d}")


if __name__ == "__main__":
    main()
