"""Where a model's layers land across this machine and its RPC workers, and the memory each device needs.

llama.cpp counts `block_count + 1` offloadable layers (the repeating blocks, then the output layer); with
`n_gpu_layers = k` the last k of them go to the devices (RPC workers first, in the order given, then local GPUs),
shared by `tensor_split`, and the rest stay on this machine's CPU with the token embedding. Layer i of the
offloaded ones goes to the first device whose cumulative share exceeds i / k (llama.cpp's rule, read from its
`llama_model::load_tensors`).

`place_layers` gives every device, this machine included, layers in proportion to the memory it reports free, and
prices each device's part with the memory estimate's rules (weights, KV cache, compute buffers): what lands where,
before anything loads.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from converters.core.errors import UserError
from converters.core.units import format_size
from native.rpc import RemoteDevice
from qdesk.memory.estimate import (
    DEFAULT_N_BATCH,
    DEFAULT_N_UBATCH,
    _Batch,
    _compute_peaks,
    _kv_bytes_per_layer,
    check_kv_type,
    flash_attention_for,
)
from qdesk.memory.shape import ModelShape, read_model_shape

if TYPE_CHECKING:
    from qdesk.chat.engine import LoadOptions

LOCAL_NAME = "CPU (this machine)"


@dataclass(frozen=True)
class DevicePlacement:
    """One device's part of the model: its layers and the bytes they take there."""

    name: str
    endpoint: str | None
    """The worker's `host:port`; None for this machine."""
    layers: tuple[int, ...]
    """Repeating blocks (0-based) on this device."""
    holds_output: bool
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    free_bytes: int
    """What the device reported free when the placement was made."""

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.free_bytes

    def layer_text(self) -> str:
        if not self.layers:
            return "output layer" if self.holds_output else "embeddings only" if self.endpoint is None else "nothing"
        first, last = self.layers[0], self.layers[-1]
        span = f"layer {first}" if first == last else f"layers {first}-{last}"
        return span + (" + output" if self.holds_output else "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint, "layers": list(self.layers),
                "holds_output": self.holds_output, "weights_bytes": self.weights_bytes, "kv_bytes": self.kv_bytes,
                "compute_bytes": self.compute_bytes, "total_bytes": self.total_bytes, "free_bytes": self.free_bytes,
                "fits": self.fits}


@dataclass(frozen=True)
class Placement:
    """A model split across this machine and its workers, and the load options that make llama.cpp do it."""

    devices: tuple[DevicePlacement, ...]
    """This machine first, then the workers' devices in llama.cpp's order."""
    n_gpu_layers: int
    tensor_split: tuple[float, ...]
    load_options: LoadOptions

    @property
    def local(self) -> DevicePlacement:
        return self.devices[0]

    def warnings(self) -> list[str]:
        return [f"{device.name} needs {format_size(device.total_bytes)} for {device.layer_text()} but reports "
                f"{format_size(device.free_bytes)} free; loading may fail there." for device in self.devices
                if not device.fits]

    def to_json(self) -> dict[str, Any]:
        return {"n_gpu_layers": self.n_gpu_layers, "tensor_split": list(self.tensor_split),
                "devices": [device.to_json() for device in self.devices]}

    def render(self) -> str:
        lines = ["where the layers go (memory estimate):"]
        for device in self.devices:
            lines.append(f"  {device.name}: {device.layer_text()}, {format_size(device.total_bytes)} "
                         f"(weights {format_size(device.weights_bytes)}, KV {format_size(device.kv_bytes)}, compute "
                         f"{format_size(device.compute_bytes)}) of {format_size(device.free_bytes)} free")
        return "\n".join(lines)


def device_of_layers(n_offloadable: int, n_gpu_layers: int, shares: Sequence[float]) -> list[int | None]:
    """For each of the `n_offloadable` layers (output last): the index of its device in `shares`, None for the CPU."""
    total = sum(shares)
    if total <= 0 or not shares:
        return [None] * n_offloadable
    cumulative, running = [], 0.0
    for share in shares:
        running += share
        cumulative.append(running / total)
    first = max(n_offloadable - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_offloadable)
    placement: list[int | None] = []
    for layer in range(n_offloadable):
        if layer < first or layer - first >= active:
            placement.append(None)
        else:
            index = bisect.bisect_right(cumulative, (layer - first) / active)
            placement.append(min(index, len(shares) - 1))
    return placement


