"""Compare puts a base model and the same base with a LoRA adapter side by side: the adapter is chosen per pane in
its load settings, from the library, where it is listed under its base model and never offered as a model."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from converters.writing.convert import convert_checkpoint
from converters.writing.lora import convert_adapter
from qdesk.gui.compare_view import CompareView
from qdesk.gui.context import AppContext
from tests.builders.adapters import build_lora_adapter
from tests.builders.checkpoints import build_tiny_checkpoint

LOAD_AND_ANSWER_MS = 120_000


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = build_tiny_checkpoint(tmp_path_factory.mktemp("base"), "llama", tied=False)
    model = convert_checkpoint(base, tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf").path
    folder = build_lora_adapter(base, tmp_path_factory.mktemp("adapter") / "style")
    adapter = convert_adapter(folder, tmp_path_factory.mktemp("adapter-gguf") / "style-LoRA.gguf", base=base).path
    return model, adapter


def test_base_and_base_with_adapter_answer_side_by_side(qtbot, gui_context: AppContext,
                                                         base_and_adapter: tuple[Path, Path]) -> None:
    model, converted = base_and_adapter
    library = gui_context.library()
    library.import_model(model, link=True)
    adapter = library.import_model(converted, link=True).path
    view = CompareView(gui_context)
    qtbot.addWidget(view)
    gui_context.open_in_compare.emit([model, model])
    view.shared.temperature.setValue(0.0)
    view.shared.max_tokens.setValue(12)
    view.show()
    plain, adapted = view.panes
    qtbot.waitUntil(lambda: all(pane.runner.model is not None for pane in view.panes), timeout=LOAD_AND_ANSWER_MS)
    assert adapted.model_box.findData(str(adapter)) < 0  # an adapter is no model to pick

    qtbot.mouseClick(adapted.load_settings, Qt.MouseButton.LeftButton)
    panel = adapted.load_panel
    qtbot.waitUntil(lambda: panel.adapter_box.findData(str(adapter)) >= 0, timeout=10_000)
    panel.adapter_box.setCurrentIndex(panel.adapter_box.findData(str(adapter)))
    before = adapted.runner.model.pid
    qtbot.mouseClick(panel.apply_button, Qt.MouseButton.LeftButton)
    assert adapted.lora is not None and adapted.lora.path == adapter and plain.lora is None
    assert adapted.adapter_label.isVisibleTo(adapted) and adapter.name in adapted.adapter_label.text()
    assert not plain.adapter_label.isVisibleTo(plain)
    qtbot.waitUntil(lambda: adapted.runner.model is not None and adapted.runner.model.pid != before,
                    timeout=LOAD_AND_ANSWER_MS)

    qtbot.keyClicks(view.prompt, "tell me a story")
    qtbot.keyClick(view.prompt, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: not view.busy, timeout=LOAD_AND_ANSWER_MS)
    turn = view.conversation.turns[0]
    first, second = turn.answer(0), turn.answer(1)
    assert first.error is None and second.error is None
    assert first.text != second.text, "the adapter changes what the same base model answers"
    view.shutdown()


def test_a_dropped_adapter_folder_is_explained(tmp_path: Path) -> None:
    from qdesk.gui.drops import route_drop

    folder = tmp_path / "style"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    route = route_drop([folder])
    assert route.quantize_source is None and len(route.rejected) == 1
    assert route.rejected[0].startswith("style is a LoRA adapter, not a model; convert it with `qdesk convert style`")
