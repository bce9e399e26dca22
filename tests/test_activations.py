"""Activation statistics from llama.cpp's eval callback, checked against transformers and against the GGUF itself."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from native.activations import CollectedStats, ModelEvaluator, collect_activation_stats, weight_name
from native.errors import EvaluationFailed, Stopped

VARIED_TEXT = """\
The lighthouse keeper wrote in her log every evening at seven. On calm nights the entries were short: wind from
the west, sea slight, lamp lit at dusk. During the storm of 1987 she filled four pages, describing how the waves
broke over the gallery rail and how the telegraph line to the mainland went silent a little after midnight.

"Are you sure the ferry runs on Sundays?" asked Tomas, folding the timetable into his coat pocket.
"Only in summer," his sister replied. "After September you have to take the 6:45 bus and change at Harwick."

To bake a simple loaf, mix 500 g of flour, 10 g of salt, 7 g of dried yeast and 350 ml of warm water. Knead for
ten minutes, let the dough rise for an hour, shape it, and bake at 220 degrees Celsius for about 35 minutes.

Photosynthesis converts light energy into chemical energy. Chlorophyll absorbs mostly red and blue light, which
is why leaves look green. The overall reaction combines six molecules of carbon dioxide and six of water into
one molecule of glucose and six of oxygen.

Quarterly revenue rose 12% to $4.3 billion, driven by subscriptions in Europe and Asia, while operating costs
fell slightly. The board approved a dividend of 18 cents per share, payable on March 3 to holders of record.

In 1492 the fleet left Palos with three ships; the voyage across the Atlantic took a little over two months.
Historians still argue about the exact island where the crews first went ashore.
"""

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
CHUNK = 128
N_CHUNKS = 2


def _gguf_name(hf_name: str) -> str:
    layer, _, module = hf_name.partition(".")
    return f"blk.{layer}.{HF_TO_GGUF[module]}.weight"


def _chunks(evaluator: ModelEvaluator, text: str, size: int, count: int) -> list[list[int]]:
    """`count` chunks of `size` token ids, each led by what the model's tokenizer adds in front (BOS or nothing)."""
    prefix = evaluator.tokenize("", add_special=True)
    body = evaluator.tokenize(text, add_special=False)
    step = size - len(prefix)
    while len(body) < step * count:
        body = body + body
    return [prefix + body[i * step : (i + 1) * step] for i in range(count)]


