"""PROM: ternary pointwise convolutions, int8 everywhere else, int8 activations.

L. Meiner, J. Mehnert, A. P. Condurache, "PROM: Prioritize Reduction of Multiplications
Over Lower Bit-Widths for Efficient CNNs", arXiv 2505.03254 (2025).

Pointwise (1x1, groups = 1) convolutions get ternary weights (absmean rule, per output
channel by default; ``ternary_rule="twn"`` for the TWN threshold) with int8 inputs, so
each of their MACs becomes an int8 addition or nothing; every other conv and the
classifier get int8 weights (symmetric, per channel). Plain QAT from the FP model.
"""

from __future__ import annotations

from ..codecs import Int, Int8Act, Ternary, check_act_mode
from ..recipes import Recipe, Rule, register_method


@register_method("prom")
def prom_recipe(
    ternary_per_channel: bool = True,
    packing: str = "2bit",
    act_mode: str = "ema",
    ternary_rule: str = "absmean",
    ternary_delta: float = 0.7,
) -> Recipe:
    """The PROM recipe. ``packing``: "2bit" (fast kernels) or "base3" (1.6 bits/weight);
    ``act_mode``: "ema" (range tracked by an EMA, then frozen), "lsq" (learned scale, full LSQ
    gradient) or "lsq-clip" (learned, the clipping term of the gradient alone);
    ``ternary_rule``: "absmean" (BitNet b1.58, the methods.md default) or "twn"
    (threshold ``ternary_delta * mean|w|``, scale the mean of the weights kept)."""
    if problem := check_act_mode(act_mode):
        raise ValueError(f"bad prom option: {problem}")
    act = Int8Act(mode=act_mode)
    rules = [
        Rule(select="all", weights=Int(8, per_channel=True), activations=act),
        Rule(
            select="pointwise",
            weights=Ternary(
                per_channel=ternary_per_channel,
                packing=packing,
                rule=ternary_rule,
                delta=ternary_delta,
            ),
            activations=act,
            optional=True,  # a model without 1x1 convs is then plain int8, with a warning
        ),
    ]
    options = {
        "ternary_per_channel": ternary_per_channel,
        "packing": packing,
        "act_mode": act_mode,
        "ternary_rule": ternary_rule,
        "ternary_delta": ternary_delta,
    }
    return Recipe("prom", rules, options)
