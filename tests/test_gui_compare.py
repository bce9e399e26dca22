"""The Compare section: panes, the prompt box's keys, conversations restored, and two real variants side by side."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from PySide6.QtCore import Qt

from qdesk.chat.conversations import Answer, PaneRecord, new_conversation
from qdesk.chat.engine import GenerationStats, SamplingOptions
from qdesk.gui.compare_prompt import PromptBox
from qdesk.gui.compare_view import MAX_PANES, MIN_PANES, CompareView
from qdesk.gui.context import AppContext
from tests.starter_prompts import CAPITAL_QUESTION, SYSTEM

LOAD_AND_ANSWER_MS = 180_000


@pytest.fixture(scope="session")
def q8_variant(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second variant of the starter model: Q8_0 made from its Q4_1 (llama.cpp allows it, with a warning)."""
    from converters.quantization.quantize import quantize

    out = tmp_path_factory.mktemp("compare-variants") / "SmolLM2-135M-Instruct-Q8_0.gguf"
    quantize(starter_gguf, out, "Q8_0", imatrix="none")
    return out


def make_view(qtbot, context: AppContext) -> CompareView:
    view = CompareView(context)
    qtbot.addWidget(view)
    return view


def test_panes_can_be_added_and_removed(qtbot, gui_context: AppContext) -> None:
    view = make_view(qtbot, gui_context)
    assert len(view.panes) == 2 and MIN_PANES == 1
    qtbot.mouseClick(view.panes[1].remove_button, Qt.MouseButton.LeftButton)  # one pane: a plain chat
    assert len(view.panes) == 1 == len(view.conversation.panes)
    assert not view.panes[0].remove_button.isEnabled()
    while view.add_button.isEnabled():
        qtbot.mouseClick(view.add_button, Qt.MouseButton.LeftButton)
    assert len(view.panes) == MAX_PANES == len(view.conversation.panes)
    assert [pane.title.text() for pane in view.panes][-1] == "<b>4</b>"
    qtbot.mouseClick(view.panes[1].remove_button, Qt.MouseButton.LeftButton)
    assert len(view.panes) == MAX_PANES - 1 == len(view.conversation.panes)
    assert view.add_button.isEnabled()

    shared = view.conversation.settings_for(0)
    own = view.panes[1]
    qtbot.mouseClick(own.own_settings, Qt.MouseButton.LeftButton)
    assert own.override.isVisibleTo(own) and own.override.temperature.value() == shared[0].temperature == 0.0
    own.override.free.setChecked(True)
    own.override.temperature.setValue(1.25)
    own.override.system.setText("Answer in French.")
    assert view.conversation.settings_for(1)[0].temperature == 1.25
    assert view.conversation.settings_for(1)[1] == "Answer in French."
    assert view.conversation.settings_for(0) == shared
    view.shared.top_p.setValue(0.5)
    assert view.conversation.settings_for(0)[0].top_p == 0.5 and view.conversation.settings_for(1)[0].top_p != 0.5


def test_a_model_that_cannot_load_fails_in_its_pane(qtbot, gui_context: AppContext, starter_gguf: Path,
                                                    tmp_path: Path) -> None:
    broken = tmp_path / "broken-Q4_K_M.gguf"
    broken.write_bytes(starter_gguf.read_bytes()[:4096])
    view = make_view(qtbot, gui_context)
    qtbot.waitUntil(lambda: view._library_job is None, timeout=30_000)
    view.bind_pane(view.panes[0], broken)
    view.bind_pane(view.panes[1], None)
    view.prompt.setPlainText("Hello")
    qtbot.mouseClick(view.send_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not view.busy, timeout=30_000)
    answer = view.conversation.turns[0].answer(0)
    assert answer is not None and "truncated" in (answer.error or "")
    pane = view.panes[0]
    assert pane.status.text() == answer.error and pane.retry_button.isVisibleTo(pane)
    assert view.conversation.turns[0].answer(1) is None  # a pane without a model is not asked


