"""PEFT LoRA adapters for a tiny checkpoint, made by PEFT itself, with B matrices that are not zero (PEFT starts
B at zero, which would make any adapter, converted right or wrong, change nothing)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

ADAPTER_STD = 0.2


def build_lora_adapter(base: Path, folder: Path, *, r: int = 8, lora_alpha: float = 16,
                       target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"),
                       use_rslora: bool = False, rank_pattern: Mapping[str, int] | None = None,
                       alpha_pattern: Mapping[str, float] | None = None, seed: int = 5,
                       base_model_name_or_path: str | None = None) -> Path:
    """A LoRA adapter of `base` saved by PEFT in `folder` (adapter_config.json + adapter_model.safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), use_rslora=use_rslora,
                        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * ADAPTER_STD)
    peft_model.save_pretrained(folder)
    if base_model_name_or_path is not None:
        _set_base_name(folder, base_model_name_or_path)
    return folder


def _set_base_name(folder: Path, name: str) -> None:
    import json

    path = folder / "adapter_config.json"
    settings: dict[str, Any] = json.loads(path.read_text())
    settings["base_model_name_or_path"] = name
    path.write_text(json.dumps(settings, indent=2))


def peft_logits(base: Path, adapter: Path, ids: list[int], scale: float = 1.0) -> Any:
    """transformers + PEFT logits of base+adapter (float32, eager attention), the adapter at `scale`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(model, adapter)
    if scale != 1.0:
        for module in peft_model.modules():
            if hasattr(module, "scale_layer") and hasattr(module, "lora_A"):
                module.scale_layer(scale)
    with torch.no_grad():
        return peft_model(torch.tensor([ids])).logits[0].numpy()


__all__ = ["build_lora_adapter", "peft_logits"]
