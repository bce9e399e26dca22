"""What `qdesk eval` costs per candidate, against bare llama.cpp evaluating the same tokens.

    python bench/eval_overhead.py [REFERENCE.gguf CANDIDATE.gguf] [--chunks 8] [--ctx 512] [--repeats 3]
                                  [--threads N]

Defaults: the F16 SmolLM2 the tests build as reference and the starter model (Q4_1) as candidate.

* qdesk: `qdesk.evaluation.evaluate.evaluate(reference, [candidate])` with the reference's distributions already cached
  (one warm-up run fills the cache), wall time of the whole call: reading the tokenizer, the cached reference,
  loading the candidate, decoding every chunk and scoring every token (KLD, top-1, perplexity).
* peer: llama-cpp-python's low-level API alone: load the candidate, create a context like qdesk's, and decode
  the same chunks with the same output rows (the second half of each chunk), reading nothing back.

The two run in turn, `--repeats` times; medians and the ratio qdesk/peer are printed. Prints figures; never
passes or fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import llama_cpp.llama_cpp as llama  # noqa: E402 - after the path setup; loads llama_cpp before numpy

from qdesk.evaluation.evaluate import evaluate  # noqa: E402
from qdesk.evaluation.text import TokenChunks  # noqa: E402

DEFAULT_REFERENCE = REPO_ROOT / ".cache" / "tests" / "smollm2-135m-f16.gguf"


def starter() -> Path:
    from qdesk.app.starter import starter_model_path

    return starter_model_path()


def bare_llama_eval(model_path: Path, chunks: TokenChunks, threads: int) -> float:
    """Seconds for llama.cpp alone to load the model and decode every chunk with the scored rows as outputs."""
    started = time.perf_counter()
    model_params = llama.llama_model_default_params()
    model = llama.llama_model_load_from_file(os.fsencode(model_path), model_params)
    context_params = llama.llama_context_default_params()
    context_params.n_ctx = chunks.ctx
    context_params.n_batch = context_params.n_ubatch = min(chunks.ctx, 512)
    context_params.n_seq_max = 1
    context_params.n_threads = context_params.n_threads_batch = threads
    context_params.no_perf = True
    context = llama.llama_init_from_model(model, context_params)
    n_batch = min(chunks.ctx, 512)
    batch = llama.llama_batch_init(n_batch, 0, 1)
    for index in range(chunks.count):
        llama.llama_memory_clear(llama.llama_get_memory(context), True)
        for start in range(0, chunks.ctx, n_batch):
            count = min(n_batch, chunks.ctx - start)
            for row in range(count):
                position = start + row
                batch.token[row] = int(chunks.ids[index, position])
                batch.pos[row] = position
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = 0
                batch.logits[row] = position >= chunks.first_scored
            batch.n_tokens = count
            if llama.llama_decode(context, batch) != 0:
                raise RuntimeError("llama_decode failed")
    llama.llama_batch_free(batch)
    llama.llama_free(context)
    llama.llama_model_free(model)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, metavar="REFERENCE CANDIDATE")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    reference, candidate = args.models if len(args.models) == 2 else (DEFAULT_REFERENCE, starter())

    os.environ.setdefault("QDESK_CACHE_DIR", tempfile.mkdtemp(prefix="qdesk-bench-cache-"))
    llama.llama_log_set(llama.llama_log_callback(lambda *_: None), None)

    def ours() -> tuple[float, TokenChunks]:
        started = time.perf_counter()
        result = evaluate(reference, [candidate], ctx=args.ctx, chunks=args.chunks, memory_ctx=None,
                          n_threads=args.threads)
        seconds = time.perf_counter() - started
        from native.activations import ModelEvaluator
        from qdesk.evaluation.text import builtin_eval_texts, chunk_tokens

        with ModelEvaluator(reference, n_ctx=args.ctx, collect=False, vocab_only=True) as tokenizer:
            bos = tokenizer.bos_token() if tokenizer.adds_bos() else None
            sources = [tokenizer.tokenize(text.text) for text in builtin_eval_texts()]
            chunks = chunk_tokens(sources, args.ctx, args.chunks, bos)
        assert result.chunks == chunks.count
        return seconds, chunks

    warm_seconds, chunks = ours()
    qdesk_times, peer_times = [], []
    for _ in range(args.repeats):
        qdesk_times.append(ours()[0])
        peer_times.append(bare_llama_eval(candidate, chunks, args.threads))
    qdesk_s, peer_s = statistics.median(qdesk_times), statistics.median(peer_times)
    tokens = chunks.count * chunks.ctx
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {args.threads} threads")
    print(f"reference {reference.name}, candidate {candidate.name}: {chunks.count} chunks × {chunks.ctx} tokens, "
          f"{chunks.scored_tokens} scored; first run (filling the cache) {warm_seconds:.2f} s")
    print("| | seconds | tokens/s |")
    print("|---|---:|---:|")
    print(f"| qdesk eval (reference cached) | {qdesk_s:.2f} | {tokens / qdesk_s:.0f} |")
    print(f"| bare llama.cpp decode | {peer_s:.2f} | {tokens / peer_s:.0f} |")
    print(f"| **qdesk/peer** | **{qdesk_s / peer_s:.2f}×** | |")
    print("all runs (qdesk, peer):", [f"{a:.2f}/{b:.2f}" for a, b in zip(qdesk_times, peer_times, strict=True)])


if __name__ == "__main__":
    main()
