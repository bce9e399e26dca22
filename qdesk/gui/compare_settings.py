"""The sampling settings a Compare conversation uses: system prompt, temperature, top-p, max tokens and seed."""

from __future__ import annotations

from dataclasses import replace

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QDoubleSpinBox, QHBoxLayout, QLabel, QLineEdit, QSpinBox, QVBoxLayout, QWidget

from qdesk.chat.engine import SamplingOptions

MAX_TOKENS_LIMIT = 32_768
SEED_LIMIT = 2**31 - 1


class SamplingEditor(QWidget):
    """One row of fields; `changed` fires on every edit. Top-k and the repeat penalty come from the settings."""

    changed = Signal()

    def __init__(self, prefix: str = "", *, mnemonics: bool = True, stacked: bool = False,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._base = SamplingOptions()
        self._quiet = False
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
        self.seed.setToolTip("The same seed and settings give the same answer.")

        fields = (("&Temp", self.temperature), ("Top-&p", self.top_p), ("&Max tokens", self.max_tokens),
                  ("S&eed", self.seed))
        column = QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        if stacked:  # a narrow pane: the system prompt, then two fields a line
            column.addWidget(self.system)
            rows = [QHBoxLayout(), QHBoxLayout()]
        else:
            rows = [QHBoxLayout()]
            rows[0].addWidget(self.system, 3)
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
        self.set_values(SamplingOptions(), "")

    def set_values(self, sampling: SamplingOptions, system: str) -> None:
        """Show `sampling` and `system` without firing `changed`."""
        self._quiet = True
        try:
            self._base = sampling
            self.system.setText(system)
            self.temperature.setValue(sampling.temperature)
            self.top_p.setValue(sampling.top_p)
            self.max_tokens.setValue(min(sampling.max_tokens, MAX_TOKENS_LIMIT))
            self.seed.setValue(min(max(sampling.seed, 0), SEED_LIMIT))
        finally:
            self._quiet = False

    def sampling(self) -> SamplingOptions:
        return replace(self._base, temperature=round(self.temperature.value(), 2), top_p=round(self.top_p.value(), 2),
                       max_tokens=self.max_tokens.value(), seed=self.seed.value())

    def fields(self) -> list[QWidget]:
        """The editable fields in tab order."""
        return [self.system, self.temperature, self.top_p, self.max_tokens, self.seed]

    def system_prompt(self) -> str:
        return self.system.text().strip()

    def _edited(self) -> None:
        if not self._quiet:
            self.changed.emit()
