"""The report of a plan: bits per weight of every tensor class in every layer (a heat map), with predicted KLD.

`plan_heatmap(plan)` arranges a `QuantPlan`'s matrices as a grid, tensor class (attn_q … ffn_down) by layer, each
cell the type, its bits per weight and, for a sensitivity mix, the tensor's predicted contribution to the mean
KLD; the tensors outside the blocks (token embedding, output matrix) are listed apart. Sums per class and per
layer come with it. `to_json()` is what `--plan-out` files carry under "report" and what the GUI draws;
`render_grid` and `summary_lines` are the terminal's views.

`recorded_prediction(path)` reads back the predicted KLD a mix wrote into its GGUF, so an evaluation can show it
next to the measured one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.core.atomic import atomic_output
from converters.quantization.plan import PlannedTensor, QuantPlan

REPORT_FORMAT = "qdesk.plan-report/1"
BLOCK_CLASSES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
"""The usual order of a Llama-like block's matrices; other matrices found in blocks follow, alphabetically."""
PREDICTED_KLD_KEY = "qdesk.mix.predicted_kld"
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


@dataclass(frozen=True)
class Cell:
    """One matrix of the plan: its type, bits per weight and (for a mix) predicted contribution to the mean KLD."""

    type: str
    bpw: float
    elements: int
    predicted_kld: float | None

    @classmethod
    def of(cls, tensor: PlannedTensor) -> Cell:
        return cls(tensor.type, 8 * tensor.n_bytes / tensor.n_elements, tensor.n_elements, tensor.predicted_kld)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "bpw": round(self.bpw, 4), "predicted_kld": self.predicted_kld}


@dataclass(frozen=True)
class Summary:
    """Bits per weight over a set of cells (weighted by their sizes) and their summed predicted KLD."""

    bpw: float
    predicted_kld: float | None

    @classmethod
    def of(cls, cells: Iterable[Cell | None]) -> Summary:
        present = [cell for cell in cells if cell is not None]
        elements = sum(cell.elements for cell in present)
        bits = sum(cell.bpw * cell.elements for cell in present)
        predictions = [cell.predicted_kld for cell in present if cell.predicted_kld is not None]
        return cls(bits / elements if elements else 0.0, sum(predictions) if predictions else None)

    def to_json(self) -> dict[str, Any]:
        return {"bpw": round(self.bpw, 4), "predicted_kld": self.predicted_kld}


@dataclass(frozen=True)
class PlanHeatmap:
    label: str
    n_layers: int
    grid: Mapping[str, tuple[Cell | None, ...]]
    """Tensor class → one cell per layer (None where the layer has no such matrix)."""
    other: Mapping[str, Cell]
    """Matrices outside the blocks, by name without ".weight" (token_embd, output)."""
    bpw: float
    """Over the whole plan, norms included, as `qdesk info` counts it."""
    predicted_kld: float | None

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.grid)

    def class_summary(self, tensor_class: str) -> Summary:
        return Summary.of(self.grid[tensor_class])

    def layer_summary(self, layer: int) -> Summary:
        return Summary.of(cells[layer] for cells in self.grid.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "label": self.label,
            "layers": self.n_layers,
            "bpw": round(self.bpw, 4),
            "predicted_kld": self.predicted_kld,
            "classes": list(self.classes),
            "grid": {name: [None if cell is None else cell.to_json() for cell in cells]
                     for name, cells in self.grid.items()},
            "by_class": {name: self.class_summary(name).to_json() for name in self.classes},
            "by_layer": [self.layer_summary(layer).to_json() for layer in range(self.n_layers)],
            "other": {name: cell.to_json() for name, cell in self.other.items()},
        }


def plan_heatmap(plan: QuantPlan) -> PlanHeatmap:
    """The plan's matrices as a class × layer grid (1-D tensors such as norms are left out)."""
    by_class: dict[str, dict[int, Cell]] = {}
    other: dict[str, Cell] = {}
    for tensor in plan.tensors:
        if len(tensor.shape) < 2:
            continue
        match = _BLOCK_TENSOR.match(tensor.name)
        if match is None:
            other[tensor.name.removesuffix(".weight")] = Cell.of(tensor)
        else:
            by_class.setdefault(match.group(2), {})[int(match.group(1))] = Cell.of(tensor)
    n_layers = 1 + max((layer for cells in by_class.values() for layer in cells), default=-1)
    order = [name for name in BLOCK_CLASSES if name in by_class] + sorted(set(by_class) - set(BLOCK_CLASSES))
    grid = {name: tuple(by_class[name].get(layer) for layer in range(n_layers)) for name in order}
    predictions = [tensor.predicted_kld for tensor in plan.tensors if tensor.predicted_kld is not None]
    return PlanHeatmap(plan.label, n_layers, grid, other, plan.bits_per_weight,
                       sum(predictions) if predictions else None)


