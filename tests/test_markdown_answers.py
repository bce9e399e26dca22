"""Answers rendered as Markdown: code blocks highlighted and copyable, raw HTML kept as text, divergence marked."""

from __future__ import annotations

from qdesk.chat.markdown import CODE_LINK, render_answer

ANSWER = "The **capital** is Paris.\n\n```python\nprint('Paris' < 'Rome')\n```\n\nAnd <script>x</script> is text."


def test_markdown_and_code_blocks() -> None:
    rendered = render_answer(ANSWER)
    assert "<strong>capital</strong>" in rendered.html
    assert rendered.code_blocks == ("print('Paris' < 'Rome')\n",)
    assert f'href="{CODE_LINK}0"' in rendered.html and "<pre" in rendered.html
    assert 'style="color' in rendered.html  # Pygments' colours, inline
    assert "<script>" not in rendered.html and "&lt;script&gt;" in rendered.html
    assert render_answer(ANSWER, block_offset=3).code_blocks == rendered.code_blocks
    assert f'href="{CODE_LINK}3"' in render_answer(ANSWER, block_offset=3).html


def test_the_diverging_part_is_highlighted_across_blocks() -> None:
    offset = ANSWER.index("Paris.")
    rendered = render_answer(ANSWER, diverge_at=offset, highlight="#abcdef")
    before = rendered.html.split("#abcdef", 1)[0]
    assert "Paris" not in before and "The " in before
    assert rendered.html.count("#abcdef") >= 3  # the paragraph, the code and the last paragraph
    assert "\ue000" not in rendered.html and rendered.code_blocks == ("print('Paris' < 'Rome')\n",)
    inside_code = render_answer(ANSWER, diverge_at=ANSWER.index("'Rome'"), highlight="#abcdef")
    before_code_mark = inside_code.html.split("#abcdef", 1)[0]
    assert "print" in before_code_mark and "Rome" not in before_code_mark
    assert render_answer(ANSWER, diverge_at=len(ANSWER)).html == render_answer(ANSWER).html
