"""Hand-written rule mixes: a few lines of per-tensor type rules, the second baseline of issue 10.

A rule is a family parameterised by a base type from the legacy ladder (q4_0 … q8_0): given the base, it maps
each weight matrix (by its role, its layer and its row length) to a ggml type name. `rule_plan` applies a rule to
a model's plan (say `preset_plan(reference, "Q8_0")`, which lists every tensor with its shape) and returns the
`QuantPlan` to hand to `converters.quantization.quantize.quantize`. Norms and other 1-D tensors keep the base plan's
type.

Row lengths decide what fits: k-quants need rows that are a multiple of 256, the legacy types a multiple of 32.
On SmolLM2-135M (hidden size 576) only `ffn_down` (rows of 1536) takes k-quants; a k-quant asked for a tensor
whose rows it does not fit becomes the legacy type of the nearest size at or above it (`fitted`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES

from converters.quantization.plan import QuantPlan, fits, ggml_type

LEGACY_LADDER = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
"""The base types a rule family is evaluated at, smallest first."""
KQUANT_LADDER = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0")
"""Types for tensors whose rows take k-quants (q8_0 closes the ladder: there is no q8_K for weights)."""

_BLOCK_NAME = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<role>[a-z_]+)\.weight$")


def bits_of(type_name: str) -> float:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type(type_name)]
    return 8 * type_size / block_size


def legacy_step(base: str, steps: int) -> str:
    """The legacy type `steps` rungs above (or below, when negative) `base`, clamped to the ladder."""
    index = min(max(LEGACY_LADDER.index(base) + steps, 0), len(LEGACY_LADDER) - 1)
    return LEGACY_LADDER[index]


def k_match(base: str) -> str:
    """The largest k-quant no larger per weight than the legacy `base` (q4_0 and q4_1 → q4_K, q5_1 → q5_K)."""
    return max((t for t in KQUANT_LADDER if bits_of(t) <= bits_of(base)), key=bits_of)


def k_step(base: str, steps: int) -> str:
    """The k-quant `steps` rungs above (or below) `k_match(base)`, clamped (q5_1 with +1 → q6_K)."""
    index = min(max(KQUANT_LADDER.index(k_match(base)) + steps, 0), len(KQUANT_LADDER) - 1)
    return KQUANT_LADDER[index]


def fitted(type_name: str, row_length: int) -> str:
    """`type_name` if its blocks fit the rows, else the smallest legacy type at least as large per weight."""
    if fits(type_name, row_length):
        return type_name
    larger = [t for t in LEGACY_LADDER if bits_of(t) >= bits_of(type_name) and fits(t, row_length)]
    if not larger:
        return "f16"
    return min(larger, key=bits_of)


@dataclass(frozen=True)
class Tensor:
    """What a rule may look at: the tensor's role ("token_embd", "attn_v", "ffn_down", …), layer and rows."""

    name: str
    role: str
    layer: int | None
    n_layers: int
    row_length: int


TypeRule = Callable[[Tensor, str], str]
"""(tensor, base type) → the type that tensor gets."""


@dataclass(frozen=True)
class RuleMix:
    name: str
    summary: str
    rule: TypeRule


def _uniform(tensor: Tensor, base: str) -> str:
    return k_match(base) if tensor.role == "ffn_down" else base


def _all_legacy(tensor: Tensor, base: str) -> str:
    return base


def _legacy_embedding_q8(tensor: Tensor, base: str) -> str:
    return "q8_0" if tensor.role in ("token_embd", "output") else base


def _ffn_down_up(tensor: Tensor, base: str) -> str:
    return k_step(base, +1) if tensor.role == "ffn_down" else base


def _ffn_down_low(tensor: Tensor, base: str) -> str:
    return k_step(base, -1) if tensor.role == "ffn_down" else base


def _embedding_up(tensor: Tensor, base: str) -> str:
    if tensor.role == "token_embd":
        return legacy_step(base, +1)
    return _uniform(tensor, base)


def _embedding_q8(tensor: Tensor, base: str) -> str:
    if tensor.role in ("token_embd", "output"):
        return "q8_0"
    return _uniform(tensor, base)


def _v_and_down_up(tensor: Tensor, base: str) -> str:
    if tensor.role == "attn_v":
        return legacy_step(base, +1)
    return _ffn_down_up(tensor, base)


def _ends_up(tensor: Tensor, base: str) -> str:
    at_an_end = tensor.layer is not None and (tensor.layer < 2 or tensor.layer >= tensor.n_layers - 2)
    if at_an_end:
        return k_step(base, +1) if tensor.role == "ffn_down" else legacy_step(base, +1)
    return _uniform(tensor, base)


def _odd_layers_up(tensor: Tensor, base: str) -> str:
    if tensor.layer is not None and tensor.layer % 2 == 1:
        return k_step(base, +1) if tensor.role == "ffn_down" else legacy_step(base, +1)
    return _uniform(tensor, base)


RULES: tuple[RuleMix, ...] = (
    RuleMix("uniform", "every matrix the base type (ffn_down its k-quant match)", _uniform),
    RuleMix("legacy", "every matrix the base type, ffn_down included", _all_legacy),
    RuleMix("legacy_embd_q8", "every matrix the base type, the token embedding (and output) q8_0",
            _legacy_embedding_q8),
    RuleMix("ffn_down_up", "every matrix the base type, ffn_down one k-quant higher (issue 10's example at q5_1)",
            _ffn_down_up),
    RuleMix("ffn_down_low", "every matrix the base type, ffn_down one k-quant lower", _ffn_down_low),
    RuleMix("embd_up", "uniform, with the token embedding one legacy type higher", _embedding_up),
    RuleMix("embd_q8", "uniform, with the token embedding (and output) at q8_0, as llama.cpp's presets keep it",
            _embedding_q8),
    RuleMix("v_down_up", "every matrix the base type, attn_v one legacy type and ffn_down one k-quant higher",
            _v_and_down_up),
    RuleMix("ends_up", "uniform, with the first two and last two layers one type higher", _ends_up),
    RuleMix("odd_up", "uniform, with every odd-numbered layer one type higher", _odd_layers_up),
)


def rule_named(name: str) -> RuleMix:
    for rule in RULES:
        if rule.name == name:
            return rule
    raise KeyError(f"no rule named {name!r}; rules: {', '.join(rule.name for rule in RULES)}")


def _tensor_view(name: str, row_length: int, n_layers: int) -> Tensor:
    block = _BLOCK_NAME.match(name)
    if block is not None:
        return Tensor(name, block["role"], int(block["layer"]), n_layers, row_length)
    return Tensor(name, name.removesuffix(".weight"), None, n_layers, row_length)


def layer_count(plan: QuantPlan) -> int:
    layers = [int(match["layer"]) for t in plan.tensors if (match := _BLOCK_NAME.match(t.name))]
    return max(layers) + 1 if layers else 0


def rule_types(plan: QuantPlan, rule: RuleMix, base: str) -> dict[str, str]:
    """The type `rule` gives every weight matrix (2-D or more) of `plan`'s model at `base`, fitted to its rows."""
    n_layers = layer_count(plan)
    return {
        tensor.name: fitted(rule.rule(_tensor_view(tensor.name, tensor.shape[0], n_layers), base), tensor.shape[0])
        for tensor in plan.tensors
        if len(tensor.shape) >= 2
    }


def rule_plan(plan: QuantPlan, rule: RuleMix, base: str) -> QuantPlan:
    return plan.with_types(rule_types(plan, rule, base), label=f"rule {rule.name} at {base}")
