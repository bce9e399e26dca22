"""An answer as the chat shows it: Markdown rendered to HTML, code blocks highlighted, the diverging part marked.

`render_answer(text, diverge_at=…, dark=…)` parses `text` as CommonMark with tables and strikethrough (markdown-it-py;
raw HTML in an answer is shown as text, never run), colours each fenced code block with Pygments (inline styles,
which Qt's rich text understands; an answer still streaming may skip the colours), gives each block a "Copy code"
link (`copy-code:<n>`) and returns the blocks' plain code for the copying. Where an answer leaves the first pane's
(`diverge_at`, an offset into the raw text), every piece of text from there on is highlighted: a private-use
character marks the offset before parsing, and the HTML's text after the mark is wrapped in highlight spans, so the
highlight survives paragraphs, lists and code.
"""

from __future__ import annotations

import functools
import html
import re
from dataclasses import dataclass

__all__ = ["CODE_LINK", "RenderedAnswer", "render_answer"]

CODE_LINK = "copy-code:"
_MARK = "\ue000"
_TAG_OR_TEXT = re.compile(r"(<[^>]*>)")
_LIGHT_STYLE, _DARK_STYLE = "default", "monokai"
_CODE_BACKGROUND = {False: "#f3f3f3", True: "#272822"}


@dataclass(frozen=True)
class RenderedAnswer:
    html: str
    code_blocks: tuple[str, ...]
    """The plain text of each fenced or indented code block, in order (what "Copy code" copies)."""


def _parser():  # type: ignore[no-untyped-def]
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(["table", "strikethrough"])


@functools.lru_cache(maxsize=64)
def _lexer(language: str):  # type: ignore[no-untyped-def]
    """Pygments' lexer for a fence's language (plain text when it knows none): finding one is slow, so once."""
    from pygments.lexers import TextLexer, get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        return get_lexer_by_name(language) if language else TextLexer()
    except ClassNotFound:
        return TextLexer()


@functools.lru_cache(maxsize=2)
def _formatter(dark: bool):  # type: ignore[no-untyped-def]
    from pygments.formatters import HtmlFormatter

    return HtmlFormatter(nowrap=True, noclasses=True, style=_DARK_STYLE if dark else _LIGHT_STYLE)


@functools.lru_cache(maxsize=256)
def _highlighted(code: str, language: str, dark: bool) -> str:
    from pygments import highlight

    return highlight(code, _lexer(language), _formatter(dark))


@functools.lru_cache(maxsize=512)
def render_answer(text: str, *, diverge_at: int | None = None, highlight: str = "#ffe58f", dark: bool = False,
                  block_offset: int = 0, colour_code: bool = True) -> RenderedAnswer:
    """`text` as HTML (see the module's notes); code links count from `block_offset` (several answers in one page).
    `colour_code=False` leaves code plain: cheaper for an answer still streaming, redrawn many times a second."""
    marked = text if diverge_at is None or diverge_at >= len(text) else text[:diverge_at] + _MARK + text[diverge_at:]
    parser = _parser()
    tokens = parser.parse(marked)
    blocks: list[str] = []
    for token in tokens:
        if token.type not in ("fence", "code_block"):
            continue
        code = token.content
        language = token.info.split()[0] if token.type == "fence" and token.info.strip() else ""
        number = block_offset + len(blocks)
        plain = code.replace(_MARK, "")
        blocks.append(plain)
        body = _highlighted(plain, language, dark) if colour_code else html.escape(plain)
        if _MARK in code:  # coloured without the mark (a lexer could call it an error), then marked again
            body = _insert_mark(body, code.index(_MARK))
        token.type = "html_block"
        token.content = (f'<p style="margin: 6px 0 0 0;"><a href="{CODE_LINK}{number}">Copy code</a>'
                         f'{" · " + html.escape(language) if language else ""}</p>'
                         f'<pre style="background-color: {_CODE_BACKGROUND[dark]}; padding: 6px; margin-top: 2px;">'
                         f"{body}</pre>\n")
    parser.options["html"] = True  # only the blocks made above are HTML; the answer's own HTML was parsed as text
    rendered = parser.renderer.render(tokens, parser.options, {})
    if _MARK in rendered:
        rendered = _highlight_after_mark(rendered, highlight, dark)
    return RenderedAnswer(rendered, tuple(blocks))


_CHARACTER = re.compile(r"&[#\w]+;|.", re.DOTALL)


def _insert_mark(highlighted: str, offset: int) -> str:
    """Put the mark before the `offset`-th character of the text of `highlighted` (HTML, entities one character)."""
    pieces = _TAG_OR_TEXT.split(highlighted)
    seen = 0
    for index, piece in enumerate(pieces):
        if not piece or piece.startswith("<"):
            continue
        characters = _CHARACTER.findall(piece)
        if seen + len(characters) > offset:
            cut = offset - seen
            pieces[index] = "".join(characters[:cut]) + _MARK + "".join(characters[cut:])
            return "".join(pieces)
        seen += len(characters)
    return highlighted + _MARK


def _highlight_after_mark(rendered: str, colour: str, dark: bool) -> str:
    text_colour = "#ffffff" if dark else "#000000"
    pieces = _TAG_OR_TEXT.split(rendered)
    seen = False
    for index, piece in enumerate(pieces):
        if not piece or piece.startswith("<"):
            continue
        if not seen and _MARK in piece:
            before, after = piece.split(_MARK, 1)
            seen = True
            pieces[index] = before + _span(after, colour, text_colour)
        elif seen:
            pieces[index] = _span(piece.replace(_MARK, ""), colour, text_colour)
    return "".join(pieces)


def _span(text: str, colour: str, text_colour: str) -> str:
    if not text.strip():
        return text
    return f'<span style="background-color: {colour}; color: {text_colour};">{text}</span>'
