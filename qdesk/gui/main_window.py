"""The main window: a sidebar of sections, the section on show, drops anywhere, and state kept across restarts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import (
    QAction,
    QActionGroup,
    QCloseEvent,
    QDesktopServices,
    QDragEnterEvent,
    QDropEvent,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMenu,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from qdesk.app.logs import log_path
from qdesk.gui.compare_view import CompareView
from qdesk.gui.context import AppContext
from qdesk.gui.discover_view import DiscoverView
from qdesk.gui.drops import route_drop
from qdesk.gui.evaluate_view import EvaluateView
from qdesk.gui.feedback import show_failure
from qdesk.gui.help_dialogs import AboutDialog, ShortcutsDialog
from qdesk.gui.library_view import LibraryView
from qdesk.gui.quantize_view import QuantizeView
from qdesk.gui.serve_view import ServeView
from qdesk.gui.settings_view import SettingsView
from qdesk.gui.theme import apply_font_size, apply_theme


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    view: type[QWidget]


SECTIONS = (
    Section("library", "Library", LibraryView),
    Section("discover", "Discover", DiscoverView),
    Section("quantize", "Quantize", QuantizeView),
    Section("compare", "Compare", CompareView),
    Section("evaluate", "Evaluate", EvaluateView),
    Section("serve", "Serve", ServeView),
    Section("settings", "Settings", SettingsView),
)
GUIDE_TEXT = ("<b>Welcome to qdesk.</b> The starter model SmolLM2-135M is ready to chat in <i>Compare</i> "
              "(Ctrl+4). Drop a Hugging Face checkpoint folder or a .gguf file anywhere on this window to quantize "
              "or import it; Ctrl+1…7 switch sections.")


class MainWindow(QMainWindow):
    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.setWindowTitle("qdesk")
        self.setObjectName("mainWindow")
        self.setAcceptDrops(True)
        self.resize(1280, 820)

        self.sidebar = QListWidget()
        self.sidebar.setObjectName("sidebar")
        self.sidebar.setFixedWidth(170)
        self.stack = QStackedWidget()
        self.views: dict[str, QWidget] = {}
        for number, section in enumerate(SECTIONS, start=1):
            item = QListWidgetItem(section.title)
            item.setToolTip(f"{section.title} (Ctrl+{number})")
            item.setData(Qt.ItemDataRole.UserRole, section.key)
            self.sidebar.addItem(item)
            view = section.view(context)
            view.setObjectName(f"{section.key}View")
            self.views[section.key] = view
            self.stack.addWidget(view)
        self.sidebar.currentRowChanged.connect(self._row_changed)

        self.guide = self._guide_banner()
        content = QWidget()
        column = QVBoxLayout(content)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.guide)
        column.addWidget(self.stack, 1)
        central = QWidget()
        row = QHBoxLayout(central)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)
        row.addWidget(self.sidebar)
        row.addWidget(content, 1)
        self.setCentralWidget(central)
        self.statusBar().setObjectName("statusBar")
        self._build_menus()

        discover, library = self.views["discover"], self.views["library"]
        discover.import_requested.connect(lambda: (self.show_section("library"), library.choose_files()))
        discover.scan_requested.connect(lambda: (self.show_section("library"), library.scan_other_apps()))
        library.report_requested.connect(lambda path: self.views["evaluate"].show_saved(path)
                                         and self.show_section("evaluate"))
        context.show_section.connect(self.show_section)
        context.open_in_quantize.connect(lambda _path: self.show_section("quantize"))
        context.open_in_compare.connect(lambda _paths: self.show_section("compare"))
        context.open_in_evaluate.connect(lambda _paths: self.show_section("evaluate"))
        apply_font_size(context.settings.font_size)
        context.settings_changed.connect(lambda settings: apply_theme(settings.theme))
        context.settings_changed.connect(lambda settings: apply_font_size(settings.font_size))
        context.settings_changed.connect(lambda settings: self._show_theme(settings.theme))
        self.restore_state()

    # --- the menu bar ---

    def _build_menus(self) -> None:
        bar = self.menuBar()
        bar.setObjectName("menuBar")
        file_menu = bar.addMenu("&File")
        self._action(file_menu, "&Import models…", self._import_models, tip="Copy .gguf files into the library")
        self._action(file_menu, "&Quantize a checkpoint folder…", self._open_checkpoint,
                     tip="Choose a Hugging Face checkpoint folder to quantize")
        file_menu.addSeparator()
        self._action(file_menu, "&Settings", lambda: self.show_section("settings"), "Ctrl+,")
        file_menu.addSeparator()
        quit_action = self._action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        quit_action.setShortcut(QKeySequence("Ctrl+Q"))
        quit_action.setMenuRole(QAction.MenuRole.QuitRole)

        view_menu = bar.addMenu("&View")
        for number, section in enumerate(SECTIONS, start=1):
            self._action(view_menu, section.title, lambda key=section.key: self.show_section(key), f"Ctrl+{number}")
        view_menu.addSeparator()
        themes = view_menu.addMenu("&Theme")
        self.theme_actions = QActionGroup(self)
        for key, title in (("system", "Follow the &system"), ("light", "&Light"), ("dark", "&Dark")):
            action = self._action(themes, title, lambda key=key: self.set_theme(key))
            action.setCheckable(True)
            action.setData(key)
            self.theme_actions.addAction(action)
        self._show_theme(self.context.settings.theme)
        self._action(view_menu, "Show the &welcome guide", self.guide.show)

        help_menu = bar.addMenu("&Help")
        self._action(help_menu, "&Keyboard shortcuts", self.show_shortcuts, QKeySequence.StandardKey.HelpContents)
        self._action(help_menu, "&Where qdesk keeps its files", self.show_about)
        self._action(help_menu, "Open the &log file", self.open_log)
        help_menu.addSeparator()
        about = self._action(help_menu, "&About qdesk", self.show_about)
        about.setMenuRole(QAction.MenuRole.AboutRole)

    def _action(self, menu: QMenu, text: str, slot: object, keys: object = None, tip: str = "") -> QAction:
        action = menu.addAction(text)
        action.triggered.connect(lambda _checked=False: slot())  # type: ignore[operator]
        if keys is not None:
            action.setShortcut(QKeySequence(keys))  # type: ignore[arg-type]
            action.setShortcutContext(Qt.ShortcutContext.ApplicationShortcut)
        if tip:
            action.setStatusTip(tip)
        return action

    def _import_models(self) -> None:
        self.show_section("library")
        self.views["library"].choose_files()

    def _open_checkpoint(self) -> None:
        self.show_section("quantize")
        self.views["quantize"].choose_folder()

    def set_theme(self, theme: str) -> None:
        if theme != self.context.settings.theme:
            self.context.update_settings(replace(self.context.settings, theme=theme))

    def _show_theme(self, theme: str) -> None:
        for action in self.theme_actions.actions():
            action.setChecked(action.data() == theme)

    def show_shortcuts(self) -> ShortcutsDialog:
        dialog = ShortcutsDialog(self)
        dialog.open()
        return dialog

    def show_about(self) -> AboutDialog:
        dialog = AboutDialog(self.context, self)
        dialog.open()
        return dialog

    def open_log(self) -> None:
        path = log_path()
        if not path.exists():
            self.statusBar().showMessage(f"Nothing has gone wrong yet: there is no log file ({path}).", 8000)
            return
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))

    # --- sections ---

    def show_section(self, key: str) -> None:
        keys = [section.key for section in SECTIONS]
        if key in keys:
            self.sidebar.setCurrentRow(keys.index(key))

    def current_section(self) -> str:
        return SECTIONS[max(0, self.stack.currentIndex())].key

    def _row_changed(self, row: int) -> None:
        if row < 0:
            return
        self.stack.setCurrentIndex(row)
        activated = getattr(self.stack.currentWidget(), "activated", None)
        if callable(activated):
            activated()

    # --- first run ---

    def _guide_banner(self) -> QWidget:
        banner = QWidget()
        banner.setObjectName("guideBanner")
        layout = QHBoxLayout(banner)
        text = QLabel(GUIDE_TEXT)
        text.setWordWrap(True)
        text.setTextFormat(Qt.TextFormat.RichText)
        dismiss = QPushButton("Got it")
        dismiss.setObjectName("dismissGuide")
        dismiss.clicked.connect(self.dismiss_guide)
        layout.addWidget(text, 1)
        layout.addWidget(dismiss)
        return banner

    def dismiss_guide(self) -> None:
        self.guide.hide()
        self.context.window_state().setValue("guide_seen", True)

    # --- drops anywhere on the window ---

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls() and any(url.isLocalFile() for url in event.mimeData().urls()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = [Path(url.toLocalFile()) for url in event.mimeData().urls() if url.isLocalFile()]
        event.acceptProposedAction()
        self.open_paths(paths)

    def open_paths(self, paths: list[Path]) -> None:
        """What a drop does: GGUFs into the Library, a checkpoint (or float GGUF) into Quantize."""
        route = route_drop(paths)
        if route.library_imports:
            self.views["library"].import_files(route.library_imports)
            if route.quantize_source is None:
                self.show_section("library")
        if route.quantize_source is not None:
            self.views["quantize"].set_source(route.quantize_source)
            self.show_section("quantize")
        if route.rejected:
            show_failure(self, ValueError(" ".join(route.rejected)))

    # --- state across restarts ---

    def restore_state(self) -> None:
        state = self.context.window_state()
        geometry = state.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        keys = [section.key for section in SECTIONS]
        last = str(state.value("section", "library"))
        self.show_section(last if last in keys else "library")
        self.guide.setVisible(not _truthy(state.value("guide_seen", False)))
        for view in self.views.values():
            restore = getattr(view, "restore_state", None)
            if callable(restore):
                restore(state)

    def save_state(self) -> None:
        state = self.context.window_state()
        state.setValue("geometry", self.saveGeometry())
        state.setValue("section", self.current_section())
        for view in self.views.values():
            save = getattr(view, "save_state", None)
            if callable(save):
                save(state)
        state.sync()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.save_state()
        for view in self.views.values():
            shutdown = getattr(view, "shutdown", None)
            if callable(shutdown):
                shutdown()
        self.context.shutdown()
        event.accept()


def _truthy(value: object) -> bool:
    return value is True or str(value).lower() in ("true", "1")

