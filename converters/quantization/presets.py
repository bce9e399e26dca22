"""llama.cpp's quantization presets by name: which file type each is, and whether it wants an importance matrix.

The per-tensor rules behind a preset are llama.cpp's own; qdesk asks llama.cpp for them (a dry run)
instead of restating them, so a preset here is only a name, a file type and a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import LlamaFileType

from converters.core.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    file_type: LlamaFileType
    summary: str
    uses_imatrix: bool = True
    """The preset's encoders weigh their rounding by an importance matrix when one is given."""
    requires_imatrix: bool = False
    """llama.cpp refuses (or makes garbage) without a matrix."""

    @property
    def ftype(self) -> int:
        return int(self.file_type)


_PRESET_LIST = (
    Preset("Q2_K", LlamaFileType.MOSTLY_Q2_K, "smallest k-quant; large quality loss"),
    Preset("Q2_K_S", LlamaFileType.MOSTLY_Q2_K_S, "Q2_K with fewer larger tensors; needs an importance matrix",
           requires_imatrix=True),
    Preset("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, "very small, high quality loss"),
    Preset("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, "very small, high quality loss"),
    Preset("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, "small, substantial quality loss"),
    Preset("Q4_0", LlamaFileType.MOSTLY_Q4_0, "legacy 4-bit, fast on some hardware"),
    Preset("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, "small, noticeable quality loss"),
    Preset("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, "medium, balanced quality (the usual choice)"),
    Preset("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, "large, low quality loss"),
    Preset("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, "large, very low quality loss"),
    Preset("Q6_K", LlamaFileType.MOSTLY_Q6_K, "very large, extremely low quality loss"),
    Preset("Q8_0", LlamaFileType.MOSTLY_Q8_0, "very large, practically lossless", uses_imatrix=False),
    Preset("F16", LlamaFileType.MOSTLY_F16, "16-bit floats: a reference to measure the others against",
           uses_imatrix=False),
    *(Preset(name, LlamaFileType[f"MOSTLY_{name}"], f"{bits} bpw i-quant; needs an importance matrix",
             requires_imatrix=True)
      for name, bits in (("IQ4_NL", "4.50"), ("IQ4_XS", "4.25"), ("IQ3_M", "3.66"), ("IQ3_S", "3.44"),
                         ("IQ3_XS", "3.3"), ("IQ3_XXS", "3.06"), ("IQ2_M", "2.7"), ("IQ2_S", "2.5"),
                         ("IQ2_XS", "2.31"), ("IQ2_XXS", "2.06"), ("IQ1_M", "1.75"), ("IQ1_S", "1.56"))),
)
"""llama.cpp's i-quant file types with the bits per weight its quantizer quotes for a 7B model."""

PRESETS: dict[str, Preset] = {preset.name: preset for preset in _PRESET_LIST}


def preset_named(name: str) -> Preset:
    """The preset called `name` (case-insensitive); a clear UserError for anything else."""
    preset = PRESETS.get(name.strip().upper())
    if preset is None:
        raise UserError(f"{name!r} is not a quantization preset; choose one of {', '.join(PRESETS)}.")
    return preset
