"""Aligned text tables for the terminal: the one helper every `render_*` of the CLI uses."""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["text_table"]

COLUMN_GAP = "  "


def text_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], *, right: Collection[int] = (),
               rule: bool = False, indent: str = "") -> list[str]:
    """The lines of a table: columns two spaces apart, those in `right` right-aligned and the others left-aligned.

    `header` (None for none) comes first, with a dashed rule under it when `rule`; every line starts with
    `indent` and has no trailing spaces. Columns are as wide as their widest cell, header included.
    """
    everything = [tuple(header), *map(tuple, rows)] if header is not None else [tuple(row) for row in rows]
    if not everything:
        return []
    widths = [max(len(row[column]) for row in everything if column < len(row))
              for column in range(max(len(row) for row in everything))]

    def line(cells: Sequence[str]) -> str:
        padded = (cell.rjust(widths[column]) if column in right else cell.ljust(widths[column])
                  for column, cell in enumerate(cells))
        return (indent + COLUMN_GAP.join(padded)).rstrip()

    lines = [line(row) for row in everything]
    if header is not None and rule:
        lines.insert(1, line(["-" * width for width in widths]))
    return lines
