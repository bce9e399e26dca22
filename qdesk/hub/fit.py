"""Does a file on the Hub fit this machine? Answered before downloading it.

A GGUF's memory estimate needs its header only: it is fetched with HTTP Range requests into a temporary file,
growing the range (256 KiB, then doubling) until `qdesk.memory.read_model_shape_from_prefix` can read it. One header
is fetched per model in a repository (its smallest variant); the other quantizations of that model share its
hyperparameters and vocabulary, so their shapes are that one's with the tensor bytes scaled to their file sizes
(marked approximate). A shard set's first shard holds the metadata; the other shards' bytes are spread over the
layers the first one lacks (approximate too). A safetensors checkpoint is judged from its file sizes alone.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.core.errors import GGUFFileError
from converters.core.units import format_size
from qdesk.hub.http import open_stream, translated
from qdesk.hub.settings import HubSettings
from qdesk.memory import (
    DEFAULT_N_CTX,
    DEFAULT_RAM_HEADROOM,
    ModelShape,
    check_fit_for_shape,
    read_model_shape_from_prefix,
)

__all__ = ["FIRST_HEADER_BYTES", "MAX_HEADER_BYTES", "FitMark", "checkpoint_fit", "fetch_gguf_shape", "gguf_fit",
           "resized_shape"]

FIRST_HEADER_BYTES = 256 * 1024
MAX_HEADER_BYTES = 128 * 1024 * 1024
UNQUANTIZED_OVERHEAD = 1.10
"""Running a checkpoint unquantized takes about its weights plus a tenth for the KV cache and buffers."""


@dataclass(frozen=True)
class FitMark:
    """Whether a file (or shard set) fits this machine: `fits` is None when it could not be told, and `approximate`
    when the estimate was scaled or taken from file sizes rather than read from the file's own header."""

    fits: bool | None
    approximate: bool
    needed_bytes: int | None
    summary: str

    @property
    def label(self) -> str:
        if self.fits is None:
            return "?"
        return ("~" if self.approximate else "") + ("fits" if self.fits else "does not fit")

    def to_json(self) -> dict[str, Any]:
        return {"fits": self.fits, "approximate": self.approximate, "needed_bytes": self.needed_bytes,
                "summary": self.summary}


def unknown_fit(reason: str) -> FitMark:
    return FitMark(fits=None, approximate=True, needed_bytes=None, summary=reason)


def fetch_gguf_shape(settings: HubSettings, url: str, *, file_size: int, name: str,
                     first_bytes: int = FIRST_HEADER_BYTES, max_bytes: int = MAX_HEADER_BYTES) -> ModelShape:
    """The shape of the remote GGUF at `url` from its header alone, fetched with growing Range requests (each asks
    only for the bytes not yet fetched). Raises GGUFFileError for a file that is not GGUF or a header larger than
    `max_bytes`, and HubErrors for the network."""
    if file_size < 8:
        raise GGUFFileError(f"{name} is empty or truncated ({file_size} bytes), so it is no GGUF model.")
    with tempfile.TemporaryDirectory(prefix="qdesk-header-") as folder:
        prefix = Path(folder) / "header.gguf"
        prefix.write_bytes(b"")
        have, want = 0, min(first_bytes, file_size)
        while True:
            _append_range(settings, url, prefix, have, want)
            have = want
            shape = read_model_shape_from_prefix(prefix, file_size=file_size, name=name)
            if shape is not None:
                return shape
            if have >= file_size:
                raise GGUFFileError(f"{name} is truncated: its header runs past the end of the file.")
            if have >= max_bytes:
                raise GGUFFileError(f"{name} has a header larger than {format_size(max_bytes)}, more than qdesk "
                                    "reads to estimate its memory.")
            want = min(file_size, have * 2)


def _append_range(settings: HubSettings, url: str, prefix: Path, start: int, stop: int) -> None:
    with translated(settings, None), open_stream(settings, url, start=start, stop=stop) as response, \
            prefix.open("r+b") as out:
        skip = start if response.status_code == 200 else 0  # a server that ignores Range sends it all
        out.seek(start)
        wanted = stop - start
        for chunk in response.iter_bytes():
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            chunk = chunk[:wanted]
            out.write(chunk)
            wanted -= len(chunk)
            if wanted <= 0:
                break


def resized_shape(shape: ModelShape, tensor_bytes: int) -> ModelShape:
    """`shape` with `tensor_bytes` of weights: scaled evenly for another quantization of a complete file, or, for a
    first shard (layers without bytes), the missing bytes spread over the layers it lacks."""
    if tensor_bytes <= 0 or shape.tensor_bytes <= 0 or tensor_bytes == shape.tensor_bytes:
        return shape
    empty_layers = [index for index, size in enumerate(shape.layer_bytes) if size == 0]
    if empty_layers and tensor_bytes > shape.tensor_bytes:
        missing = tensor_bytes - shape.tensor_bytes
        layer_bytes = list(shape.layer_bytes)
        for index in empty_layers:
            layer_bytes[index] = missing // len(empty_layers)
        layer_bytes[empty_layers[-1]] += missing % len(empty_layers)
        return dataclasses.replace(shape, layer_bytes=tuple(layer_bytes), tensor_bytes=tensor_bytes)
    ratio = tensor_bytes / shape.tensor_bytes
    layer_bytes = tuple(round(size * ratio) for size in shape.layer_bytes)
    input_bytes = round(shape.input_bytes * ratio)
    output_bytes = round(shape.output_bytes * ratio)
    return dataclasses.replace(
        shape, input_bytes=input_bytes, layer_bytes=layer_bytes, output_bytes=output_bytes,
        tied_output_bytes=round(shape.tied_output_bytes * ratio),
        tensor_bytes=input_bytes + sum(layer_bytes) + output_bytes,
    )


def gguf_fit(shape: ModelShape, *, approximate: bool, basis: str, ram_bytes: int | None, vram_bytes: int | None,
             n_ctx: int = DEFAULT_N_CTX) -> FitMark:
    """The fit mark of a GGUF whose shape is known (read from its header, or `resized_shape` of another's)."""
    verdict = check_fit_for_shape(shape, ram_bytes=ram_bytes, vram_bytes=vram_bytes, n_ctx=n_ctx)
    summary = verdict.summary
    if approximate:
        summary = summary.rstrip(".") + f" (approximate: {basis})."
    return FitMark(fits=verdict.fits, approximate=approximate,
                   needed_bytes=verdict.ram_needed + verdict.vram_needed, summary=summary)


def checkpoint_fit(weights_bytes: int, *, ram_bytes: int, vram_bytes: int | None) -> FitMark:
    """An approximate fit mark for a safetensors checkpoint run unquantized, from its file sizes."""
    needed = int(weights_bytes * UNQUANTIZED_OVERHEAD) + DEFAULT_RAM_HEADROOM
    available = ram_bytes + (vram_bytes or 0)
    memory = "RAM and VRAM" if vram_bytes else "RAM"
    fits = needed <= available
    verdict = ("so it fits" if fits else
               "so it does not fit unquantized; quantize it (Q4_K_M takes about a third of that)")
    return FitMark(fits=fits, approximate=True, needed_bytes=needed,
                   summary=f"Run unquantized it needs about {format_size(needed)} (an estimate from its file sizes); "
                           f"{format_size(available)} of {memory} is available, {verdict}.")
