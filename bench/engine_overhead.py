"""What generating through qdesk's engine (a worker process, tokens streamed over a pipe) costs in tokens/s.

    python bench/engine_overhead.py [MODEL.gguf] [--tokens 128] [--repeat 5] [--threads N]

Compares, on the same model, prompt and settings (temperature 0, so every run produces the same tokens):

- qdesk: `load_model(...).chat(...)`, timed in the caller as the app sees it;
- direct: `llama_cpp.Llama` in this process, `Llama.generate` with the same sampler settings, the same prompt
  (rendered with the GGUF's chat template) and the same stop rules;
- direct chat API: `Llama.create_chat_completion(stream=True)` with the same settings (for reference).

Decode speed is (tokens - 1) / (time from the first token to the last) on every side. Runs alternate; medians
are printed with the ratio qdesk/direct. The target is at least 0.97x.
"""

import llama_cpp  # before numpy, as the worker does  # isort: skip

import argparse
import codecs
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

from qdesk.app.starter import starter_model_path  # noqa: E402
from qdesk.chat.engine import LoadOptions, SamplingOptions, load_model  # noqa: E402

SYSTEM = "You are a helpful assistant."
PROMPT = "Write a long, detailed story about a dragon who learns to bake bread in a small mountain village."
MIN_P = 0.05


def _speed(first_at: float, last_at: float, tokens: int) -> float:
    return (tokens - 1) / (last_at - first_at) if tokens > 1 and last_at > first_at else 0.0


def _messages() -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]


def direct_generate(llm: llama_cpp.Llama, sampling: SamplingOptions) -> tuple[float, int]:
    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token=llm._model.token_get_text(llm.token_eos()),
                                    bos_token=llm._model.token_get_text(llm.token_bos()))
    prompt = llm.tokenize(formatter(messages=_messages()).prompt.encode(), add_bos=False, special=True)
    vocab = llm._model.vocab
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = ctypes.create_string_buffer(64)
    llm.reset()
    llm.set_seed(sampling.seed)
    pieces: list[str] = []
    first_at = last_at = 0.0
    for token in llm.generate(prompt, top_k=sampling.top_k, top_p=sampling.top_p, min_p=MIN_P,
                              temp=sampling.temperature, repeat_penalty=sampling.repeat_penalty):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        length = llama_cpp.llama_token_to_piece(vocab, token, buffer, 64, 0, False)
        pieces.append(decoder.decode(buffer.raw[:length]))
        last_at = time.perf_counter()
        first_at = first_at or last_at
        if len(pieces) >= sampling.max_tokens:
            break
    return _speed(first_at, last_at, len(pieces)), len(pieces)


def direct_chat_api(llm: llama_cpp.Llama, sampling: SamplingOptions) -> tuple[float, int]:
    llm.reset()
    count = 0
    first_at = last_at = 0.0
    for chunk in llm.create_chat_completion(_messages(), stream=True, temperature=sampling.temperature,
                                            top_p=sampling.top_p, top_k=sampling.top_k, min_p=MIN_P,
                                            repeat_penalty=sampling.repeat_penalty, max_tokens=sampling.max_tokens,
                                            seed=sampling.seed):
        if chunk["choices"][0]["delta"].get("content"):
            count += 1
            last_at = time.perf_counter()
            first_at = first_at or last_at
    return _speed(first_at, last_at, count), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()
    model = args.model or starter_model_path()
    sampling = SamplingOptions(temperature=0.0, max_tokens=args.tokens)

    direct = llama_cpp.Llama(str(model), n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
                             n_gpu_layers=0, seed=0, verbose=False)
    speeds: dict[str, list[float]] = {"qdesk": [], "direct": [], "direct chat API": []}
    counts: dict[str, set[int]] = {name: set() for name in speeds}
    with load_model(model, LoadOptions(n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=0)) as engine:
        runs = {
            "qdesk": lambda: _engine_run(engine, sampling),
            "direct": lambda: direct_generate(direct, sampling),
            "direct chat API": lambda: direct_chat_api(direct, sampling),
        }
        for run in runs.values():  # warm-up, not counted
            run()
        for _ in range(args.repeat):
            for name, run in runs.items():
                speed, count = run()
                speeds[name].append(speed)
                counts[name].add(count)
    print(f"model: {model.name}  threads: {args.threads}  max tokens: {args.tokens}  runs: {args.repeat} (alternating)")
    for name, values in speeds.items():
        print(f"  {name:16s} median {statistics.median(values):7.2f} tok/s  "
              f"(min {min(values):.2f}, max {max(values):.2f}; tokens per run {sorted(counts[name])})")
    qdesk, bare = statistics.median(speeds["qdesk"]), statistics.median(speeds["direct"])
    chat_api = statistics.median(speeds["direct chat API"])
    print(f"ratio qdesk/direct: {qdesk / bare:.3f}x   qdesk/direct chat API: {qdesk / chat_api:.3f}x   "
          "(target ≥ 0.97x)")


def _engine_run(engine: "object", sampling: SamplingOptions) -> tuple[float, int]:
    result = engine.chat([{"role": "user", "content": PROMPT}], sampling, system=SYSTEM)  # type: ignore[attr-defined]
    return result.stats.tokens_per_second, result.stats.generated_tokens


if __name__ == "__main__":
    main()
