"""The sensitivity-based mix: the plan with the lowest predicted divergence from the reference within a size budget.

`plan_mix(reference, budget, sensitivity)` turns measured costs (`converters.mix.sensitivity`) into a `QuantPlan`:
every quantizable tensor gets one of its candidate types so that the sum of the predicted KLD contributions
g_t · E_t(τ) is smallest while the tensor bytes stay within the budget. This is a multiple-choice knapsack; it
is solved the Lagrangian way: on each tensor's lower convex hull of (bytes, predicted KLD) the cheapest upgrades
(least KLD removed per byte, in decreasing order) are taken greedily until the next one would not fit, then the
bytes left over are spent on the best single upgrades that still fit, hull or not.

Budgets: `MixBudget(like="Q4_K_M")` (no larger than llama.cpp's preset of this model, from a dry run),
`MixBudget(size_bytes=…)` (the whole file) or `MixBudget(bpw=…)` (bits per weight over all tensors, as
`qdesk info` counts them).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from converters.core.errors import UserError
from converters.core.gguf_file import GGUFHeader
from converters.mix.sensitivity import CANDIDATE_TYPES, Sensitivity, TensorSensitivity
from converters.quantization.plan import PlannedTensor, QuantPlan, fits, tensor_bytes, type_name

MIX_BASE_PRESET = "Q4_K_M"
"""The file type a mix records (every tensor's type is set by the plan)."""
METADATA_MARGIN_BYTES = 8192
"""Room kept for the header keys a mix adds beyond a preset's, so `--like` stays no larger than the preset."""


class MixError(UserError):
    """A mix that cannot be made: a budget outside what the model's tensors allow."""


@dataclass(frozen=True)
class MixBudget:
    like: str | None = None
    size_bytes: int | None = None
    bpw: float | None = None

    def __post_init__(self) -> None:
        if sum(value is not None for value in (self.like, self.size_bytes, self.bpw)) != 1:
            raise ValueError("give exactly one of like, size_bytes, bpw")

    def describe(self) -> str:
        if self.like is not None:
            return f"like {self.like.upper()}"
        if self.size_bytes is not None:
            return f"{self.size_bytes / 1e6:.1f} MB"
        return f"{self.bpw:g} bpw"


@dataclass(frozen=True)
class MixPlan:
    plan: QuantPlan
    budget: MixBudget
    budget_tensor_bytes: int
    predicted_kld: float
    sensitivity: Sensitivity

    def metadata(self) -> dict[str, str | int | float]:
        """The `qdesk.mix.*` keys the quantized file records."""
        return {
            "qdesk.mix.method": "sensitivity/1",
            "qdesk.mix.budget": self.budget.describe(),
            "qdesk.mix.budget_bytes": self.budget_tensor_bytes,
            "qdesk.mix.predicted_kld": float(self.predicted_kld),
            "qdesk.mix.groups": len(self.sensitivity.group_kld),
            "qdesk.mix.probe_tokens": self.sensitivity.probe_tokens,
            "qdesk.mix.types": ", ".join(f"{count} {name}" for name, count in self.plan.type_counts().items()),
        }


@dataclass
class _Choice:
    tensor: TensorSensitivity
    hull: list[tuple[int, float, str]]
    """(bytes, predicted KLD, type) on the lower convex hull, by increasing bytes."""
    step: int = 0


def _hull(tensor: TensorSensitivity) -> list[tuple[int, float, str]]:
    points = sorted((option.bytes, tensor.predicted(option), option.type) for option in tensor.options)
    frontier: list[tuple[int, float, str]] = []
    for point in points:
        if frontier and point[1] >= frontier[-1][1]:
            continue
        if frontier and point[0] == frontier[-1][0]:
            frontier.pop()
        frontier.append(point)
    hull: list[tuple[int, float, str]] = []
    for point in frontier:
        while len(hull) >= 2:
            (b0, k0, _), (b1, k1, _) = hull[-2], hull[-1]
            if (k0 - k1) * (point[0] - b1) <= (k1 - point[1]) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def _slope(choice: _Choice) -> float:
    (b0, k0, _), (b1, k1, _) = choice.hull[choice.step], choice.hull[choice.step + 1]
    return (k0 - k1) / max(b1 - b0, 1)


def allocate(tensors: Sequence[TensorSensitivity], budget_bytes: int) -> dict[str, str]:
    """The type of every tensor minimizing the summed predicted KLD within `budget_bytes` of tensor data."""
    choices = [_Choice(tensor, _hull(tensor)) for tensor in tensors]
    spent = sum(choice.hull[0][0] for choice in choices)
    if spent > budget_bytes:
        raise MixError(f"the budget leaves {budget_bytes / 1e6:.1f} MB for the quantizable weights, and even the "
                       f"smallest types need {spent / 1e6:.1f} MB; give a larger budget.")
    queue = [(-_slope(choice), index) for index, choice in enumerate(choices) if len(choice.hull) > 1]
    heapq.heapify(queue)
    while queue:
        _, index = heapq.heappop(queue)
        choice = choices[index]
        cost = choice.hull[choice.step + 1][0] - choice.hull[choice.step][0]
        if spent + cost > budget_bytes:
            continue
        spent += cost
        choice.step += 1
        if choice.step + 1 < len(choice.hull):
            heapq.heappush(queue, (-_slope(choice), index))
    types = {choice.tensor.name: choice.hull[choice.step][2] for choice in choices}
    return _spend_leftover(tensors, types, budget_bytes - spent)


def _spend_leftover(tensors: Sequence[TensorSensitivity], types: dict[str, str], left: int) -> dict[str, str]:
    """Take the single upgrades that still fit, largest KLD reduction first, until none fits."""
    while True:
        best: tuple[float, str, str, int] | None = None
        for tensor in tensors:
            current = tensor.option(types[tensor.name])
            for option in tensor.options:
                extra = option.bytes - current.bytes
                gain = tensor.predicted(current) - tensor.predicted(option)
                if 0 < extra <= left and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, tensor.name, option.type, extra)
        if best is None:
            return types
        _, name, chosen, extra = best
        types[name] = chosen
        left -= extra