def _transformers_stats(checkpoint: Path, chunks: list[list[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Sum of squared inputs per column of every decoder-layer Linear, each chunk run from position 0."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def recorder(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            rows = inputs[0].detach().to(torch.float64).reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (rows**2).sum(dim=0).numpy()
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return record

    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(recorder(name))
    with torch.no_grad():
        for chunk in chunks:
            model(torch.tensor([chunk]))
    return sums, counts


@pytest.mark.slow
def test_statistics_match_transformers(smollm2_f16: Path, smollm2_hf: Path) -> None:
    with ModelEvaluator(smollm2_f16, n_ctx=CHUNK) as evaluator:
        chunks = _chunks(evaluator, VARIED_TEXT, CHUNK, N_CHUNKS)
        for chunk in chunks:
            evaluator.evaluate_chunk(chunk)
        ours = evaluator.stats()
    theirs, their_counts = _transformers_stats(smollm2_hf, chunks)

    assert (ours.chunks, ours.tokens, ours.chunk_size) == (N_CHUNKS, N_CHUNKS * CHUNK, CHUNK)
    assert set(ours.matrices) == {_gguf_name(name) for name in theirs}
    correlations = {}
    for hf_name, their_sums in theirs.items():
        stats = ours.matrices[_gguf_name(hf_name)]
        assert stats.sums.dtype == np.float64 and stats.counts.dtype == np.int64
        assert stats.counts.tolist() == [their_counts[hf_name]] == [N_CHUNKS * CHUNK]
        correlations[hf_name] = np.corrcoef(stats.sums[0] / stats.counts[0], their_sums / their_counts[hf_name])[0, 1]
    weakest = min(correlations, key=correlations.__getitem__)
    print(f"lowest correlation with transformers: {correlations[weakest]:.8f} ({weakest})")
    assert correlations[weakest] > 0.99


def _matrix_inputs(path: Path) -> dict[str, int]:
    """n_in of every weight matrix in the GGUF (its first ggml dimension)."""
    reader = gguf.GGUFReader(path)
    return {tensor.name: int(tensor.shape[0]) for tensor in reader.tensors if len(tensor.shape) >= 2}


def test_every_layer_matrix_of_a_gguf_gets_statistics(kquant_f16: Path) -> None:
    inputs = _matrix_inputs(kquant_f16)
    layer_matrices = {name: n_in for name, n_in in inputs.items() if name.startswith("blk.")}
    with ModelEvaluator(kquant_f16, n_ctx=128) as evaluator:
        chunks = _chunks(evaluator, VARIED_TEXT, 128, 2)
        evaluator.evaluate_chunk(chunks[0])
        evaluator.evaluate_chunk(chunks[1][:77])
        stats = evaluator.stats()

    assert (stats.chunks, stats.tokens, stats.chunk_size) == (2, 128 + 77, 128)
    assert set(stats.matrices) == set(layer_matrices)
    for name, n_in in layer_matrices.items():
        assert stats.matrices[name].sums.shape == (1, n_in)
        assert stats.matrices[name].counts.tolist() == [128 + 77], name
        assert (stats.matrices[name].sums > 0).all()


def test_output_weight_only_on_request(kquant_f16: Path) -> None:
    n_in = _matrix_inputs(kquant_f16)["output.weight"]
    with ModelEvaluator(kquant_f16, n_ctx=64, collect_output=True) as evaluator:
        chunk = _chunks(evaluator, VARIED_TEXT, 64, 1)[0]
        evaluator.evaluate_chunk(chunk)
        with_output = evaluator.stats()
    assert with_output.matrices["output.weight"].sums.shape == (1, n_in)
    assert with_output.matrices["output.weight"].counts.tolist() == [64]
    assert "token_embd.weight" not in with_output.matrices

    without = collect_activation_stats(kquant_f16, [chunk], n_ctx=64)
    assert "output.weight" not in without.matrices
    for name, stats in without.matrices.items():
        np.testing.assert_allclose(stats.sums, with_output.matrices[name].sums, rtol=1e-6, err_msg=name)


def test_chunks_longer_than_a_physical_batch(kquant_f16: Path) -> None:
    """600 tokens go through llama.cpp in two decodes (512 + 88); every row still counts, last layer too."""
    with ModelEvaluator(kquant_f16, n_ctx=600) as evaluator:
        tokens = _chunks(evaluator, VARIED_TEXT, 600, 1)[0]
        evaluator.evaluate_chunk(tokens)
        whole = evaluator.stats()
    halves = collect_activation_stats(kquant_f16, [tokens[:300], tokens[300:]], n_ctx=300)
    last_layer = max(int(re.match(r"blk\.(\d+)\.", name)[1]) for name in whole.matrices)
    assert whole.matrices[f"blk.{last_layer}.ffn_down.weight"].counts.tolist() == [600]
    assert all(stats.counts.tolist() == [600] for stats in whole.matrices.values())
    # the first layer's q/k/v input is the normed embedding of each token alone, however the tokens are batched
    np.testing.assert_allclose(whole.matrices["blk.0.attn_q.weight"].sums, halves.matrices["blk.0.attn_q.weight"].sums,
                               rtol=1e-6)


def test_output_product_is_skipped_without_changing_statistics(kquant_f16: Path) -> None:
    """The first decode runs whole and shows nothing watched follows the final norm; later ones stop there."""
    with ModelEvaluator(kquant_f16, n_ctx=96) as evaluator:
        chunk = _chunks(evaluator, VARIED_TEXT, 96, 1)[0]
        evaluator.evaluate_chunk(chunk)
        once = evaluator.stats()
        assert evaluator._collector is not None and evaluator._collector.output_skip.active
        evaluator.evaluate_chunk(chunk)
        twice = evaluator.stats()
    for name, stats in once.matrices.items():
        np.testing.assert_allclose(twice.matrices[name].sums, 2 * stats.sums, rtol=1e-12, err_msg=name)
        assert twice.matrices[name].counts.tolist() == [2 * 96]


def _write_moe_model(dense: Path, target: Path, n_expert: int, n_used: int) -> Path:
    """The tiny Llama with every feed-forward block replaced by `n_expert` random experts (Mixtral layout)."""
    reader = gguf.GGUFReader(dense)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(target, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_expert_count(n_expert)
    writer.add_expert_used_count(n_used)
    rng = np.random.default_rng(7)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        kind = re.fullmatch(r"(blk\.\d+)\.ffn_(gate|up|down)\.weight", tensor.name)
        if kind is None:
            writer.add_tensor(tensor.name, data)
            continue
        block, part = kind.groups()
        experts = rng.normal(0, float(data.astype(np.float32).std()), size=(n_expert, *data.shape))
        writer.add_tensor(f"{block}.ffn_{part}_exps.weight", experts.astype(np.float16))
        if part == "gate":
            router = rng.normal(0, 1.0, size=(n_expert, data.shape[1])).astype(np.float32)
            writer.add_tensor(f"{block}.ffn_gate_inp.weight", router)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_mixture_of_experts_rows_go_to_their_experts(kquant_f16: Path, tmp_path: Path) -> None:
    n_expert, n_used = 4, 2
    model = _write_moe_model(kquant_f16, tmp_path / "moe.gguf", n_expert, n_used)
    with ModelEvaluator(model, n_ctx=128) as evaluator:
        tokens = _chunks(evaluator, VARIED_TEXT, 128, 1)[0]
        evaluator.evaluate_chunk(tokens)
        stats = evaluator.stats()

    layers = sorted({int(re.match(r"blk\.(\d+)\.", name)[1]) for name in stats.matrices})
    assert layers == list(range(8))
    for layer in layers:
        router = stats.matrices[f"blk.{layer}.ffn_gate_inp.weight"]
        gate, up, down = (stats.matrices[f"blk.{layer}.ffn_{part}_exps.weight"] for part in ("gate", "up", "down"))
        assert router.counts.tolist() == [128]
        assert gate.sums.shape == up.sums.shape == (n_expert, 256) and down.sums.shape == (n_expert, 512)
        for experts in (gate, up, down):
            assert experts.counts.shape == (n_expert,) and experts.counts.sum() == n_used * 128
            assert ((experts.counts > 0) == (experts.sums > 0).all(axis=1)).all()
        assert (gate.counts > 0).sum() > 1, "the random router sends tokens to several experts"
        assert gate.counts.tolist() == up.counts.tolist() == down.counts.tolist()
        # the router and the gate/up experts read the same rows: each token once, and once per chosen expert
        np.testing.assert_allclose(gate.sums.sum(axis=0), n_used * router.sums[0], rtol=1e-9)
        np.testing.assert_allclose(up.sums, gate.sums, rtol=1e-12)


def test_should_stop_is_polled_during_a_decode(kquant_f16: Path) -> None:
    polls: list[int] = []
    done: list[int] = []

    def stop_after_some_nodes() -> bool:
        polls.append(1)
        return len(polls) > 20

    chunk = list(range(1, 129))
    with pytest.raises(Stopped):
        collect_activation_stats(kquant_f16, [chunk, chunk], n_ctx=128, should_stop=stop_after_some_nodes,
                                 progress=lambda finished, total: done.append(finished))
    assert done == [0]
    assert len(polls) == 21


def test_should_stop_between_chunks(kquant_f16: Path) -> None:
    done: list[tuple[int, int]] = []
    chunk = list(range(1, 65))
    with pytest.raises(Stopped):
        collect_activation_stats(kquant_f16, iter([chunk] * 3), n_ctx=64, total_chunks=3,
                                 progress=lambda finished, total: done.append((finished, total)),
                                 should_stop=lambda: len(done) >= 2)
    assert done == [(0, 3), (1, 3)]


def test_an_error_in_a_callback_surfaces_after_the_decode(kquant_f16: Path) -> None:
    polls: list[int] = []
    fail_at: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        if fail_at and len(polls) == fail_at[0]:
            raise KeyError("raised inside llama.cpp's abort callback")
        return False

    chunk = list(range(1, 65))
    with ModelEvaluator(kquant_f16, n_ctx=64, should_stop=should_stop) as evaluator:
        evaluator.evaluate_chunk(chunk)
        before = evaluator.stats()
        fail_at.append(len(polls) + 60)  # part-way through the layers: some products are already recorded
        with pytest.raises(KeyError, match="abort callback"):
            evaluator.evaluate_chunk(chunk)
        after_failure = evaluator.stats()
        evaluator.evaluate_chunk(chunk)
        after = evaluator.stats()
    assert after_failure.chunks == 1 and after_failure.tokens == 64
    assert after_failure.matrices.keys() == before.matrices.keys()
    for name, stats in before.matrices.items():
        np.testing.assert_array_equal(after_failure.matrices[name].sums, stats.sums)
        assert after_failure.matrices[name].counts.tolist() == [64]
        assert after.matrices[name].counts.tolist() == [128]


def test_collect_false_gives_no_statistics(kquant_f16: Path) -> None:
    with ModelEvaluator(kquant_f16, n_ctx=64, collect=False) as evaluator:
        evaluator.evaluate_chunk(list(range(1, 65)))
        stats = evaluator.stats()
    assert stats == CollectedStats({}, chunks=1, tokens=64, chunk_size=64)


def test_model_facts(kquant_f16: Path, smollm2_f16: Path) -> None:
    reader = gguf.GGUFReader(kquant_f16)
    with ModelEvaluator(kquant_f16, n_ctx=32, collect=False) as evaluator:
        assert evaluator.n_vocab() == int(reader.fields["llama.vocab_size"].contents())
        assert evaluator.n_ctx_train() == int(reader.fields["llama.context_length"].contents())
        assert evaluator.chat_template() == reader.fields["tokenizer.chat_template"].contents()
        bos = evaluator.bos_token()
        assert bos is not None and evaluator.tokenize("hello", add_special=True)[0] == bos
    with ModelEvaluator(smollm2_f16, n_ctx=32, collect=False) as evaluator:
        ids = evaluator.tokenize("<|im_start|>user", add_special=False, parse_special=True)
        assert len(ids) == 2 and len(evaluator.tokenize("<|im_start|>user", add_special=False)) > 2


def test_nothing_reaches_stderr(kquant_f16: Path, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with ModelEvaluator(kquant_f16, n_ctx=64) as evaluator:
        evaluator.evaluate_chunk(list(range(1, 65)))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_bad_model_files(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("these are notes, not a model\n")
    capfd.readouterr()
    with pytest.raises(EvaluationFailed, match=r"could not load notes\.gguf"):
        ModelEvaluator(text)
    assert capfd.readouterr().err == ""
    with pytest.raises(EvaluationFailed, match="is not a file"):
        collect_activation_stats(tmp_path / "missing.gguf", [[1, 2, 3]], n_ctx=16)


def test_bad_chunks(kquant_f16: Path) -> None:
    with ModelEvaluator(kquant_f16, n_ctx=16) as evaluator:
        with pytest.raises(ValueError, match="does not fit"):
            evaluator.evaluate_chunk(list(range(1, 18)))
        with pytest.raises(ValueError, match="token ids"):
            evaluator.evaluate_chunk([1, evaluator.n_vocab()])
        with pytest.raises(ValueError, match="non-empty"):
            evaluator.evaluate_chunk([])
        evaluator.evaluate_chunk([1, 2, 3])
        assert evaluator.stats().tokens == 3
    with pytest.raises(EvaluationFailed, match="closed"):
        evaluator.evaluate_chunk([1, 2, 3])


def test_weight_names_lose_scheduler_marks() -> None:
    assert weight_name(b"CUDA0#blk.0.attn_k.weight#0") == "blk.0.attn_k.weight"
    assert weight_name(b"CPU#output.weight") == "output.weight"
    assert weight_name(b"blk.3.ffn_down.weight") == "blk.3.ffn_down.weight"


def test_embeddings_given_as_input_reproduce_the_token_lookup(smollm2_f16: Path) -> None:
    from converters.mix.feedback import _ReferenceWeights

    tokens = list(range(200, 460, 2))
    table = _ReferenceWeights(smollm2_f16)
    with ModelEvaluator(smollm2_f16, n_ctx=256, collect=False, editable_weights=True) as evaluator:
        looked_up: list[np.ndarray] = []
        evaluator.evaluate_logits(tokens, 70, lambda _p, logits: looked_up.append(logits.copy()))
        given: list[np.ndarray] = []
        rows = table.rows("token_embd.weight", np.asarray(tokens))
        evaluator.evaluate_embedding_logits(rows, 70, lambda _p, logits: given.append(logits.copy()))
        assert np.array_equal(np.concatenate(given), np.concatenate(looked_up))
        shifted: list[np.ndarray] = []
        evaluator.evaluate_embedding_logits(rows * 1.5, 70, lambda _p, logits: shifted.append(logits.copy()))
        assert not np.allclose(np.concatenate(shifted), np.concatenate(looked_up))
        with pytest.raises(ValueError, match="embeddings must be"):
            evaluator.evaluate_embedding_logits(rows[:, :10], 0, lambda _p, _logits: None)


# --- LoRA adapters applied to the evaluator's context ----------------------------------------------------------

def _logits(model: Path, ids: list[int], loras: tuple[tuple[Path, float], ...] = ()) -> np.ndarray:
    rows: list[np.ndarray] = []
    with ModelEvaluator(model, n_ctx=len(ids), collect=False, loras=loras) as evaluator:
        evaluator.evaluate_logits(ids, 0, lambda _position, logits: rows.append(logits.copy()))
    return np.concatenate(rows)


def test_lora_adapters_give_what_llama_cpp_python_gives(smollm2_f16: Path, smollm2_lora: Path) -> None:
    import llama_cpp

    with ModelEvaluator(smollm2_f16, vocab_only=True) as tokenizer:
        ids = tokenizer.tokenize(VARIED_TEXT)[:32]
    plain = _logits(smollm2_f16, ids)
    np.testing.assert_array_equal(_logits(smollm2_f16, ids, ((smollm2_lora, 0.0),)), plain)
    adapted = _logits(smollm2_f16, ids, ((smollm2_lora, 0.5),))
    assert np.abs(adapted - plain).max() > 1.0, "the adapter must move the logits for this test to mean anything"
    llm = llama_cpp.Llama(str(smollm2_f16), n_ctx=len(ids), n_batch=len(ids), logits_all=True, n_threads=2,
                          flash_attn=True, verbose=False, lora_path=str(smollm2_lora), lora_scale=0.5)
    try:
        llm.eval(ids)
        expected = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    tolerance = 1e-3 * np.abs(expected).max()
    np.testing.assert_allclose(adapted, expected, rtol=0, atol=tolerance)
    halves = _logits(smollm2_f16, ids, ((smollm2_lora, 0.25), (smollm2_lora, 0.25)))  # both set on the context
    summed_in_another_order = 3 * tolerance
    np.testing.assert_allclose(halves, adapted, rtol=0, atol=summed_in_another_order)


def test_an_adapter_llama_cpp_cannot_load_is_one_sentence(starter_gguf: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with pytest.raises(EvaluationFailed, match=rf"could not load the LoRA adapter {re.escape(starter_gguf.name)} for "
                                               rf"{re.escape(starter_gguf.name)}; check") as raised:
        ModelEvaluator(starter_gguf, n_ctx=32, collect=False, loras=((starter_gguf, 1.0),))
    assert "\n" not in str(raised.value) and capfd.readouterr().err == ""
