"""A quantization plan: the ggml type every tensor of a model gets, with the bytes that costs.

The plan is the common currency between the parts that choose types (llama.cpp's presets, read
back through a dry run; the sensitivity allocator) and the part that applies them (the quantizer).
Type names are ggml's own spelling ("q4_K", "q6_K", "q8_0", "f16", "f32").
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from converters.core.errors import UserError

PLAN_FORMAT = "qdesk.plan/1"


class PlanError(UserError):
    """A plan that cannot be applied: an unknown type, a type that does not fit a tensor, another model's plan."""


def ggml_type(name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise PlanError(f"{name!r} is not a ggml tensor type; use names like q4_K, q6_K, q8_0 or f16.") from None


def type_name(quant_type: GGMLQuantizationType) -> str:
    """ggml's spelling of a type: lower case except the K of k-quants (q4_K)."""
    name = quant_type.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def fits(type_: str, row_length: int) -> bool:
    block_size, _ = GGML_QUANT_SIZES[ggml_type(type_)]
    return row_length % block_size == 0


def tensor_bytes(type_: str, shape: tuple[int, ...]) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type(type_)]
    return prod(shape) // block_size * type_size


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    """ggml order: shape[0] is the row length."""
    source_type: str
    type: str
    gain: float | None = None
    """For a sensitivity mix: the tensor's measured KLD per unit of importance-weighted squared error."""
    predicted_kld: float | None = None
    """For a sensitivity mix: the predicted contribution of this tensor at this type to the mean KLD."""

    @property
    def n_elements(self) -> int:
        return prod(self.shape)

    @property
    def n_bytes(self) -> int:
        return tensor_bytes(self.type, self.shape)


@dataclass(frozen=True)
class QuantPlan:
    """Every tensor of one model with the type it gets; `base` names the llama.cpp file type it builds on."""

    tensors: tuple[PlannedTensor, ...]
    base: str
    """The preset whose file type the output records (its rules apply to any tensor the plan leaves out)."""
    label: str = ""
    """What made the plan, e.g. "preset Q4_K_M" or "sensitivity mix at 95 MB"."""
    encoder: str = "ggml"
    """How the weights are rounded: "ggml" (llama.cpp's quantizer) or "feedback" (`converters.mix.feedback`)."""

    def __post_init__(self) -> None:
        for tensor in self.tensors:
            if not fits(tensor.type, tensor.shape[0]):
                block_size, _ = GGML_QUANT_SIZES[ggml_type(tensor.type)]
                raise PlanError(
                    f"{tensor.type} does not fit {tensor.name}: its rows of {tensor.shape[0]} values are not a "
                    f"multiple of the {block_size}-value blocks of {tensor.type}; choose another type for it."
                )

    def types(self) -> dict[str, str]:
        return {tensor.name: tensor.type for tensor in self.tensors}

    def tensor(self, name: str) -> PlannedTensor:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    @property
    def n_bytes(self) -> int:
        """Bytes of tensor data the plan produces (the file adds its header and alignment padding)."""
        return sum(tensor.n_bytes for tensor in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(tensor.n_elements for tensor in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / self.n_elements if self.n_elements else 0.0

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(tensor.type for tensor in self.tensors).most_common())

    def with_types(self, changes: Mapping[str, str], label: str | None = None) -> QuantPlan:
        """A copy with some tensors' types changed (raises PlanError for unknown tensors or misfits)."""
        unknown = set(changes) - {tensor.name for tensor in self.tensors}
        if unknown:
            raise PlanError(f"the plan has no tensor {sorted(unknown)[0]!r}; plans apply to one model only.")
        tensors = tuple(replace(t, type=changes[t.name], predicted_kld=None) if t.name in changes else t
                        for t in self.tensors)
        return QuantPlan(tensors, self.base, self.label if label is None else label, self.encoder)

    def check_model(self, model_tensors: Iterable[tuple[str, tuple[int, ...]]], model_name: str) -> None:
        """Raise PlanError unless the plan's tensors are exactly `model_tensors` (name, shape) pairs."""
        model = dict(model_tensors)
        planned = {tensor.name: tensor.shape for tensor in self.tensors}
        missing = sorted(set(model) - set(planned))
        extra = sorted(set(planned) - set(model))
        if extra or missing:
            which = f"has {extra[0]}, which the model lacks" if extra else f"lacks the model's {missing[0]}"
            raise PlanError(f"the plan was made for another model: it {which}; make a new plan for {model_name}.")
        for name, shape in model.items():
            if tuple(shape) != tuple(planned[name]):
                raise PlanError(f"the plan was made for another model: {name} is {list(planned[name])} in the plan "
                                f"but {list(shape)} in {model_name}; make a new plan for this model.")

    def to_json(self) -> dict[str, Any]:
        """The plan file's document, without the "report" that `converters.mix.report.save_plan` adds for reading
        and drawing (it is ignored when the plan is loaded)."""
        return {
            "format": PLAN_FORMAT,
            "base": self.base,
            "label": self.label,
            "encoder": self.encoder,
            "bytes": self.n_bytes,
            "bpw": round(self.bits_per_weight, 4),
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "source_type": t.source_type, "type": t.type,
                 **({} if t.gain is None else {"gain": t.gain}),
                 **({} if t.predicted_kld is None else {"predicted_kld": t.predicted_kld})}
                for t in self.tensors
            ],
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> QuantPlan:
        if not isinstance(document, Mapping):
            raise PlanError(f"this is not a qdesk plan (it holds a JSON {type(document).__name__}, not an object); "
                            "write one with `qdesk quantize --plan-out`.")
        if document.get("format") != PLAN_FORMAT:
            raise PlanError(f"this is not a qdesk plan (format {document.get('format')!r}, expected {PLAN_FORMAT}); "
                            "write one with `qdesk quantize --plan-out`.")
        try:
            tensors = tuple(
                PlannedTensor(str(t["name"]), tuple(int(d) for d in t["shape"]), str(t["source_type"]), str(t["type"]),
                              _optional_float(t.get("gain")), _optional_float(t.get("predicted_kld")))
                for t in document["tensors"]
            )
            encoder = str(document.get("encoder", "ggml"))
            if encoder not in ("ggml", "feedback"):
                raise PlanError(f"the plan asks for the encoder {encoder!r}; qdesk knows \"ggml\" and \"feedback\".")
            return cls(tensors, str(document["base"]), str(document.get("label", "")), encoder)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
            raise PlanError(f"the plan is incomplete ({error}); write it again with `qdesk quantize --plan-out`.") \
                from error

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PlanError(f"{path} cannot be read as a plan ({error}); write one with `qdesk quantize --plan-out`.") \
                from error
        return cls.from_json(document)