def budget_tensor_bytes(budget: MixBudget, reference: Path, header: GGUFHeader, like_bytes: int | None) -> int:
    """Bytes of tensor data the budget allows (the file's header and padding taken off a size budget)."""
    if budget.like is not None:
        if like_bytes is None:
            raise ValueError("a budget like a preset needs the preset's tensor bytes")
        return like_bytes - METADATA_MARGIN_BYTES
    if budget.bpw is not None:
        parameters = sum(_elements(tensor.shape) for tensor in header.tensors)
        return int(budget.bpw * parameters / 8)
    assert budget.size_bytes is not None
    overhead = reference.stat().st_size - sum(tensor.n_bytes for tensor in header.tensors)
    return budget.size_bytes - overhead - METADATA_MARGIN_BYTES - 64 * len(header.tensors)


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for dimension in shape:
        count *= dimension
    return count


def plan_mix(reference: Path, header: GGUFHeader, budget: MixBudget, sensitivity: Sensitivity,
             like_bytes: int | None = None) -> MixPlan:
    """The plan for `budget` from measured sensitivity; raises MixError for a budget out of reach."""
    allowed = budget_tensor_bytes(budget, reference, header, like_bytes)
    measured = {tensor.name: tensor for tensor in sensitivity.tensors}
    fixed = sum(tensor.n_bytes for tensor in header.tensors if tensor.name not in measured)
    largest = fixed + sum(max(option.bytes for option in tensor.options) for tensor in sensitivity.tensors)
    smallest = fixed + sum(min(option.bytes for option in tensor.options) for tensor in sensitivity.tensors)
    _check_in_range(budget, allowed, smallest, largest, reference, header)
    types = allocate(sensitivity.tensors, allowed - fixed)
    planned = []
    predicted = 0.0
    for tensor in header.tensors:
        source = type_name(tensor.type)
        if tensor.name in measured:
            chosen = types[tensor.name]
            contribution = measured[tensor.name].predicted_kld(chosen)
            predicted += contribution
            planned.append(PlannedTensor(tensor.name, tuple(tensor.shape), source, chosen,
                                         measured[tensor.name].gain, contribution))
        else:
            planned.append(PlannedTensor(tensor.name, tuple(tensor.shape), source, source))
    plan = QuantPlan(tuple(planned), MIX_BASE_PRESET, f"sensitivity mix, {budget.describe()}")
    return MixPlan(plan, budget, allowed, predicted, sensitivity)


class SizedTensor(Protocol):
    name: str
    shape: tuple[int, ...]

    @property
    def n_bytes(self) -> int: ...


def possible_tensor_bytes(header: GGUFHeader, candidate_types: Sequence[str] = CANDIDATE_TYPES) -> tuple[int, int]:
    """The fewest and the most bytes of tensor data a mix of this model can have, from its header alone."""
    return tensor_bytes_range(header.tensors, candidate_types)


def tensor_bytes_range(tensors: Iterable[SizedTensor], candidate_types: Sequence[str] = CANDIDATE_TYPES
                       ) -> tuple[int, int]:
    """The fewest and the most bytes of tensor data a mix of `tensors` (as stored in the reference) can have."""
    from native.kernels import quantizable_weight

    smallest = largest = 0
    for tensor in tensors:
        sizes = [tensor_bytes(type_, tuple(tensor.shape)) for type_ in candidate_types if fits(type_, tensor.shape[0])]
        if quantizable_weight(tensor.name, len(tensor.shape)) and sizes:
            smallest, largest = smallest + min(sizes), largest + max(sizes)
        else:
            smallest, largest = smallest + tensor.n_bytes, largest + tensor.n_bytes
    return smallest, largest


def check_budget(budget: MixBudget, reference: Path, header: GGUFHeader, like_bytes: int | None = None) -> None:
    """Refuse a budget no mix can meet before anything is measured (MixError with the possible range)."""
    smallest, largest = possible_tensor_bytes(header)
    _check_in_range(budget, budget_tensor_bytes(budget, reference, header, like_bytes), smallest, largest, reference,
                    header)


def _check_in_range(budget: MixBudget, allowed: int, smallest: int, largest: int, reference: Path,
                    header: GGUFHeader) -> None:
    if budget.like is None and smallest <= allowed <= largest:
        return
    if budget.like is not None and smallest <= allowed:
        return
    where = "below the smallest" if allowed < smallest else "above the largest"
    keep = "" if allowed < smallest else ", or keep the reference as it is"
    raise MixError(f"a mix of {budget.describe()} is {where} possible for {reference.name}: its tensors need at "
                   f"least {smallest / 1e6:.1f} MB ({8 * smallest / _parameters(header):.2f} bpw) and at most "
                   f"{largest / 1e6:.1f} MB ({8 * largest / _parameters(header):.2f} bpw); choose a budget in that "
                   f"range{keep}.")


def _parameters(header: GGUFHeader) -> int:
    return sum(_elements(tensor.shape) for tensor in header.tensors) or 1