def test_first_run_binds_the_starter_and_open_in_compare_binds_panes(qtbot, gui_context: AppContext,
                                                                       starter_gguf: Path, tmp_path: Path) -> None:
    view = make_view(qtbot, gui_context)
    qtbot.waitUntil(lambda: view.panes[0].runner.path == starter_gguf, timeout=30_000)
    assert view.panes[0].model_box.currentData() == str(starter_gguf)
    assert "Q4_1" in view.panes[0].facts.text()
    assert view.panes[0].runner.model is None  # the section is not on show: nothing loads yet

    others = [tmp_path / "a-Q8_0.gguf", tmp_path / "b-Q2_K.gguf"]
    gui_context.open_in_compare.emit([starter_gguf, *others])
    assert [pane.runner.path for pane in view.panes] == [starter_gguf, *others]
    assert view.panes[2].model_box.currentText() == "b-Q2_K.gguf"
    assert [record.model for record in view.conversation.panes] == [starter_gguf, *others]


def test_prompt_box_keys(qtbot) -> None:
    box = PromptBox()
    qtbot.addWidget(box)
    qtbot.keyClicks(box, "first line")
    qtbot.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(box, "second")
    assert box.toPlainText() == "first line\nsecond"
    with qtbot.waitSignal(box.submitted, timeout=1000):
        qtbot.keyClick(box, Qt.Key.Key_Return)
    assert box.toPlainText() == "first line\nsecond"
    with qtbot.waitSignal(box.stop_requested, timeout=1000):
        qtbot.keyClick(box, Qt.Key.Key_Escape)


def test_a_saved_conversation_comes_back_in_a_new_view(qtbot, gui_context: AppContext, tmp_path: Path) -> None:
    q4, q8 = tmp_path / "m-Q4_K_M.gguf", tmp_path / "m-Q8_0.gguf"
    stats = GenerationStats(10, 4, 0.2, 30.0, 0.5, "stop", 150_000_000)
    conversation = new_conversation([q8, q4], system=SYSTEM, sampling=SamplingOptions(temperature=0.0))
    conversation.panes[1] = PaneRecord(q4, own_settings=True, sampling=SamplingOptions(temperature=0.5, seed=7))
    turn = conversation.add_turn("What is the capital of France?")
    turn.set_answer(0, Answer(q8, "Paris is the capital.", (1, 2, 3, 4), stats))
    turn.set_answer(1, Answer(q4, "Paris was the capital.", (1, 2, 5, 4), stats))

    first = make_view(qtbot, gui_context)
    first.store.save(conversation)
    first.open_conversation(conversation.id)
    state = gui_context.window_state()
    first.save_state(state)
    first.shutdown()

    second = make_view(qtbot, gui_context)
    second.restore_state(state)
    assert second.conversation.to_json() == conversation.to_json()
    assert [pane.runner.path for pane in second.panes] == [q8, q4]
    assert second.panes[1].own_settings.isChecked() and second.panes[1].override.seed.value() == 7
    assert second.shared.system.text() == SYSTEM and second.shared.temperature.value() == 0.0
    qtbot.waitUntil(lambda: "Paris was the capital." in second.panes[1].transcript.toPlainText(), timeout=5000)
    assert "differs from pane 1 after 2 tokens" in second.panes[1].facts.text()
    highlighted = second.transcript(1)[0]
    assert highlighted.text[highlighted.diverge_at:] == "was the capital."
    assert second.transcript(0)[0].diverge_at is None
    assert second.regenerate_button.isEnabled() and second.export_button.isEnabled()

    second.new_conversation()
    assert second.conversation.turns == [] and second.conversation.id != conversation.id
    assert [record.model for record in second.conversation.panes] == [q8, q4]
    assert [summary.id for summary in second.store.summaries()] == [conversation.id]
    assert second.sidebar.ids() == [conversation.id]  # the list: saved ones only, newest first
    item = second.sidebar.item_of(conversation.id)
    assert item.text() == "What is the capital of France?"
    second.sidebar.list.itemClicked.emit(item)
    assert second.conversation.id == conversation.id

    second.sidebar.search.setText("Rome")
    qtbot.waitUntil(lambda: second.sidebar.ids() == [], timeout=5000)
    second.sidebar.search.setText("paris WAS")
    qtbot.waitUntil(lambda: second.sidebar.ids() == [conversation.id], timeout=5000)
    second.sidebar.item_of(conversation.id).setText("Capitals")  # what typing a new name does (F2)
    assert second.store.load(conversation.id).title == "Capitals" and second.title.text() == "Capitals"

    box = second.delete_conversation(conversation.id)
    box.button(box.StandardButton.Yes).click()
    assert second.store.summaries() == [] and second.conversation.id != conversation.id
    assert second.conversation.turns == []


