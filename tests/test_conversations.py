"""Compare conversations: per-pane histories, storage, divergence while streaming, Markdown and JSON exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qdesk.chat.conversations import (
    Answer,
    Conversation,
    ConversationError,
    ConversationStore,
    PaneRecord,
    conversation_json,
    conversation_markdown,
    diverging_offset,
    export_conversation,
    new_conversation,
)
from qdesk.chat.engine import GenerationStats, SamplingOptions

Q4 = Path("/models/SmolLM2-Q4_K_M.gguf")
Q8 = Path("/models/SmolLM2-Q8_0.gguf")


def stats(tokens: int, reason: str = "stop") -> GenerationStats:
    return GenerationStats(12, tokens, 0.25, 40.0, 1.0, reason, 200_000_000)


def two_turns() -> Conversation:
    conversation = new_conversation([Q8, Q4], system="Be brief.", sampling=SamplingOptions(temperature=0.0))
    first = conversation.add_turn("What is the capital of France?")
    first.set_answer(0, Answer(Q8, "Paris is the capital.", (1, 2, 3, 4), stats(4)))
    first.set_answer(1, Answer(Q4, "Paris was the capital.", (1, 2, 7, 4), stats(4)))
    second = conversation.add_turn("And of Italy?")
    second.set_answer(0, Answer(Q8, "Rome.", (9,), stats(1)))
    second.set_answer(1, Answer(Q4, "", (), None, error="the worker stopped unexpectedly"))
    return conversation


def test_each_pane_keeps_its_own_history() -> None:
    conversation = two_turns()
    assert conversation.title == "What is the capital of France?"
    assert conversation.messages(1) == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris was the capital."},
    ]  # the failed second answer leaves its turn out of pane 2's history
    assert [m["content"] for m in conversation.messages(0, turns=1)] == ["What is the capital of France?",
                                                                          "Paris is the capital."]
    conversation.panes[1] = PaneRecord(Q4, own_settings=True, sampling=SamplingOptions(temperature=0.9), system="")
    assert conversation.settings_for(1) == (SamplingOptions(temperature=0.9), "")
    assert conversation.settings_for(0) == (SamplingOptions(temperature=0.0), "Be brief.")

    conversation.add_pane()
    assert len(conversation.panes) == 3 and conversation.turns[0].answer(2) is None
    assert conversation.messages(2) == []
    conversation.remove_pane(0)
    assert conversation.turns[0].answer(0).text == "Paris was the capital."


def test_answers_diverge_where_their_tokens_part() -> None:
    conversation = two_turns()
    divergence = conversation.turns[0].divergence(1)
    assert divergence is not None and divergence.token_index == 2
    assert divergence.common_text == "Paris " and divergence.this_continues == "was the capital."
    assert conversation.turns[0].divergence(0) is None
    assert conversation.turns[1].divergence(1) is None  # a failed answer is not compared


def test_diverging_offset_while_streaming() -> None:
    assert diverging_offset("Paris is", "Paris was", reference_done=False, done=False) == 6
    assert diverging_offset("Paris is big", "Paris", reference_done=False, done=False) is None  # behind, not apart
    assert diverging_offset("Paris", "Paris is big", reference_done=False, done=False) is None  # ahead of it
    assert diverging_offset("Paris", "Paris is big", reference_done=True, done=False) == 5  # the reference ended
    assert diverging_offset("Paris.", "Paris.") is None
    assert diverging_offset("Paris is big", "Paris") == 5  # ended early: nothing of its own to highlight


def test_conversations_are_stored_and_listed(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "conversations")
    assert store.summaries() == []
    first = two_turns()
    store.save(first)
    again = store.load(first.id)
    assert again.to_json() == first.to_json()
    assert again.turns[0].answers[1].stats == stats(4)

    second = new_conversation([Q4, None])
    second.add_turn("Hello")
    second.updated = "9999-01-01T00:00:00+00:00"
    store.save(second)
    (store.folder / "damaged.json").write_text("{not json", encoding="utf-8")
    summaries = store.summaries()
    assert [summary.id for summary in summaries] == [second.id, first.id]
    assert summaries[1].turns == 2 and summaries[1].models == (Q8.name, Q4.name)
    assert not list(store.folder.glob(".*"))  # no temporary file left behind

    with pytest.raises(ConversationError, match="damaged"):
        store.load("damaged")
    with pytest.raises(ConversationError, match="gone"):
        store.load("never-saved")
    with pytest.raises(ConversationError, match="not a conversation name"):
        store.load("../settings")
    store.delete(first.id)
    assert [summary.id for summary in store.summaries()] == [second.id]


def test_markdown_export() -> None:
    text = conversation_markdown(two_turns(), {Q8: "SmolLM2 (Q8_0)"})
    assert text.startswith("# What is the capital of France?\n")
    assert "System prompt: Be brief." in text
    assert "- Pane 1: SmolLM2 (Q8_0)" in text and f"- Pane 2: {Q4.name}" in text
    assert "## Turn 1" in text and "> What is the capital of France?" in text
    assert "### Pane 1: SmolLM2 (Q8_0)\n\nParis is the capital." in text
    assert "differs from pane 1 from token 2 on" in text
    assert "40.0 tokens/s" in text and "first token after 0.25 s" in text and "memory 200 MB" in text
    assert "failed: the worker stopped unexpectedly" in text
    assert "## Turn 2" in text and "Rome." in text


def test_json_export_and_files(tmp_path: Path) -> None:
    conversation = two_turns()
    document = conversation_json(conversation)
    first_turn = document["turns"][0]
    assert first_turn["prompt"] == "What is the capital of France?"
    assert first_turn["answers"][1]["divergence"]["token_index"] == 2
    assert "divergence" not in first_turn["answers"][0]
    assert first_turn["answers"][0]["stats"]["tokens_per_second"] == 40.0
    assert document["panes"][1]["model"] == str(Q4) and document["sampling"]["temperature"] == 0.0

    exported = export_conversation(conversation, tmp_path / "talk.json")
    assert json.loads(exported.read_text(encoding="utf-8")) == document
    markdown = export_conversation(conversation, tmp_path / "talk.md")
    assert markdown.read_text(encoding="utf-8") == conversation_markdown(conversation)
    with pytest.raises(ConversationError, match=r"\.md or \.json"):
        export_conversation(conversation, tmp_path / "talk.txt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["talk.json", "talk.md"]


def test_unknown_or_newer_documents_are_refused() -> None:
    with pytest.raises(ValueError):
        Conversation.from_json({"format": 99, "id": "x"})
    with pytest.raises(KeyError):
        Conversation.from_json({"format": 1})


def test_a_turn_is_edited_or_deleted() -> None:
    conversation = new_conversation([Path("a.gguf"), Path("b.gguf")])
    for prompt in ("one", "two", "three"):
        turn = conversation.add_turn(prompt)
        turn.set_answer(0, Answer(Path("a.gguf"), f"answer to {prompt}"))
    conversation.delete_turn(1)
    assert [turn.prompt for turn in conversation.turns] == ["one", "three"]
    edited = conversation.edit_turn(0, "uno")
    assert [turn.prompt for turn in conversation.turns] == ["uno"] and edited.answers == [None, None]
    assert conversation.messages(0) == []


def test_conversations_are_renamed_and_searched(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    france = new_conversation([Path("m-Q4_K_M.gguf")])
    france.add_turn("What is the capital of France?").set_answer(0, Answer(Path("m-Q4_K_M.gguf"), "Paris."))
    code = new_conversation([Path("m-Q8_0.gguf")])
    code.add_turn("Write a loop in Python")
    store.save(france)
    store.save(code)
    assert [summary.id for summary in store.summaries("paris")] == [france.id]
    assert [summary.id for summary in store.summaries("Q8_0")] == [code.id]
    assert {summary.id for summary in store.summaries()} == {france.id, code.id}
    assert store.rename(france.id, "  Capitals  ").title == "Capitals"
    assert [summary.title for summary in store.summaries("capitals")] == ["Capitals"]
    assert store.rename(france.id, "").title == "What is the capital of France?"
