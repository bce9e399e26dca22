"""A Compare pane's load settings: context length, GPU layers, KV cache and threads for its model file, with what
loading costs in memory (qdesk's own estimate, redone as the fields change), Apply (reloads) and Unload; and the
LoRA adapter this pane applies (from the library's adapters), so one base can answer with and without it."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

from converters.core.units import format_size
from qdesk.chat.load_settings import KV_CHOICES, ModelLoadSettings, memory_cost
from qdesk.chat.lora import LoraChoice
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext
from qdesk.library.store import LibraryEntry
from qdesk.memory import MemoryEstimate

MAX_CONTEXT = 1 << 20
KV_TITLES = {"f16": "f16 (full)", "q8_0": "q8_0 (half)", "q4_0": "q4_0 (quarter)"}


def cost_text(estimate: MemoryEstimate) -> str:
    """"Needs about 312 MB of RAM: weights 98 MB, context (KV cache) 96 MB, working memory 118 MB"."""
    where = f"{format_size(estimate.ram_bytes)} of RAM"
    if estimate.vram_bytes:
        where += f" and {format_size(estimate.vram_bytes)} of GPU memory"
    return (f"Needs about {where}: weights {format_size(estimate.weights_bytes)}, context (KV cache) "
            f"{format_size(estimate.kv_bytes)}, working memory {format_size(estimate.compute_bytes)}.")


class LoadPanel(QWidget):
    applied = Signal(object)  # ModelLoadSettings: save them and reload the model with them
    unload_requested = Signal()

    def __init__(self, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.context = context
        self.setObjectName("paneLoadSettings")
        self.path: Path | None = None
        self.default_gpu_layers = 0
        self._asked = 0
        self.estimate: MemoryEstimate | None = None
        self.context_box = QSpinBox()
        self.context_box.setObjectName("loadContext")
        self.context_box.setRange(256, MAX_CONTEXT)
        self.context_box.setSingleStep(1024)
        self.context_box.setSuffix(" tokens")
        self.context_box.setToolTip("How much of the conversation the model can see at once; a longer context "
                                    "needs more memory (the KV cache).")
        self.gpu_box = QSpinBox()
        self.gpu_box.setObjectName("loadGpuLayers")
        self.gpu_box.setRange(-2, 999)
        self.gpu_box.setSpecialValueText("as in Settings")
        self.gpu_box.setToolTip("Layers on the GPU: 0 the CPU only, -1 all of them; \"as in Settings\" follows "
                                "Settings.")
        self.kv_box = QComboBox()
        self.kv_box.setObjectName("loadKvType")
        for kind in KV_CHOICES:
            self.kv_box.addItem(KV_TITLES[kind], kind)
        self.kv_box.setToolTip("The KV cache's number format: q8_0 and q4_0 fit a longer context in less memory, "
                               "at a small cost in quality.")
        self.threads_box = QSpinBox()
        self.threads_box.setObjectName("loadThreads")
        self.threads_box.setRange(0, 512)
        self.threads_box.setSpecialValueText("automatic")
        self.adapter_box = QComboBox()
        self.adapter_box.setObjectName("loadAdapter")
        self.adapter_box.setToolTip("A LoRA adapter from the library to apply on top of this pane's model (this pane "
                                    "only); convert a PEFT adapter folder with `qdesk convert` and import it.")
        self.adapter_box.addItem("None", "")
        self.adapter_scale = QDoubleSpinBox()
        self.adapter_scale.setObjectName("loadAdapterScale")
        self.adapter_scale.setRange(0.0, 4.0)
        self.adapter_scale.setSingleStep(0.1)
        self.adapter_scale.setValue(1.0)
        self.adapter_scale.setToolTip("How strongly the adapter applies: 1 as trained, 0 not at all.")
        self.cost = QLabel()
        self.cost.setObjectName("loadCost")
        self.cost.setWordWrap(True)
        self.cost.setProperty("role", "hint")
        self.apply_button = QPushButton("Apply (reloads)")
        self.apply_button.setObjectName("loadApply")
        self.unload_button = QPushButton("Unload")
        self.unload_button.setObjectName("unloadModel")
        self.unload_button.setToolTip("Free this model's memory now; it loads again when you send a prompt.")

        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        for row, (text, field) in enumerate((("Context", self.context_box), ("GPU layers", self.gpu_box),
                                             ("KV cache", self.kv_box), ("Threads", self.threads_box))):
            label = QLabel(text)
            label.setBuddy(field)
            grid.addWidget(label, row // 2, (row % 2) * 2)
            grid.addWidget(field, row // 2, (row % 2) * 2 + 1)
        for column, (text, field) in enumerate((("LoRA adapter", self.adapter_box), ("Scale", self.adapter_scale))):
            label = QLabel(text)
            label.setBuddy(field)
            grid.addWidget(label, 2, column * 2)
            grid.addWidget(field, 2, column * 2 + 1)
        grid.addWidget(self.cost, 3, 0, 1, 4)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.unload_button)
        buttons.addWidget(self.apply_button)
        grid.addLayout(buttons, 4, 0, 1, 4)

        for box in (self.context_box, self.gpu_box, self.threads_box):
            box.valueChanged.connect(self._estimate)
        self.kv_box.currentIndexChanged.connect(self._estimate)
        self.apply_button.clicked.connect(lambda: self.applied.emit(self.settings()))
        self.unload_button.clicked.connect(self.unload_requested)

    def show_model(self, path: Path | None, settings: ModelLoadSettings, default_gpu_layers: int) -> None:
        """Show `path`'s settings (None: no model) and estimate what they cost."""
        self.path, self.default_gpu_layers = path, default_gpu_layers
        for box in (self.context_box, self.gpu_box, self.kv_box, self.threads_box):
            box.blockSignals(True)
        self.context_box.setValue(settings.n_ctx)
        self.gpu_box.setValue(-2 if settings.gpu_layers is None else settings.gpu_layers)
        self.kv_box.setCurrentIndex(max(0, self.kv_box.findData(settings.kv_type)))
        self.threads_box.setValue(settings.threads)
        for box in (self.context_box, self.gpu_box, self.kv_box, self.threads_box):
            box.blockSignals(False)
        self.setEnabled(path is not None)
        self.estimate = None
        self._asked += 1
        if self.isVisible():
            self._estimate()

    def set_adapters(self, adapters: list[LibraryEntry], current: LoraChoice | None) -> None:
        """Offer the library's LoRA adapters, selecting `current` (added when the library does not list it)."""
        self.adapter_box.blockSignals(True)
        self.adapter_box.clear()
        self.adapter_box.addItem("None", "")
        for entry in adapters:
            self.adapter_box.addItem(f"{entry.base_model} ({entry.path.name})", str(entry.path))
        if current is not None and self.adapter_box.findData(str(current.path)) < 0:
            self.adapter_box.addItem(current.path.name, str(current.path))
        self.adapter_box.setCurrentIndex(max(0, self.adapter_box.findData(str(current.path) if current else "")))
        self.adapter_scale.setValue(current.scale if current is not None else 1.0)
        self.adapter_box.blockSignals(False)

    def lora(self) -> LoraChoice | None:
        """The adapter chosen for this pane, None for none."""
        data = self.adapter_box.currentData()
        return LoraChoice(Path(data), self.adapter_scale.value()) if data else None

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self.estimate is None:
            self._estimate()  # only once on show: reading a model's header is not free

    def settings(self) -> ModelLoadSettings:
        layers = self.gpu_box.value()
        return ModelLoadSettings(n_ctx=self.context_box.value(), gpu_layers=None if layers == -2 else layers,
                                 kv_type=str(self.kv_box.currentData()), threads=self.threads_box.value())

    def _estimate(self) -> None:
        """Estimate the cost in the background (the first read of a file's header can take a moment)."""
        path, settings, layers = self.path, self.settings(), self.default_gpu_layers
        self._asked += 1
        asked = self._asked
        if path is None:
            self.cost.setText("")
            return
        self.cost.setText("Estimating the memory…")

        def shown(estimate: MemoryEstimate) -> None:
            if asked == self._asked:
                self.estimate = estimate
                self.cost.setText(cost_text(estimate))

        def failed(failure: JobFailure) -> None:
            if asked == self._asked:
                self.estimate = None
                self.cost.setText(failure.sentence)

        job = Job(f"Estimating the memory of {path.name}",
                  lambda _progress, _cancel: memory_cost(path, settings, default_gpu_layers=layers), self)
        job.succeeded.connect(shown)
        job.failed.connect(failed)
        self.context.run(job)