@pytest.mark.slow
def test_two_variants_answer_side_by_side(qtbot, gui_context: AppContext, starter_gguf: Path, q8_variant: Path,
                                          tmp_path: Path) -> None:
    view = make_view(qtbot, gui_context)
    gui_context.open_in_compare.emit([starter_gguf, q8_variant])
    view.shared.temperature.setValue(0.0)
    view.shared.max_tokens.setValue(24)
    view.shared.system.setText(SYSTEM)
    view.show()
    qtbot.waitUntil(lambda: all(pane.runner.model is not None for pane in view.panes), timeout=LOAD_AND_ANSWER_MS)

    qtbot.keyClicks(view.prompt, CAPITAL_QUESTION)
    qtbot.keyClick(view.prompt, Qt.Key.Key_Return)
    assert view.busy and view.stop_button.isEnabled() and not view.send_button.isEnabled()
    qtbot.waitUntil(lambda: not view.busy, timeout=LOAD_AND_ANSWER_MS)
    turn = view.conversation.turns[0]
    for index, pane in enumerate(view.panes):
        answer = turn.answer(index)
        assert answer is not None and answer.error is None and answer.stats is not None
        assert "Paris" in answer.text
        qtbot.waitUntil(lambda pane=pane, answer=answer: answer.text.strip() in pane.transcript.toPlainText(),
                        timeout=5000)
        assert "tokens/s" in pane.facts.text() and "first token" in pane.facts.text()
    assert turn.answer(0).model == starter_gguf and turn.answer(1).model == q8_variant
    qtbot.waitUntil(lambda: "Q8_0" in view.panes[1].facts.text(), timeout=10_000)  # read from a file not in the library

    # Esc stops every pane mid-answer; each keeps what it said.
    view.shared.max_tokens.setValue(2000)
    qtbot.keyClicks(view.prompt, "Tell me a long story about a dragon.")
    qtbot.keyClick(view.prompt, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: all(view._live.get(pane) for pane in view.panes), timeout=LOAD_AND_ANSWER_MS)
    qtbot.keyClick(view.prompt, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: not view.busy, timeout=30_000)
    stopped = view.conversation.turns[1]
    for index in range(2):
        answer = stopped.answer(index)
        assert answer is not None and answer.stats is not None and answer.stats.stop_reason == "cancelled"
        assert answer.text and answer.stats.generated_tokens < 2000
    assert view.regenerate_button.isEnabled()

    # Regenerate replaces the last turn's answers.
    view.shared.max_tokens.setValue(6)
    qtbot.mouseClick(view.regenerate_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not view.busy, timeout=LOAD_AND_ANSWER_MS)
    assert len(view.conversation.turns) == 2
    assert all(view.conversation.turns[1].answer(i).stats.stop_reason == "length" for i in range(2))

    state = gui_context.window_state()
    view.save_state(state)
    workers = [pane.runner.model.pid for pane in view.panes]
    view.shutdown()
    assert all(pane.runner.model is None for pane in view.panes)
    assert not any(psutil.pid_exists(pid) for pid in workers)

    restored = make_view(qtbot, gui_context)
    restored.restore_state(state)
    assert restored.conversation.to_json() == view.conversation.to_json()
    assert [pane.runner.path for pane in restored.panes] == [starter_gguf, q8_variant]

    assert restored.export_to(tmp_path / "talk.md") and restored.export_to(tmp_path / "talk.json")
    markdown = (tmp_path / "talk.md").read_text(encoding="utf-8")
    assert "## Turn 1" in markdown and "## Turn 2" in markdown and "Paris" in markdown
    assert f"### Pane 2: {q8_variant.name}" in markdown
    document = json.loads((tmp_path / "talk.json").read_text(encoding="utf-8"))
    assert [turn["prompt"] for turn in document["turns"]] == [CAPITAL_QUESTION,
                                                              "Tell me a long story about a dragon."]
    assert document["turns"][0]["answers"][1]["model"] == str(q8_variant)