def save_plan(plan: QuantPlan, path: str | Path) -> None:
    """Write a plan file (`--plan-out`): the plan's document with its report under "report"."""
    document = {**plan.to_json(), "report": plan_heatmap(plan).to_json()}
    with atomic_output(Path(path)) as temporary:
        temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def _bits(value: float) -> str:
    return f"{value:.0f}" if value >= 9.95 else f"{value:.1f}"


def _kld(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _row(name: str, cells: Sequence[str], width: int, tail: str = "") -> str:
    return f"{name:<12}" + "".join(cell.rjust(width) for cell in cells) + tail


def render_grid(heatmap: PlanHeatmap) -> str:
    """The heat map as text: bits per weight of every class in every layer, then per-class and per-layer sums."""
    width = 4
    layers = range(heatmap.n_layers)
    with_kld = heatmap.predicted_kld is not None
    predicted = f", predicted KLD {heatmap.predicted_kld:.4f}" if with_kld else ""
    lines = [f"bits per weight by tensor class and layer ({heatmap.label or 'plan'}: {heatmap.bpw:.2f} bpw"
             f"{predicted})",
             _row("layer", [str(layer) for layer in layers], width,
                  "   class bpw" + ("  pred. KLD" if with_kld else ""))]
    for name, cells in heatmap.grid.items():
        summary = heatmap.class_summary(name)
        tail = f"   {summary.bpw:9.2f}" + (f"  {_kld(summary.predicted_kld):>9}" if with_kld else "")
        lines.append(_row(name, ["" if cell is None else _bits(cell.bpw) for cell in cells], width, tail))
    lines.append(_row("layer bpw", [_bits(heatmap.layer_summary(layer).bpw) for layer in layers], width))
    if with_kld:
        lines.append(_row("KLD ×1e-4", [_scaled(heatmap.layer_summary(layer).predicted_kld) for layer in layers],
                          width))
    for name, cell in heatmap.other.items():
        kld = f", predicted KLD {cell.predicted_kld:.4f}" if cell.predicted_kld is not None else ""
        lines.append(f"{name:<12}{cell.type} ({_bits(cell.bpw)} bpw){kld}")
    return "\n".join(lines)


def _scaled(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e4:.0f}"


def summary_lines(heatmap: PlanHeatmap) -> list[str]:
    """One line per tensor class and per matrix outside the blocks: bits per weight, types, predicted KLD."""
    lines = []
    for name, cells in heatmap.grid.items():
        summary = heatmap.class_summary(name)
        counts: dict[str, int] = {}
        for cell in cells:
            if cell is not None:
                counts[cell.type] = counts.get(cell.type, 0) + 1
        types = ", ".join(f"{count}× {type_}" for type_, count in sorted(counts.items(), key=lambda kv: -kv[1]))
        kld = f", predicted KLD {summary.predicted_kld:.4f}" if summary.predicted_kld is not None else ""
        lines.append(f"{name:<12}{summary.bpw:5.2f} bpw ({types}){kld}")
    for name, cell in heatmap.other.items():
        kld = f", predicted KLD {cell.predicted_kld:.4f}" if cell.predicted_kld is not None else ""
        lines.append(f"{name:<12}{cell.bpw:5.2f} bpw ({cell.type}){kld}")
    return lines


def recorded_prediction(path: str | Path) -> float | None:
    """The mean KLD a sensitivity mix predicted for itself (`qdesk.mix.predicted_kld`), or None for other files."""
    from converters.core.gguf_file import open_gguf

    field = open_gguf(path).fields.get(PREDICTED_KLD_KEY)
    if field is None or not field.data:
        return None
    return float(field.parts[field.data[0]][0])