def split_by_memory(shape: ModelShape, local_free: int, device_free: Sequence[int]) -> tuple[int, tuple[float, ...]]:
    """(n_gpu_layers, tensor_split): every device's share of the offloadable layers in proportion to its free memory,
    this machine's CPU (which also keeps the token embedding) included."""
    total = local_free + sum(device_free)
    if total <= 0 or not device_free:
        return 0, ()
    offloadable = shape.offloadable_layers
    on_cpu = round(offloadable * local_free / total)
    return offloadable - on_cpu, tuple(float(free) for free in device_free)


def price_placement(shape: ModelShape, names: Sequence[tuple[str, str | None, int]], n_gpu_layers: int,
                    tensor_split: Sequence[float], *, n_ctx: int, kv_type: str = "f16") -> tuple[DevicePlacement, ...]:
    """Each device's layers and bytes; `names` is (name, endpoint, free bytes) for this machine first, then each
    device of `tensor_split` in order."""
    cache_type = check_kv_type(kv_type)
    flash = flash_attention_for(kv_type, None)
    batch = _Batch.of(n_ctx, DEFAULT_N_BATCH, DEFAULT_N_UBATCH)
    kv_per_layer = _kv_bytes_per_layer(shape, cache_type, batch.n_cells, flash)
    peaks = _compute_peaks(shape, batch, flash)
    owners = device_of_layers(shape.offloadable_layers, n_gpu_layers, tensor_split)
    output_owner = owners[-1]
    placed = []
    for slot, (name, endpoint, free) in enumerate(names):
        owner = None if slot == 0 else slot - 1
        layers = tuple(layer for layer in range(shape.n_layer) if owners[layer] == owner)
        holds_output = output_owner == owner
        weights = sum(shape.layer_bytes[layer] for layer in layers)
        kv = sum(kv_per_layer[layer] for layer in layers)
        if owner is None:
            weights += shape.input_bytes  # the token embedding always stays here
            if holds_output:
                weights += shape.output_bytes
            inputs = peaks.host_inputs if n_gpu_layers else 0
            compute = max(inputs, peaks.layers if layers else 0, peaks.output if holds_output else 0)
            compute += peaks.output_buffer
        else:
            if holds_output:
                weights += shape.output_bytes + shape.tied_output_bytes
            compute = max(peaks.layers if layers else 0, peaks.output if holds_output else 0)
        placed.append(DevicePlacement(name, endpoint, layers, holds_output, weights, kv, compute, free))
    return tuple(placed)


def place_layers(path: str | os.PathLike[str], options: LoadOptions, *,
                 workers: Sequence[RemoteDevice] | None = None, local_free: int | None = None) -> Placement:
    """Split the model at `path` across this machine and the workers of `options.rpc` by free memory.

    `workers` and `local_free` default to what the workers report now (`describe_workers`, in a child process) and
    the RAM available here. Raises UserError when a worker cannot be reached or the model has no layers to share.
    """
    from qdesk.memory.fit import available_ram
    from qdesk.rpc.probe import describe_workers

    if not options.rpc:
        raise UserError("no RPC workers were given; add --rpc host:port (a machine running `qdesk worker`).")
    shape = read_model_shape(path)
    devices = list(workers) if workers is not None else describe_workers(options.rpc)
    if not devices:
        raise UserError(f"the RPC workers ({', '.join(options.rpc)}) offer no devices; restart them.")
    free_here = available_ram() if local_free is None else local_free
    n_gpu_layers, tensor_split = split_by_memory(shape, free_here, [device.memory_free for device in devices])
    names = [(LOCAL_NAME, None, free_here)] + [(f"{device.name} at {device.endpoint}", device.endpoint,
                                                 device.memory_free) for device in devices]
    n_ctx = options.n_ctx or shape.n_ctx_train
    priced = price_placement(shape, names, n_gpu_layers, tensor_split, n_ctx=n_ctx, kv_type=options.kv_type)
    load = replace(options, n_gpu_layers=n_gpu_layers, tensor_split=tensor_split)
    return Placement(priced, n_gpu_layers, tensor_split, load)


__all__ = [
    "LOCAL_NAME",
    "DevicePlacement",
    "Placement",
    "device_of_layers",
    "place_layers",
    "price_placement",
    "split_by_memory",
]