def test_divergence_highlights_follow_the_theme(qtbot, gui_context: AppContext) -> None:
    from qdesk.gui.compare_pane import DARK_HIGHLIGHT, LIGHT_HIGHLIGHT, TranscriptEntry
    from qdesk.gui.theme import apply_theme

    view = make_view(qtbot, gui_context)
    pane = view.panes[1]
    apply_theme("light")
    try:
        pane.show_transcript([TranscriptEntry("Capital?", "Paris was the capital.", 6)])
        assert LIGHT_HIGHLIGHT in pane.transcript.toHtml().lower()
        apply_theme("dark")
        qtbot.waitUntil(lambda: DARK_HIGHLIGHT in pane.transcript.toHtml().lower(), timeout=5000)
        assert LIGHT_HIGHLIGHT not in pane.transcript.toHtml().lower()
    finally:
        apply_theme("light")


def test_the_prompt_keeps_the_focus_after_stop(qtbot, main_window, starter_gguf: Path) -> None:
    from PySide6.QtWidgets import QApplication

    main_window.show_section("compare")
    view = main_window.views["compare"]
    main_window.activateWindow()
    qtbot.waitUntil(lambda: view._library_job is None, timeout=30_000)
    view.bind_pane(view.panes[0], starter_gguf)
    view.bind_pane(view.panes[1], None)
    view.prompt.setFocus()
    qtbot.keyClicks(view.prompt, "Hello")
    qtbot.keyClick(view.prompt, Qt.Key.Key_Return)
    assert view.busy
    qtbot.mouseClick(view.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not view.busy, timeout=30_000)
    assert QApplication.focusWidget() is view.prompt
    qtbot.keyClicks(QApplication.focusWidget(), "next question")
    assert view.prompt.toPlainText() == "next question"


def test_compare_is_deterministic_unless_free_sampling_is_on(qtbot, gui_context: AppContext, starter_gguf: Path,
                                                             tmp_path: Path) -> None:
    """Greedy by default, so a difference between panes is the variants'; free sampling shares one seed a turn."""
    view = make_view(qtbot, gui_context)
    assert gui_context.settings.sampling.temperature > 0
    assert not view.shared.free.isChecked() and not view.shared.temperature.isEnabled()
    assert view.conversation.sampling.temperature == 0.0

    view.shared.free.setChecked(True)
    assert view.conversation.sampling.temperature == gui_context.settings.sampling.temperature
    assert view.conversation.sampling.seed == 0 and view.shared.seed.text() == "0 (random)"
    broken = tmp_path / "broken-Q4_K_M.gguf"
    broken.write_bytes(starter_gguf.read_bytes()[:4096])
    qtbot.waitUntil(lambda: view._library_job is None, timeout=30_000)
    view.bind_pane(view.panes[0], broken)
    view.bind_pane(view.panes[1], broken)
    view.prompt.setPlainText("Hello")
    view.send()
    qtbot.waitUntil(lambda: not view.busy, timeout=30_000)
    seeds = {view.conversation.turns[0].answer(index).sampling.seed for index in range(2)}
    assert len(seeds) == 1 and seeds != {0}  # one random seed, the same in both panes, kept with the answers

    view.shared.free.setChecked(False)
    assert view.conversation.sampling.temperature == 0.0


