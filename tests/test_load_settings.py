"""Per-file load settings: remembered, read back leniently, turned into engine options, and costed in memory."""

from __future__ import annotations

import json
from pathlib import Path

from qdesk.chat.load_settings import LoadSettingsStore, ModelLoadSettings, memory_cost


def test_settings_are_remembered_per_file(tmp_path: Path) -> None:
    store = LoadSettingsStore(tmp_path / "load.json")
    model = tmp_path / "m-Q4_K_M.gguf"
    assert store.get(model) == ModelLoadSettings()
    chosen = ModelLoadSettings(n_ctx=8192, gpu_layers=-1, kv_type="q8_0", threads=3)
    store.set(model, chosen)
    assert LoadSettingsStore(tmp_path / "load.json").get(model) == chosen
    assert store.get(tmp_path / "other.gguf") == ModelLoadSettings()
    options = chosen.options(default_threads=2, default_gpu_layers=0)
    assert (options.n_ctx, options.n_threads, options.n_gpu_layers, options.kv_type) == (8192, 3, -1, "q8_0")
    deferring = ModelLoadSettings().options(default_threads=2, default_gpu_layers=5)
    assert (deferring.n_ctx, deferring.n_threads, deferring.n_gpu_layers) == (4096, 2, 5)
    store.set(model, ModelLoadSettings())  # back to the defaults: forgotten
    assert json.loads((tmp_path / "load.json").read_text()) == {}


def test_a_damaged_entry_falls_back_to_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "load.json"
    model = tmp_path / "m.gguf"
    path.write_text(json.dumps({str(model): {"n_ctx": -5, "kv_type": "q8_0"}}))
    assert LoadSettingsStore(path).get(model) == ModelLoadSettings()
    path.write_text(json.dumps({str(model): {"n_ctx": 2048, "kv_type": "nonsense", "threads": True}}))
    assert LoadSettingsStore(path).get(model) == ModelLoadSettings(n_ctx=2048)


def test_the_memory_cost_follows_the_settings(starter_gguf: Path) -> None:
    base = memory_cost(starter_gguf, ModelLoadSettings())
    longer = memory_cost(starter_gguf, ModelLoadSettings(n_ctx=8192))
    halved = memory_cost(starter_gguf, ModelLoadSettings(n_ctx=8192, kv_type="q8_0"))
    assert longer.kv_bytes == 2 * base.kv_bytes and longer.weights_bytes == base.weights_bytes
    assert halved.kv_bytes < longer.kv_bytes * 0.6 and halved.ram_bytes < longer.ram_bytes
