"""The terminal rendering of an `Evaluation`: one table of variants, then tasks, memory and notes."""

from __future__ import annotations

from qdesk.display.tables import text_table
from qdesk.evaluation.evaluate import CandidateResult, Evaluation, ReferenceResult


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """The first row is the header; the first column is a name, the others are figures."""
    return text_table(rows[0], rows[1:], right=range(1, len(rows[0])), rule=True)


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _speed_cells(result: ReferenceResult | CandidateResult) -> tuple[str, str]:
    if result.speed is None:
        return ("-", "-")
    return (f"{result.speed.prompt_tps:.0f}", f"{result.speed.generation_tps:.1f}")


def _quality_rows(evaluation: Evaluation, with_speed: bool) -> list[tuple[str, ...]]:
    header = ("variant", "MB", "bpw", "PPL", "ΔPPL", "KLD mean", "median", "p99", "max", "top-1", "Δp")
    with_prediction = any(candidate.predicted_kld is not None for candidate in evaluation.candidates)
    prediction_header = ("pred. KLD",) if with_prediction else ()
    speed_header = ("pp t/s", "tg t/s") if with_speed else ()
    reference = evaluation.reference
    rows = [header + prediction_header + speed_header]
    rows.append((reference.model.path.name + " (ref)", f"{reference.model.bytes / 1e6:.1f}",
                 _number(reference.model.bpw, 2), f"{reference.ppl:.3f}", "", "", "", "", "", "", "")
                + (("",) if with_prediction else ()) + (_speed_cells(reference) if with_speed else ()))
    for candidate in evaluation.candidates:
        divergence = candidate.divergence
        change = (candidate.ppl / reference.ppl - 1) * 100
        rows.append((
            candidate.model.path.name, f"{candidate.model.bytes / 1e6:.1f}", _number(candidate.model.bpw, 2),
            f"{candidate.ppl:.3f}", f"{change:+.2f}%",
            _number(divergence and divergence.mean, 5), _number(divergence and divergence.median, 5),
            _number(divergence and divergence.p99, 4), _number(divergence and divergence.max, 3),
            "-" if divergence is None else f"{divergence.top1_agreement * 100:.2f}%",
            "-" if divergence is None else f"{divergence.delta_p_mean * 100:+.2f}%",
        ) + ((_number(candidate.predicted_kld, 5),) if with_prediction else ())
            + (_speed_cells(candidate) if with_speed else ()))
    return rows


def _task_lines(evaluation: Evaluation) -> list[str]:
    reference_tasks = evaluation.reference.tasks
    if reference_tasks is None:
        return []
    lines = ["", f"tasks ({reference_tasks.to_json()['suite']}): reference scores "
             f"{reference_tasks.to_json()['score'] * 100:.1f}%"]
    for candidate in evaluation.candidates:
        if candidate.tasks is None:
            continue
        verdict = candidate.tasks.to_json()
        degradation = verdict["degradation_pct"]
        change = "cannot judge" if degradation is None else f"{degradation:+.1f}% degradation"
        reason = f" ({verdict['reason']})" if verdict.get("reason") else ""
        lines.append(f"  {candidate.model.path.name}: {verdict['score'] * 100:.1f}%, {change} -> "
                     f"{verdict['recommendation']}{reason}")
    return lines


def _memory_lines(evaluation: Evaluation) -> list[str]:
    estimates = [(evaluation.reference.model.path.name, evaluation.reference.memory)]
    estimates += [(candidate.model.path.name, candidate.memory) for candidate in evaluation.candidates]
    known = [(name, memory) for name, memory in estimates if memory is not None]
    if not known:
        return []
    n_ctx = known[0][1].to_json()["n_ctx"]
    rows: list[tuple[str, ...]] = [("memory at ctx " + str(n_ctx), "weights MB", "KV MB", "compute MB", "total MB")]
    for name, memory in known:
        figures = memory.to_json()
        rows.append((name, *(f"{figures[key] / 1e6:.1f}" for key in
                             ("weights_bytes", "kv_bytes", "compute_bytes", "total_bytes"))))
    return ["", *_table(rows)]


def render_evaluation(evaluation: Evaluation) -> str:
    with_speed = evaluation.reference.speed is not None
    lines = [
        f"text: {evaluation.chunks} chunks of {evaluation.ctx} tokens ({evaluation.scored_tokens} scored) from "
        + ", ".join(evaluation.sources),
        *([f"LoRA adapters on every model: {', '.join(lora.label for lora in evaluation.loras)}"]
          if evaluation.loras else []),
        "",
        *_table(_quality_rows(evaluation, with_speed)),
        *_task_lines(evaluation),
        *_memory_lines(evaluation),
    ]
    notes = [note for candidate in evaluation.candidates for note in candidate.notes]
    if notes:
        lines += ["", *(f"note: {note}" for note in notes)]
    lines += ["", "KLD: KL(P_ref ‖ P_cand) in nats per token over the second half of each chunk; top-1: how often "
              "both put the same token first; Δp: mean change in the probability of the actual next token."]
    if any(candidate.predicted_kld is not None for candidate in evaluation.candidates):
        lines.append("pred. KLD: the mean KLD a sensitivity mix predicted for itself when it was planned.")
    return "\n".join(lines)