def test_pane_headers_stay_one_line_so_transcripts_line_up(qtbot, gui_context: AppContext, tmp_path: Path) -> None:
    view = make_view(qtbot, gui_context)
    view.resize(1024, 600)
    view.show()
    qtbot.waitExposed(view)
    qtbot.waitUntil(lambda: view._library_job is None, timeout=30_000)
    long_name = tmp_path / ("a-very-long-model-file-name-that-will-not-fit-in-a-narrow-pane-" * 2 + "Q4_K_M.gguf")
    view.bind_pane(view.panes[0], tmp_path / "short-Q8_0.gguf")
    view.bind_pane(view.panes[1], long_name)
    view.panes[1].facts.setText("Q4_K_M · 105 MB · 48.1 tokens/s · first token 0.21 s · memory 230 MB · differs "
                                "from the first pane at word 5 · and a few more words to overflow the pane " * 2)
    qtbot.wait(50)
    tops = [pane.transcript.mapTo(view, pane.transcript.rect().topLeft()).y() for pane in view.panes]
    assert tops[0] == tops[1]
    assert view.panes[1].facts.is_elided() and "overflow" in view.panes[1].facts.toolTip()


def test_load_settings_show_their_cost_apply_and_unload(qtbot, gui_context: AppContext, starter_gguf: Path) -> None:
    view = make_view(qtbot, gui_context)
    view.show()  # the model loads as the section is shown, and the panel estimates once it is on show
    qtbot.waitUntil(lambda: view.panes[0].runner.path == starter_gguf, timeout=30_000)
    pane = view.panes[0]
    panel = pane.load_panel
    assert panel.estimate is None  # hidden: nothing estimated yet
    qtbot.mouseClick(pane.load_settings, Qt.MouseButton.LeftButton)
    assert panel.isVisibleTo(pane)
    qtbot.waitUntil(lambda: panel.estimate is not None, timeout=30_000)
    first = panel.estimate
    assert panel.cost.text().startswith("Needs about ") and "KV cache" in panel.cost.text()
    panel.context_box.setValue(8192)
    qtbot.waitUntil(lambda: panel.estimate is not None and panel.estimate.kv_bytes == 2 * first.kv_bytes,
                    timeout=30_000)

    qtbot.waitUntil(lambda: pane.runner.model is not None, timeout=LOAD_AND_ANSWER_MS)
    worker = pane.runner.model.pid
    qtbot.mouseClick(panel.apply_button, Qt.MouseButton.LeftButton)  # saved for the file, and reloaded with it
    assert view.load_store.get(starter_gguf).n_ctx == 8192
    qtbot.waitUntil(lambda: pane.runner.model is not None and pane.runner.model.n_ctx >= 8192,
                    timeout=LOAD_AND_ANSWER_MS)
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE

    qtbot.mouseClick(panel.unload_button, Qt.MouseButton.LeftButton)
    assert pane.runner.model is None and pane.status.text().startswith("Unloaded")
    view.activated()  # showing the section again does not load it back
    assert pane.runner.model is None and not pane.runner.loading
    view.shutdown()


