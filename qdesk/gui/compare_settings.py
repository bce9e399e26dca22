"""The sampling settings a Compare conversation uses: system prompt, free sampling or not (deterministic by default),
temperature, top-p, max tokens and seed."""

from __future__ import annotations

from dataclasses import replace

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from qdesk.chat.compare import SEED_LIMIT
from qdesk.chat.engine import SamplingOptions

MAX_TOKENS_LIMIT = 32_768
FREE_SAMPLING_TIP = ("Off: every pane answers deterministically (temperature 0), so where two answers differ, the "
                     "variants differ, not the dice. On: sample with this temperature, top-p and seed; every pane "
                     "uses the same seed in a turn.")


class SamplingEditor(QWidget):
    """One row of fields; `changed` fires on every edit. Top-k and the repeat penalty come from the settings."""

    changed = Signal()

    def __init__(self, prefix: str = "", *, mnemonics: bool = True, stacked: bool = False,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._base = SamplingOptions()
        self._quiet = False
        self._free_temperature = SamplingOptions().temperature
        self.free = QCheckBox("Free sampling" if not mnemonics else "&Free sampling")
        self.free.setObjectName(f"{prefix}freeSampling")
        self.free.setToolTip(FREE_SAMPLING_TIP)
        self.system = QLineEdit()
        self.system.setObjectName(f"{prefix}systemPrompt")
        self.system.setPlaceholderText("System prompt (none)")
        self.system.setClearButtonEnabled(True)
        self.temperature = QDoubleSpinBox()
        self.temperature.setObjectName(f"{prefix}temperature")
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.05)
        self.temperature.setDecimals(2)
        self.temperature.setToolTip("0 always picks the likeliest token (greedy); higher values vary more.")
        self.top_p = QDoubleSpinBox()
        self.top_p.setObjectName(f"{prefix}topP")
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setDecimals(2)
        self.max_tokens = QSpinBox()
        self.max_tokens.setObjectName(f"{prefix}maxTokens")
        self.max_tokens.setRange(1, MAX_TOKENS_LIMIT)
        self.max_tokens.setSingleStep(64)
        self.seed = QSpinBox()
        self.seed.setObjectName(f"{prefix}seed")
        self.seed.setRange(0, SEED_LIMIT)
        self.seed.setToolTip("0: a new random seed each turn, shared by every pane. The same seed and settings give "
                             "the same answer.")
        self.seed.setSpecialValueText("0 (random)")

        fields = (("&Temp", self.temperature), ("Top-&p", self.top_p), ("&Max tokens", self.max_tokens),
                  ("S&eed", self.seed))
        column = QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        if stacked:  # a narrow pane: the system prompt and the switch, then two fields a line
            top = QHBoxLayout()
            top.addWidget(self.system, 1)
            top.addWidget(self.free)
            column.addLayout(top)
            rows = [QHBoxLayout(), QHBoxLayout()]
        else:
            rows = [QHBoxLayout()]
            rows[0].addWidget(self.system, 3)
            rows[0].addWidget(self.free)
        for row in rows:
            column.addLayout(row)
        for number, (text, field) in enumerate(fields):
            label = QLabel(text if mnemonics else text.replace("&", ""))
            label.setBuddy(field)
            label.setMinimumWidth(label.fontMetrics().horizontalAdvance(text.replace("&", "")) + 6)
            row = rows[number * len(rows) // len(fields)]
            row.addWidget(label)
            row.addWidget(field, 1 if stacked else 0)
        self.system.textChanged.connect(self._edited)
        for spin in (self.temperature, self.top_p, self.max_tokens, self.seed):
            spin.valueChanged.connect(self._edited)
        self.free.toggled.connect(self._free_toggled)
        self.set_values(SamplingOptions(), "")

    @property
    def free_sampling(self) -> bool:
        return self.free.isChecked()

    def set_free_temperature(self, temperature: float) -> None:
        """The temperature "Free sampling" starts from (the Settings default)."""
        if temperature > 0:
            self._free_temperature = temperature
            if not self.free.isChecked():
                return
            self._quiet, quiet = True, self._quiet
            try:
                self.temperature.setValue(temperature)
            finally:
                self._quiet = quiet

    def _free_toggled(self, free: bool) -> None:
        quiet, self._quiet = self._quiet, True
        try:
            if free:
                self.temperature.setValue(self._free_temperature)
            elif self.temperature.value() > 0:
                self._free_temperature = self.temperature.value()
            self._show_free(free)
        finally:
            self._quiet = quiet
        self._edited()

    def _show_free(self, free: bool) -> None:
        if not free:
            self.temperature.setValue(0.0)
        for field in (self.temperature, self.top_p, self.seed):
            field.setEnabled(free)

    def set_values(self, sampling: SamplingOptions, system: str) -> None:
        """Show `sampling` and `system` without firing `changed`."""
        self._quiet = True
        try:
            self._base = sampling
            self.system.setText(system)
            free = sampling.temperature > 0
            if free:
                self._free_temperature = sampling.temperature
            self.free.setChecked(free)
            self.temperature.setValue(sampling.temperature)
            self._show_free(free)
            self.top_p.setValue(sampling.top_p)
            self.max_tokens.setValue(min(sampling.max_tokens, MAX_TOKENS_LIMIT))
            self.seed.setValue(min(max(sampling.seed, 0), SEED_LIMIT))
        finally:
            self._quiet = False

    def sampling(self) -> SamplingOptions:
        temperature = round(self.temperature.value(), 2) if self.free.isChecked() else 0.0
        return replace(self._base, temperature=temperature, top_p=round(self.top_p.value(), 2),
                       max_tokens=self.max_tokens.value(), seed=self.seed.value())

    def fields(self) -> list[QWidget]:
        """The editable fields in tab order."""
        return [self.system, self.free, self.temperature, self.top_p, self.max_tokens, self.seed]

    def system_prompt(self) -> str:
        return self.system.text().strip()

    def _edited(self) -> None:
        if not self._quiet:
            self.changed.emit()
