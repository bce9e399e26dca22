"""The Library section: the starter model grouped by base, drops imported, deletion, and models sent on."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QUrl, Slot
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QMessageBox

from qdesk.gui.context import AppContext
from qdesk.gui.library_tree import NAME
from qdesk.gui.library_view import LibraryView
from qdesk.gui.type_map import cell_colour
from tests.gui_support import drop

WAIT_MS = 60_000


def library_view(qtbot, context: AppContext) -> LibraryView:
    view = LibraryView(context)
    qtbot.addWidget(view)
    view.show()
    qtbot.waitUntil(lambda: bool(view.tree.entries()), timeout=WAIT_MS)
    return view


def select(view: LibraryView, path: Path) -> None:
    view.tree.select_paths([path])
    assert [entry.path for entry in view.tree.selected_entries()] == [path]


def test_the_starter_model_is_listed_under_its_base_model(qtbot, gui_context: AppContext, starter_gguf: Path) -> None:
    view = library_view(qtbot, gui_context)
    branch = view.tree.topLevelItem(0)
    assert branch.text(NAME) == "SmolLM2-135M-Instruct"
    (entry,) = view.tree.entries()
    assert entry.path == starter_gguf and entry.variant == "Q4_1" and entry.read_only
    row = branch.child(0)
    cells = [row.text(column) for column in range(view.tree.columnCount())]
    assert cells[1] == "Q4_1" and cells[4] == "135M" and cells[6] == "llama" and cells[7] == "yes"
    assert "ready" in cells[8] and "read-only" in cells[8]


def test_a_gguf_dropped_on_the_window_is_imported_and_can_be_deleted(
        qtbot, main_window, gui_folders: dict[str, Path], starter_gguf: Path, tmp_path: Path) -> None:
    dropped = tmp_path / "Dropped-135M-Q4_1.gguf"
    shutil.copyfile(starter_gguf, dropped)
    main_window.show_section("compare")
    view: LibraryView = main_window.views["library"]
    assert drop(main_window, [dropped])
    assert main_window.current_section() == "library"
    imported = gui_folders["models"] / dropped.name
    qtbot.waitUntil(lambda: imported in [entry.path for entry in view.tree.entries()], timeout=WAIT_MS)
    assert imported.read_bytes() == dropped.read_bytes()
    qtbot.waitUntil(lambda: [entry.path for entry in view.tree.selected_entries()] == [imported], timeout=WAIT_MS)
    assert view.message.text() == "Imported Dropped-135M-Q4_1."

    qtbot.mouseClick(view.delete_button, Qt.MouseButton.LeftButton)
    box = view.confirm_box
    assert box is not None and "deleted from the models folder" in box.text()
    box.button(QMessageBox.StandardButton.Yes).click()
    qtbot.waitUntil(lambda: imported not in [entry.path for entry in view.tree.entries()], timeout=WAIT_MS)
    assert not imported.exists() and dropped.exists() and starter_gguf.exists()


def test_deleting_the_starter_only_forgets_it(qtbot, gui_context: AppContext, starter_gguf: Path) -> None:
    view = library_view(qtbot, gui_context)
    select(view, starter_gguf)
    view.delete_selected()
    assert "file stays where it is" in view.confirm_box.text()
    view.confirm_box.button(QMessageBox.StandardButton.Yes).click()
    qtbot.waitUntil(lambda: not view.tree.entries(), timeout=WAIT_MS)
    assert starter_gguf.is_file() and "No models yet" in view.message.text()


def test_a_cancelled_import_leaves_no_file(qtbot, gui_context: AppContext, gui_folders: dict[str, Path],
                                           starter_gguf: Path, tmp_path: Path) -> None:
    view = library_view(qtbot, gui_context)
    source = tmp_path / "Cancelled-Q4_1.gguf"
    shutil.copyfile(starter_gguf, source)
    view.import_files([source])
    job = view.task_job
    assert job is not None
    with qtbot.waitSignal(job.ended, timeout=WAIT_MS):
        view.cancel_task()
    assert "Cancelled" in view.message.text()
    assert sorted(path.name for path in gui_folders["models"].iterdir()) == ["library.sqlite3"]


def test_a_file_that_is_no_gguf_is_refused_in_one_sentence(qtbot, gui_context: AppContext, tmp_path: Path) -> None:
    view = library_view(qtbot, gui_context)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model at all")
    view.import_files([bogus])
    qtbot.waitUntil(lambda: view.task_job is None, timeout=WAIT_MS)
    assert "bogus.gguf" in view.message.text() and view.message.property("role") == "error"
    assert "\n" not in view.message.text()


def test_selected_models_go_to_compare_and_evaluate(qtbot, gui_context: AppContext, starter_gguf: Path) -> None:
    view = library_view(qtbot, gui_context)
    select(view, starter_gguf)
    with qtbot.waitSignal(gui_context.open_in_compare, timeout=5_000) as compare:
        qtbot.mouseClick(view.compare_button, Qt.MouseButton.LeftButton)
    assert compare.args == [[starter_gguf]]
    with qtbot.waitSignal(gui_context.open_in_evaluate, timeout=5_000) as evaluate:
        qtbot.mouseClick(view.evaluate_button, Qt.MouseButton.LeftButton)
    assert evaluate.args == [[starter_gguf]]


class _FileManager(QObject):
    def __init__(self) -> None:
        super().__init__()
        self.opened: list[QUrl] = []

    @Slot(QUrl)
    def open(self, url: QUrl) -> None:
        self.opened.append(url)


def test_reveal_opens_the_models_folder(qtbot, gui_context: AppContext, starter_gguf: Path) -> None:
    view = library_view(qtbot, gui_context)
    select(view, starter_gguf)
    manager = _FileManager()
    QDesktopServices.setUrlHandler("file", manager, "open")
    try:
        qtbot.mouseClick(view.reveal_button, Qt.MouseButton.LeftButton)
    finally:
        QDesktopServices.unsetUrlHandler("file")
    assert [Path(url.toLocalFile()) for url in manager.opened] == [starter_gguf.parent]


def test_tensor_types_show_bits_by_class_and_layer(qtbot, gui_context: AppContext, starter_gguf: Path) -> None:
    view = library_view(qtbot, gui_context)
    select(view, starter_gguf)
    dialog = view.show_types()
    assert dialog is not None
    qtbot.waitUntil(lambda: dialog.heatmap is not None, timeout=WAIT_MS)
    grid = dialog.grid
    classes = [grid.verticalHeaderItem(row).text() for row in range(grid.rowCount())]
    assert classes == ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert grid.columnCount() == 30
    assert grid.item(0, 0).text() == "5.0" and grid.item(0, 0).toolTip().startswith("q4_1")
    assert "token_embd" in dialog.details.text() and "q8_0" in dialog.details.text()
    dialog.close()


def test_the_type_colours_tell_every_width_apart_from_iq1_s_to_q8_0() -> None:
    widths = [1.5625, 2.0625, 2.3125, 2.625, 3.4375, 4.5, 5.5, 6.5625, 8.5]  # iq1_s iq2_xxs iq2_xs q2_K … q8_0
    hues = [cell_colour(bits).hueF() for bits in widths]
    assert all(cooler > warmer for cooler, warmer in itertools.pairwise(hues))
    assert cell_colour(16.0) == cell_colour(8.5)


def test_a_group_is_renamed_in_place_and_models_get_display_names(qtbot, gui_context: AppContext,
                                                                  starter_gguf: Path) -> None:
    view = library_view(qtbot, gui_context)
    select(view, starter_gguf)
    assert view.display_name(view.tree.entries()[0]) == "SmolLM2-135M-Instruct · Q4_1"
    dialog = view.show_types()
    assert dialog is not None and dialog.windowTitle() == "Tensor types — SmolLM2-135M-Instruct · Q4_1"
    qtbot.waitUntil(lambda: dialog.heatmap is not None, timeout=WAIT_MS)
    assert "Smollm2 135M 8k" not in dialog.heading.text() and "SmolLM2-135M-Instruct · Q4_1" in dialog.heading.text()
    dialog.close()

    assert view.tree.rename_current_group()
    branch = view.tree.topLevelItem(0)
    with qtbot.waitSignal(gui_context.library_changed, timeout=WAIT_MS):
        branch.setText(NAME, "Tiny chat model")  # what typing a new name in the editor does
    qtbot.waitUntil(lambda: view.tree.topLevelItem(0).text(NAME) == "Tiny chat model", timeout=WAIT_MS)
    assert list(gui_context.library().groups()) == ["Tiny chat model"]


def test_every_column_shows_at_1024_and_the_name_takes_the_rest_at_1920(qtbot, main_window) -> None:
    view = main_window.views["library"]
    qtbot.waitUntil(lambda: bool(view.tree.entries()), timeout=WAIT_MS)
    header = view.tree.header()
    for width in (1024, 1920):
        main_window.resize(width, 700)
        qtbot.wait(100)
        last = header.count() - 1
        assert header.sectionViewportPosition(last) + header.sectionSize(last) <= view.tree.viewport().width()
        assert not view.tree.horizontalScrollBar().isVisible()
    assert header.sectionSize(NAME) > 700  # at 1920 the name column stretches