def test_answers_render_as_markdown_and_turns_can_be_copied_edited_deleted_regenerated(
        qtbot, gui_context: AppContext, starter_gguf: Path, tmp_path: Path) -> None:
    from PySide6.QtCore import QUrl
    from PySide6.QtWidgets import QApplication

    broken = tmp_path / "broken-Q4_K_M.gguf"
    broken.write_bytes(starter_gguf.read_bytes()[:4096])
    q8 = tmp_path / "m-Q8_0.gguf"
    conversation = new_conversation([broken, q8])
    for number, prompt in enumerate(("Show code", "Thanks", "Bye")):
        turn = conversation.add_turn(prompt)
        turn.set_answer(0, Answer(broken, f"Here:\n\n```python\nprint({number})\n```\n**done**"))
        turn.set_answer(1, Answer(q8, f"answer {number}"))
    view = make_view(qtbot, gui_context)
    qtbot.waitUntil(lambda: view._library_job is None, timeout=30_000)
    view.store.save(conversation)
    view.open_conversation(conversation.id)
    view._render()
    pane = view.panes[0]
    assert "print(0)" in pane.transcript.toPlainText() and "```" not in pane.transcript.toPlainText()
    assert pane.code_blocks == ("print(0)\n", "print(1)\n", "print(2)\n")
    pane.transcript.anchorClicked.emit(QUrl("copy-code:1"))
    assert QApplication.clipboard().text() == "print(1)\n"
    pane.transcript.anchorClicked.emit(QUrl("copy-answer:2"))
    assert QApplication.clipboard().text().startswith("Here:") and "print(2)" in QApplication.clipboard().text()

    pane.transcript.anchorClicked.emit(QUrl("delete:1"))
    assert [turn.prompt for turn in view.conversation.turns] == ["Show code", "Bye"]
    assert [turn.prompt for turn in view.store.load(conversation.id).turns] == ["Show code", "Bye"]

    view.panes[1].transcript.anchorClicked.emit(QUrl("regenerate:0"))  # pane 2 alone asks turn 1 again
    qtbot.waitUntil(lambda: not view.busy, timeout=30_000)
    assert view.conversation.turns[0].answer(0).text.startswith("Here:")  # pane 1's answer is untouched
    assert view.conversation.turns[0].answer(1).error  # q8 is no file: the new answer failed, in its place

    pane.transcript.anchorClicked.emit(QUrl("edit:0"))
    assert view.prompt.toPlainText() == "Show code" and "Editing prompt 1" in view.notice.text()
    view.prompt.setPlainText("Show more code")
    view.bind_pane(view.panes[1], None)
    view.send()
    qtbot.waitUntil(lambda: not view.busy, timeout=30_000)
    assert [turn.prompt for turn in view.conversation.turns] == ["Show more code"]


def test_a_streaming_answer_redraws_only_the_last_turn(qtbot, gui_context: AppContext) -> None:
    from qdesk.gui.compare_pane import TranscriptEntry

    view = make_view(qtbot, gui_context)
    pane = view.panes[0]
    done = TranscriptEntry("First?", "```python\nprint(1)\n```", turn=0)
    pane.show_transcript([done, TranscriptEntry("Second?", "Par", streaming=True, turn=1)])
    start = pane._tail_start
    for text in ("Paris is", "Paris is the capital.\n\n```sh\necho hi\n```"):
        pane.show_transcript([done, TranscriptEntry("Second?", text, streaming=True, turn=1)])
        assert pane._tail_start == start  # the first turn was not drawn again
    pane.show_transcript([done, TranscriptEntry("Second?", "Paris is the capital.\n\n```sh\necho hi\n```", turn=1)])
    shown = pane.transcript.toPlainText()
    assert shown.count("First?") == 1 and shown.count("Second?") == 1 and "Paris is the capital." in shown
    assert "▍" not in shown and pane.code_blocks == ("print(1)\n", "echo hi\n")
    third = TranscriptEntry("Third?", "Rome", streaming=True, turn=2)
    finished = TranscriptEntry("Second?", "Paris is the capital.\n\n```sh\necho hi\n```", turn=1)
    pane.show_transcript([done, finished, third])  # the second answer joins the kept turns, drawn once more
    shown = pane.transcript.toPlainText()
    assert [shown.count(prompt) for prompt in ("First?", "Second?", "Third?")] == [1, 1, 1]
    assert shown.index("First?") < shown.index("Second?") < shown.index("Third?") and pane._tail_start > start
    pane.show_transcript([done])  # a turn deleted: the head changed, all is drawn afresh
    assert "Second?" not in pane.transcript.toPlainText() and pane.code_blocks == ("print(1)\n",)
