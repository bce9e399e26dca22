"""The `qdesk` command line: the headless face of the app (see docs/cli.md for the contract)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from converters.core.units import format_size
from qdesk import __version__
from qdesk.app.errors import Cancelled, UserError

if TYPE_CHECKING:
    from converters.calibration.calibrate import CalibrationText
    from qdesk.chat.engine import LoadedModel, LoadOptions, SamplingOptions

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130

Handler = Callable[[argparse.Namespace], int]
PRESET_NAMES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


class UsageError(Exception):
    """Arguments argparse accepted but that do not make sense together (exit status 2)."""


def _run_gui(args: argparse.Namespace) -> int:
    from qdesk.gui.app import run_app

    return run_app(quit_after_s=getattr(args, "quit_after", None))


def _run_convert(args: argparse.Namespace) -> int:
    from converters.reading.adapter import is_adapter_folder
    from converters.writing.convert import convert_checkpoint
    from qdesk.display.terminal import ProgressBar

    if args.source.is_dir() and is_adapter_folder(args.source):
        return _run_convert_adapter(args)
    if args.base is not None:
        raise UsageError("--base goes with a LoRA adapter folder (one holding adapter_config.json)")
    if args.lora:
        return _run_convert_merged(args)
    bar = ProgressBar("convert")
    try:
        result = convert_checkpoint(args.source, args.output, outtype=args.outtype, progress=bar)
    finally:
        bar.close()
    dequantized = f", dequantized from {result.source_quantization}" if result.source_quantization else ""
    print(f"wrote {result.path} ({format_size(result.bytes_written)}, {result.tensor_count} tensors{dequantized})")
    return EXIT_OK


def _run_convert_merged(args: argparse.Namespace) -> int:
    from converters.writing.lora_merge import convert_with_adapters
    from qdesk.display.terminal import ProgressBar

    if args.output is None:
        raise UsageError("--lora needs -o OUT.gguf for the merged model")
    if args.outtype == "q8_0":
        raise UsageError("--lora merges into a float model: choose --outtype f32, f16 or bf16, then quantize it")
    bar = ProgressBar("convert")
    try:
        merged = convert_with_adapters(args.source, [(lora.path, lora.scale) for lora in args.lora], args.output,
                                       outtype=args.outtype, progress=bar)
    finally:
        bar.close()
    print(f"wrote {merged.path} ({format_size(merged.bytes_written)}, {merged.merged_tensors} tensors merged with "
          f"{', '.join(merged.adapters)})")
    return EXIT_OK


def _run_convert_adapter(args: argparse.Namespace) -> int:
    from converters.reading.adapter import read_adapter
    from converters.writing.lora import ADAPTER_OUTTYPES, convert_adapter
    from qdesk.display.terminal import ProgressBar

    if args.outtype not in ADAPTER_OUTTYPES:
        raise UsageError(f"a LoRA adapter converts to {', '.join(ADAPTER_OUTTYPES)}, not {args.outtype}")
    if args.lora:
        raise UsageError("--lora merges adapters into a model; SRC here is itself an adapter")
    base = args.base or _cached_base(read_adapter(args.source).base_name)
    bar = ProgressBar("convert")
    try:
        result = convert_adapter(args.source, args.output, base=base, outtype=args.outtype, progress=bar)
    finally:
        bar.close()
    print(f"wrote {result.path} ({format_size(result.bytes_written)}, LoRA adapter for {result.architecture}: "
          f"{result.pair_count} matrices, rank {result.rank}, alpha {result.alpha:g}; base {result.base})")
    return EXIT_OK


def _cached_base(name: str | None) -> Path | None:
    """The snapshot folder of the adapter's base model in the Hugging Face cache, when its name is a repository
    there; None otherwise (the converter then looks for a folder of that name, and says what to do)."""
    if not name or Path(name).exists() or name.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _run_info(args: argparse.Namespace) -> int:
    from converters.core.units import parse_size
    from converters.mix.report import render_grid
    from qdesk.library.info import memory_report, read_model_info, render_text, tensor_type_heatmap

    if args.backends:
        return _run_backends(args)
    if args.file is None:
        raise UsageError("give a GGUF file to describe, or --backends")
    if args.ctx < 0:
        raise UsageError("--ctx must be 0 (the model's trained context) or more")
    ram = None if args.ram is None else parse_size(args.ram, option="--ram")
    vram = None if args.vram is None else parse_size(args.vram, option="--vram")
    if getattr(args, "rpc", None):
        return _info_placement(args)
    info = read_model_info(args.file)
    memory = memory_report(args.file, n_ctx=args.ctx, n_gpu_layers=args.gpu_layers, kv_type=args.kv_type,
                           ram_bytes=ram, vram_bytes=vram)
    types = tensor_type_heatmap(args.file) if args.types else None
    if args.json:
        print(json.dumps({**info.to_json(), "memory": None if memory is None else memory.to_json(),
                          **({} if types is None else {"types": types.to_json()})}, indent=2))
    else:
        print(render_text(info, memory))
        if types is not None:
            print()
            print(render_grid(types))
    return EXIT_OK


def _info_placement(args: argparse.Namespace) -> int:
    from qdesk.chat.engine import LoadOptions
    from qdesk.rpc.placement import place_layers

    placement = place_layers(args.file, LoadOptions(n_ctx=args.ctx or 0, kv_type=args.kv_type,
                                                    rpc=_rpc_endpoints(args)))
    if args.json:
        print(json.dumps(placement.to_json(), indent=2))
    else:
        print(placement.render())
        for warning in placement.warnings():
            print(f"qdesk: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _run_serve(args: argparse.Namespace) -> int:
    import os

    from converters.core.units import parse_size
    from qdesk.chat.engine import LoadOptions
    from qdesk.serve.server import API_KEY_ENV, ServeOptions, start_server

    if args.ctx < 16:
        raise UsageError("--ctx must be at least 16")
    load = LoadOptions(n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=_gpu_layers(args), kv_type=args.kv_type,
                       rpc=_rpc_endpoints(args), loras=tuple(args.lora or ()))
    options = ServeOptions(models=tuple(args.models), host=args.host, port=args.port,
                           api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                           cors_origins=tuple(args.cors or ()), load=load,
                           memory_limit=None if args.memory is None else parse_size(args.memory, option="--memory"))

    def log(record: object) -> None:
        from qdesk.serve.app import RequestRecord

        assert isinstance(record, RequestRecord)
        tokens = f" {record.prompt_tokens}+{record.completion_tokens} tokens" if record.model else ""
        print(f"{record.method} {record.path} {record.status} {record.model or ''}{tokens} {record.seconds:.2f} s"
              + (f" ({record.error})" if record.error else ""), file=sys.stderr, flush=True)

    server = start_server(options, on_request=None if args.quiet else log)
    print(f"qdesk serve: {server.url} serving {', '.join(server.models)}. Ctrl-C stops it.", file=sys.stderr,
          flush=True)
    try:
        while not server.wait(0.5):
            pass
    finally:
        server.stop()
    return EXIT_OK


def _run_worker(args: argparse.Namespace) -> int:
    from converters.core.units import parse_size
    from qdesk.rpc.endpoints import TRUST_WARNING
    from qdesk.rpc.worker import WorkerInfo, run_worker

    limit = None if args.mem is None else parse_size(args.mem, option="--mem")

    def ready(info: WorkerInfo) -> None:
        if info.exposed:
            print(f"qdesk: warning: this worker listens on {info.endpoint}, beyond this machine; {TRUST_WARNING}.",
                  file=sys.stderr)
        print(f"qdesk worker: serving {', '.join(info.devices)} on {info.endpoint}; use it with "
              f"--rpc {info.endpoint}. Ctrl-C stops it.", file=sys.stderr, flush=True)

    run_worker(args.host, args.port, threads=args.threads, memory_limit=limit, on_ready=ready)
    return EXIT_OK


def _run_eval(args: argparse.Namespace) -> int:
    from qdesk.display.terminal import ProgressBar
    from qdesk.evaluation.evaluate import evaluate
    from qdesk.evaluation.table import render_evaluation
    from qdesk.evaluation.text import read_eval_texts

    if args.report is not None and args.report.suffix.lower() == ".json":
        raise UsageError("--report takes the HTML file's name (OUT.html); the JSON is written beside it")
    loras = tuple(args.lora or ())
    if args.report is not None:
        _check_outputs([args.ref, *args.candidates, *(args.text or ()), *_task_files(args.tasks),
                        *(lora.path for lora in loras)], [args.report, args.report.with_suffix(".json")])
    texts = read_eval_texts(args.text) if args.text else None
    bar = ProgressBar("eval")
    try:
        result = evaluate(args.ref, args.candidates, texts=texts, ctx=args.ctx, chunks=args.chunks,
                          tasks=args.tasks or (), threshold_pct=args.threshold, speed=args.speed,
                          memory_ctx=args.memory_ctx or None, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                          cache=not args.no_cache, progress=bar, rpc=_rpc_endpoints(args), loras=loras)
    finally:
        bar.close()
    document = result.to_json()
    if result.reference.tasks is not None:
        for warning in result.reference.tasks.warnings():
            print(f"qdesk: warning: reference {warning}", file=sys.stderr)
    if args.report is not None:
        from qdesk.evaluation.report import write_report

        html_path, json_path = write_report(document, args.report)
        print(f"wrote {html_path} and {json_path}", file=sys.stderr)
    print(json.dumps(document, indent=2) if args.json else render_evaluation(result))
    return EXIT_OK


def _check_outputs(inputs: Sequence[Path | None], outputs: Sequence[Path | None]) -> None:
    """Before any work: every output goes into a folder that takes files, and none is an input or another output."""
    from converters.core.outputs import check_output_folder, check_outputs

    for output in outputs:
        if output is not None:
            check_output_folder(output)
    check_outputs(inputs, outputs)


def _task_files(tasks: Sequence[str] | None) -> list[Path]:
    return [Path(task) for task in tasks or () if Path(task).is_file()]


def _run_backends(args: argparse.Namespace) -> int:
    from native.backends import discover
    from qdesk.display.backends import render_text

    system = discover()
    print(json.dumps(system.to_json(), indent=2) if args.json else render_text(system))
    return EXIT_OK


def _calibration_arguments(parser: argparse.ArgumentParser) -> None:
    from converters.calibration.calibrate import DEFAULT_CHUNKS, DEFAULT_CTX

    parser.add_argument("--text", type=Path, action="append", metavar="FILE",
                        help="calibration text from your task (repeatable; default: the built-in mixed text)")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS,
                        help=f"chunks of text to evaluate (default: {DEFAULT_CHUNKS})")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per chunk (default: {DEFAULT_CTX})")
    parser.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                        help="layers to offload to a GPU while calibrating (default: 0, CPU only)")


def _calibration_texts(args: argparse.Namespace) -> list[CalibrationText] | None:
    from converters.calibration.calibrate import read_text_file

    return [read_text_file(path) for path in args.text] if args.text else None


def _run_calibrate(args: argparse.Namespace) -> int:
    from converters.calibration.calibrate import calibrate
    from converters.calibration.imatrix import write_legacy_imatrix
    from qdesk.display.terminal import ProgressBar

    suffix = ".imatrix.dat" if args.legacy_dat else ".imatrix.gguf"
    output = args.output or args.model.with_name(args.model.stem + suffix)
    if args.model.is_file():
        _check_outputs([args.model, *(args.text or ())], [output])
    bar = ProgressBar("calibrate")
    try:
        result = calibrate(args.model, None if args.legacy_dat else output, _calibration_texts(args),
                           chunks=args.chunks, ctx=args.ctx, gpu_layers=args.gpu_layers, progress=bar)
    finally:
        bar.close()
    if args.legacy_dat:
        write_legacy_imatrix(result.matrix, output)
    print(f"wrote {output} ({len(result.matrix.entries)} tensors, {result.chunks} chunks of {args.ctx} tokens, "
          f"{result.tokens / max(result.seconds, 1e-9):.0f} tokens/s)")
    return EXIT_OK


def _run_quantize(args: argparse.Namespace) -> int:
    from converters.quantization.plan import QuantPlan
    from converters.quantization.quantize import quantize
    from qdesk.display.terminal import ProgressBar

    if args.source.exists():
        imatrix_file = None if args.imatrix.lower() in ("auto", "none") else Path(args.imatrix)
        _check_outputs([args.source, imatrix_file, args.plan, *(args.text or ())], [args.output, args.plan_out])
    recipe = QuantPlan.load(args.plan) if args.plan is not None else args.preset or _mix_budget(args)
    if args.lora and args.output is None:
        raise UsageError("--lora needs -o OUT.gguf: the adapted model is no longer the source's")
    bar = ProgressBar("quantize")
    try:
        with _merged_source(args, bar) as source:
            result = quantize(source, args.output, recipe, args.imatrix, texts=_calibration_texts(args),
                              chunks=args.chunks, ctx=args.ctx, gpu_layers=args.gpu_layers, threads=args.threads,
                              plan_out=args.plan_out, mix_effort=args.mix_effort, encoder=args.encoder,
                              awq=args.awq, progress=bar)
    finally:
        bar.close()
    for warning in result.warnings:
        print(f"qdesk: warning: {warning}", file=sys.stderr)
    matrix = f", importance matrix: {result.imatrix.origin}" if result.imatrix else ", no importance matrix"
    types = ", ".join(f"{count} {name}" for name, count in result.plan.type_counts().items())
    predictions = [tensor.predicted_kld for tensor in result.plan.tensors if tensor.predicted_kld is not None]
    predicted = f", predicted KLD {sum(predictions):.4g}" if predictions else ""
    feedback = ", error feedback" if result.plan.encoder == "feedback" else ""
    feedback += ", activation-aware scaling" if args.awq else ""
    print(f"wrote {result.path} ({format_size(result.bytes)}, {result.plan.bits_per_weight:.2f} bpw; "
          f"{types}{matrix}{feedback}{predicted})")
    if predictions:
        from converters.mix.report import plan_heatmap, summary_lines

        print("the mix by tensor class (bits per weight per layer: --plan-out PLAN.json, under \"report\"):")
        for line in summary_lines(plan_heatmap(result.plan)):
            print(f"  {line}")
    return EXIT_OK


@contextlib.contextmanager
def _merged_source(args: argparse.Namespace, bar: object) -> Iterator[Path]:
    """SRC itself, or with `--lora` a float GGUF of SRC with the adapters merged in, removed afterwards."""
    if not args.lora:
        yield args.source
        return
    import tempfile

    from converters.quantization.quantize import reference_outtype
    from converters.writing.lora_merge import convert_with_adapters

    outtype = "f16" if args.source.suffix.lower() == ".gguf" else reference_outtype(args.source)
    with tempfile.TemporaryDirectory(prefix=".qdesk-merge-", dir=args.output.parent) as folder:
        merged = convert_with_adapters(args.source, [(lora.path, lora.scale) for lora in args.lora],
                                       Path(folder) / f"{args.output.stem}-merged.gguf", outtype=outtype,
                                       progress=bar)  # type: ignore[arg-type]
        yield merged.path


def _mix_budget(args: argparse.Namespace) -> object:
    from converters.core.units import parse_size
    from converters.mix.allocate import MixBudget

    if args.like is not None:
        if args.like.upper() not in PRESET_NAMES:
            raise UsageError(f"--like takes a preset name: {', '.join(PRESET_NAMES)}")
        return MixBudget(like=args.like.upper())
    if args.target_size is not None:
        return MixBudget(size_bytes=parse_size(args.target_size, option="--target-size"))
    if args.target_bpw is None or not math.isfinite(args.target_bpw) or args.target_bpw <= 0:
        raise UsageError("--target-bpw takes a positive number of bits per weight, e.g. 4.6")
    return MixBudget(bpw=args.target_bpw)


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--ctx", type=int, default=2048, help="context length in tokens (default 2048)")
    parser.add_argument("--gpu-layers", default="auto", metavar="N|auto",
                        help="layers to offload to a GPU (default auto: all when a GPU is present)")
    parser.add_argument("--kv-type", choices=("f16", "q8_0", "q4_0"), default="f16",
                        help="KV cache type (default f16; q8_0/q4_0 halve or quarter its memory, flash attention on)")
    _lora_option(parser, "apply this GGUF LoRA adapter at SCALE (default 1; repeatable)")
    _rpc_argument(parser)


def _lora_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--lora", type=_lora_argument, action="append", metavar="FILE.gguf[:SCALE]", help=help_text)


def _rpc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpc", metavar="HOST:PORT[,HOST:PORT…]", action="append",
                        help="llama.cpp RPC workers (`qdesk worker`) that take a share of the layers by free memory; "
                             "trusted networks only (the protocol has no authentication or encryption)")


def _rpc_endpoints(args: argparse.Namespace) -> tuple[str, ...]:
    """The --rpc workers, with a warning on stderr for each that is not on this machine."""
    from qdesk.rpc.endpoints import exposure_warnings, parse_endpoints

    endpoints = parse_endpoints(args.rpc) if getattr(args, "rpc", None) else ()
    for warning in exposure_warnings(endpoints):
        print(f"qdesk: warning: {warning}", file=sys.stderr)
    return endpoints


def _lora_argument(text: str) -> object:
    from qdesk.chat.lora import parse_lora

    return parse_lora(text)


def _sampling(args: argparse.Namespace) -> tuple[SamplingOptions, LoadOptions]:
    from qdesk.chat.engine import LoadOptions, SamplingOptions

    if args.max_tokens < 1 or args.ctx < 16:
        raise UsageError("--max-tokens must be at least 1 and --ctx at least 16")
    return (SamplingOptions(temperature=args.temp, max_tokens=args.max_tokens, seed=args.seed),
            LoadOptions(n_ctx=args.ctx, n_gpu_layers=_gpu_layers(args), kv_type=args.kv_type,
                        rpc=_rpc_endpoints(args), loras=tuple(args.lora or ())))


def _gpu_layers(args: argparse.Namespace) -> int | str:
    """--gpu-layers as a number, or "auto"."""
    if args.gpu_layers == "auto":
        return "auto"
    try:
        return int(args.gpu_layers)
    except ValueError:
        raise UsageError(f"--gpu-layers takes a number or auto, not {args.gpu_layers!r}") from None


def _placed(model: Path, load: LoadOptions) -> LoadOptions:
    """With RPC workers: where the layers go, on stderr, and the options that put them there."""
    if not load.rpc:
        return load
    from qdesk.rpc.placement import place_layers

    placement = place_layers(model, load)
    print(placement.render(), file=sys.stderr)
    for warning in placement.warnings():
        print(f"qdesk: warning: {warning}", file=sys.stderr)
    return placement.load_options


def _run_chat(args: argparse.Namespace) -> int:
    from qdesk.chat.engine import load_model

    sampling, load = _sampling(args)
    with load_model(args.model, _placed(args.model, load)) as model:
        if args.prompt is not None:
            _chat_turn(model, [{"role": "user", "content": args.prompt}], sampling, args.system)
            return EXIT_OK
        history: list[dict[str, str]] = []
        print(f"Chatting with {args.model.name}. Ctrl-C stops an answer; Ctrl-D or /exit leaves.", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return EXIT_OK
            if line.strip() in ("/exit", "/quit"):
                return EXIT_OK
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            answer = _chat_turn(model, history, sampling, args.system)
            history.append({"role": "assistant", "content": answer})


def _chat_turn(model: LoadedModel, messages: list[dict[str, str]], sampling: SamplingOptions,
               system: str | None) -> str:
    """One answer streamed to stdout; Ctrl-C stops the answer, not the program."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(model.chat, messages, sampling, system=system,
                             on_token=lambda event: print(event.text, end="", flush=True))
        while not answer.done():
            try:
                answer.exception(timeout=0.05)
            except TimeoutError:
                continue
            except KeyboardInterrupt:
                model.stop()
        result = answer.result()
    print()
    stats = result.stats
    if sys.stderr.isatty():
        print(f"[{stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, first token after "
              f"{stats.time_to_first_token_s:.2f} s{', stopped' if stats.stop_reason == 'cancelled' else ''}]",
              file=sys.stderr)
    return result.text


def _run_compare(args: argparse.Namespace) -> int:
    from qdesk.chat.compare import MAX_VARIANTS, compare, render_comparison

    if not 2 <= len(args.models) <= MAX_VARIANTS:
        raise UsageError(f"compare takes 2 to {MAX_VARIANTS} models, not {len(args.models)}")
    from qdesk.chat.lora import parse_model_spec

    sampling, load = _sampling(args)
    specs = [parse_model_spec(text) for text in args.models]
    comparison = compare([path for path, _ in specs], args.prompt, system=args.system, sampling=sampling, load=load,
                         adapters=[loras for _, loras in specs])
    print(json.dumps(comparison.to_json(), indent=2) if args.json else render_comparison(comparison))
    failed = [answer for answer in comparison.answers if answer.error]
    if failed and not args.json:
        for answer in failed:
            print(f"qdesk: {answer.name}: {answer.error}", file=sys.stderr)
    return EXIT_USER_ERROR if len(failed) == len(comparison.answers) else EXIT_OK


def _run_models(args: argparse.Namespace) -> int:
    from qdesk.library.store import Library, render_text

    if args.rebuild and args.action != "scan":
        raise UsageError("--rebuild goes with `qdesk models scan`")
    if args.rebuild:
        library, kept = Library.rebuilt()
        if kept is not None:
            print(f"set the old index aside as {kept}")
    else:
        library = Library()
    if args.action == "list":
        library.ensure_starter()
        library.refresh()
        if args.json:
            print(json.dumps([entry.to_json() for entry in library.entries()], indent=2))
        else:
            print(render_text(library.groups()))
        return EXIT_OK
    if args.action == "scan":
        found = library.register_known_folders()
        print("registered: " + (", ".join(found) if found else "no Hugging Face, LM Studio or Ollama folders found"))
        return EXIT_OK
    if args.target is None:
        raise UsageError(f"`qdesk models {args.action}` needs a " + ("GGUF file" if args.action == "import" else
                                                                    "model name from `qdesk models list`"))
    if args.action == "import":
        entry = library.import_model(Path(args.target), link=args.link)
        print(f"imported {entry.id} ({entry.path})")
    elif args.action == "rename":
        group = library.group_of(args.target)
        library.rename_group(group.key, args.name or "")
        shown = next(found.name for found in library.model_groups() if found.key == group.key)
        print(f"the group of {args.target} ({len(group.entries)} files) is now shown as {shown}")
    else:
        library.remove(args.target)
        print(f"removed {args.target}")
    return EXIT_OK


def _run_download(args: argparse.Namespace) -> int:
    from qdesk.app.settings import apply_hub_settings, load_settings
    from qdesk.display.terminal import ProgressBar
    from qdesk.hub import (
        DownloadCancelled,
        add_to_library,
        download,
        list_repo,
        render_download,
        render_listing,
        render_search,
        search_models,
    )

    apply_hub_settings(load_settings())  # the desktop app's endpoint and cache, unless the environment sets them
    if args.search is not None:
        if args.repo_id is not None or args.limit < 1:
            raise UsageError("give either a repository or --search TEXT, and a --limit of at least 1")
        results = search_models(args.search, formats=args.format, sort=args.sort, limit=args.limit)
        print(json.dumps([result.to_json() for result in results], indent=2) if args.json else render_search(results))
        return EXIT_OK
    if args.repo_id is None:
        raise UsageError("give a repository (owner/name) to download, or --search TEXT")
    if args.list:
        listing = list_repo(args.repo_id, revision=args.revision)
        print(json.dumps(listing.to_json(), indent=2) if args.json else render_listing(listing))
        return EXIT_OK
    bar = ProgressBar("download")
    try:
        result = download(args.repo_id, include=args.include, revision=args.revision, progress=bar,
                          keep_partial=not args.discard_partial)
    except (DownloadCancelled, KeyboardInterrupt) as stopped:
        bar.close()
        print("qdesk: " + (str(stopped) if isinstance(stopped, DownloadCancelled) else
                           "download stopped; run the same command again to resume."), file=sys.stderr)
        return EXIT_CANCELLED
    bar.close()
    if result.offline_note:
        print(f"qdesk: {result.offline_note}", file=sys.stderr)
    library: dict[str, str] = {}
    if result.gguf_files and not args.no_library:
        try:
            entries = {entry.path.resolve(): entry.id for entry in add_to_library(result)}
        except UserError as error:
            print(f"qdesk: warning: the files were not added to the library: {error}", file=sys.stderr)
        else:
            library = {str(path): entries[path.resolve()] for path in result.gguf_files if path.resolve() in entries}
    if args.json:
        print(json.dumps({**result.to_json(), "library": library}, indent=2))
    else:
        print(render_download(result, library))
    return EXIT_OK


def _run_about(args: argparse.Namespace) -> int:
    from qdesk.app.about import about, render_about
    from qdesk.app.settings import load_settings

    info = about(models_folder=load_settings().models_path())
    print(json.dumps(info.to_json(), indent=2) if args.json else render_about(info))
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    from qdesk.app.demo import run_demo

    return run_demo()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdesk", description="Convert, quantize, measure and chat with local LLMs as GGUF files."
    )
    parser.add_argument("--version", action="version", version=f"qdesk {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(handler=handler)
        return sub

    gui = command("gui", "open the desktop app", _run_gui)
    gui.add_argument("--quit-after", type=float, metavar="SECONDS",
                     help="close the window after SECONDS (a smoke test of an installed bundle)")

    convert = command("convert", "convert a Hugging Face checkpoint (float or GPTQ/AWQ/compressed-tensors/"
                                 "bitsandbytes) or a PEFT LoRA adapter folder to GGUF", _run_convert)
    convert.add_argument("source", type=Path, metavar="SRC",
                         help="checkpoint folder (config.json + weights), or LoRA adapter folder (adapter_config.json)")
    convert.add_argument("-o", "--output", type=Path, metavar="OUT.gguf",
                         help="output file (default: GGUF naming convention, beside the checkpoint)")
    convert.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                         help="tensor type of the weight matrices (default: f16)")
    convert.add_argument("--base", type=Path, metavar="FOLDER",
                         help="for a LoRA adapter folder: the base model's checkpoint folder (default: the "
                              "adapter's base_model_name_or_path, here or in the Hugging Face cache)")
    convert.add_argument("--lora", type=_lora_argument, action="append", metavar="FILE.gguf[:SCALE]",
                         help="merge this GGUF LoRA adapter into the float output (repeatable; SRC may then also "
                              "be a float GGUF)")

    calibrate = command("calibrate", "compute an importance matrix (llama.cpp's imatrix GGUF format)", _run_calibrate)
    calibrate.add_argument("model", type=Path, metavar="MODEL.gguf")
    calibrate.add_argument("-o", "--output", type=Path, metavar="IMATRIX.gguf",
                           help="output file (default: MODEL.imatrix.gguf beside the model)")
    _calibration_arguments(calibrate)
    calibrate.add_argument("--legacy-dat", action="store_true",
                           help="write llama.cpp's older .dat format instead of GGUF")

    quantize = command("quantize", "quantize to a llama.cpp preset or a size budget", _run_quantize)
    quantize.add_argument("source", type=Path, metavar="SRC", help="an HF checkpoint folder or a GGUF file")
    quantize.add_argument("-o", "--output", type=Path, metavar="OUT.gguf",
                          help="output file (default: GGUF naming convention, beside the source)")
    quantize.add_argument("--lora", type=_lora_argument, action="append", metavar="FILE.gguf[:SCALE]",
                          help="merge this GGUF LoRA adapter into the float model before quantizing (repeatable; "
                               "needs -o)")
    budget = quantize.add_mutually_exclusive_group(required=True)
    budget.add_argument("--preset", metavar="NAME", help="a llama.cpp preset: " + ", ".join(PRESET_NAMES))
    budget.add_argument("--like", metavar="NAME", help="a sensitivity-based mix no larger than preset NAME")
    budget.add_argument("--target-size", metavar="SIZE", help="a sensitivity-based mix of at most SIZE (e.g. 95MB)")
    budget.add_argument("--target-bpw", type=float, metavar="X", help="a sensitivity-based mix of at most X bpw")
    budget.add_argument("--plan", type=Path, metavar="PLAN.json",
                        help="apply a per-tensor plan written by --plan-out (and perhaps edited)")
    quantize.add_argument("--imatrix", default="auto", metavar="FILE|auto|none",
                          help="importance matrix: auto (calibrate on the built-in or --text text; the default), "
                               "a file from `qdesk calibrate` or llama.cpp, or none")
    _calibration_arguments(quantize)
    quantize.add_argument("--plan-out", type=Path, metavar="PLAN.json", help="also write the per-tensor plan")
    quantize.add_argument("--mix-effort", choices=("fast", "default", "thorough"), default="default",
                          help="how finely a sensitivity mix probes the model (fast for large models)")
    quantize.add_argument("--encoder", choices=("ggml", "feedback"), default=None,
                          help="ggml: llama.cpp's rounding; feedback: rounding errors compensated within each row "
                               "against the calibration text's input correlations (default: feedback for a mix, "
                               "the plan's own for --plan, ggml for a preset)")
    quantize.add_argument("--awq", action="store_true",
                          help="activation-aware scaling: scale each matrix's input channels by their activations "
                               "before rounding, folded into the norms and matrices before them (an ordinary GGUF; "
                               "needs an importance matrix)")
    quantize.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all cores)")

    backends = command("backends", "the compute backends and devices llama.cpp can use here", _run_backends)
    backends.add_argument("--json", action="store_true", help="print one JSON document")

    evaluate = command("eval", "measure quantized candidates against their reference: quality, tasks, memory, speed",
                       _run_eval)
    evaluate.add_argument("candidates", type=Path, nargs="*", metavar="CAND.gguf", help="variants to measure")
    evaluate.add_argument("--ref", type=Path, required=True, metavar="REF.gguf",
                          help="the reference (F32/F16/BF16, or the best variant you have)")
    evaluate.add_argument("--text", type=Path, action="append", metavar="FILE",
                          help="evaluation text (repeatable; default: the built-in held-out text)")
    evaluate.add_argument("--chunks", type=int, metavar="N", help="at most N chunks (default: all of the text)")
    evaluate.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per chunk (default: 512)")
    evaluate.add_argument("--tasks", action="append", metavar="SUITE|FILE.jsonl",
                          help="also run task suites: json, arithmetic, facts, code, builtin (all four), or a JSONL "
                               "file (repeatable)")
    evaluate.add_argument("--threshold", type=float, default=5.0, metavar="PCT",
                          help="task degradation that still recommends deploy (default: 5%%)")
    evaluate.add_argument("--speed", action="store_true", help="also measure prompt and generation tokens/s")
    evaluate.add_argument("--memory-ctx", type=int, default=4096, metavar="N",
                          help="context length for the memory estimate (default: 4096; 0: no estimate)")
    evaluate.add_argument("--report", type=Path, metavar="OUT.html",
                          help="also write a self-contained HTML report and the JSON behind it (OUT.json)")
    evaluate.add_argument("--no-cache", action="store_true",
                          help="do not keep the reference's distributions in the cache for later runs")
    evaluate.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all cores)")
    evaluate.add_argument("--gpu-layers", type=int, default=0, metavar="N", help="layers to offload (default 0)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON document")
    _lora_option(evaluate, "apply this GGUF LoRA adapter at SCALE (default 1; repeatable) to every model eval loads, "
                 "the reference and each candidate, so the figures are what quantization costs the adapted model; "
                 "an adapter that does not fit one of them stops eval before any model is loaded")
    _rpc_argument(evaluate)

    chat = command("chat", "chat with a model (interactive, or one answer with --prompt)", _run_chat)
    chat.add_argument("model", type=Path, metavar="MODEL.gguf")
    chat.add_argument("--prompt", help="answer this one prompt and exit")
    _generation_arguments(chat)
    chat.add_argument("--temp", type=float, default=0.7, help="temperature (default 0.7; 0 is deterministic)")

    compare = command("compare", "one prompt through several models, answers side by side", _run_compare)
    compare.add_argument("models", nargs="+", metavar="MODEL.gguf",
                         help="2 to 4 variants; MODEL.gguf+ADAPTER.gguf[:SCALE] is the model with that LoRA adapter, "
                              "so the same base can answer with and without it")
    compare.add_argument("--prompt", required=True)
    _generation_arguments(compare)
    compare.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: deterministic)")
    compare.add_argument("--json", action="store_true", help="print one JSON document")

    info = command("info", "describe a GGUF file", _run_info)
    info.add_argument("file", type=Path, metavar="FILE.gguf", nargs="?")
    info.add_argument("--backends", action="store_true", help="describe the compute backends instead of a file")
    info.add_argument("--json", action="store_true", help="print one JSON document")
    info.add_argument("--types", action="store_true",
                      help="also show each matrix's type as bits per weight by tensor class and layer")
    info.add_argument("--ctx", type=int, default=4096, metavar="N",
                      help="context length for the memory estimate (default: 4096; 0: the model's trained context)")
    info.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                      help="layers on the GPU for the memory estimate, as llama.cpp counts them (default: 0; -1: all)")
    info.add_argument("--kv-type", choices=("f16", "q8_0", "q4_0"), default="f16",
                      help="KV cache type for the memory estimate (default: f16)")
    info.add_argument("--ram", metavar="SIZE", help="RAM to check the fit against, e.g. 16GB (default: available now)")
    info.add_argument("--vram", metavar="SIZE",
                      help="VRAM to check the fit against, e.g. 8GiB (default: free on this machine's GPUs)")
    _rpc_argument(info)

    models = command("models", "the local model library", _run_models)
    models.add_argument("action", choices=("list", "import", "rm", "scan", "rename"),
                        help="scan registers the Hugging Face cache, LM Studio and Ollama folders read-only; rename "
                             "names the group (the model) a file belongs to")
    models.add_argument("target", nargs="?", help="import: a GGUF file; rm, rename: a model's name from `models list`")
    models.add_argument("name", nargs="?", help="rename: the group's new name (none: back to the files' own name)")
    models.add_argument("--link", action="store_true", help="import: link the file instead of copying it")
    models.add_argument("--json", action="store_true", help="list: print one JSON document")
    models.add_argument("--rebuild", action="store_true",
                        help="scan: set the index aside (it is kept, renamed) and index the models folder again")

    download = command("download", "download from the Hugging Face Hub into its cache (resumable), list a "
                       "repository's files, or search the Hub", _run_download)
    download.add_argument("repo_id", nargs="?", metavar="REPO_ID", help="a model repository, owner/name")
    download.add_argument("--include", action="append", metavar="GLOB",
                          help="only the files matching GLOB, e.g. '*Q4_K_M*' (repeatable; default: every file)")
    download.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    download.add_argument("--list", action="store_true",
                          help="show the files, GGUF types and whether each fits this machine; download nothing")
    download.add_argument("--discard-partial", action="store_true",
                          help="on Ctrl-C or an error, delete the partial file (default: keep it to resume)")
    download.add_argument("--no-library", action="store_true",
                          help="do not add the downloaded GGUF files to the model library")
    download.add_argument("--search", metavar="TEXT", help="search the Hub for models instead of downloading")
    download.add_argument("--format", choices=("gguf", "safetensors", "any"), default="any",
                          help="search: GGUF files, safetensors checkpoints or either (default: any)")
    download.add_argument("--sort", choices=("downloads", "recent"), default="downloads",
                          help="search: most downloaded or most recently updated first (default: downloads)")
    download.add_argument("--limit", type=int, default=20, metavar="N", help="search: at most N results")
    download.add_argument("--json", action="store_true", help="print one JSON document")

    serve = command("serve", "an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions) over "
                    "library variants", _run_serve)
    serve.add_argument("models", nargs="*", metavar="MODEL",
                       help="library names or GGUF files to offer (default: every usable model in the library)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only; another needs --api-key)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0: any free port)")
    serve.add_argument("--api-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every request (default: $QDESK_API_KEY)")
    serve.add_argument("--cors", action="append", metavar="ORIGIN",
                       help="let web pages from ORIGIN call the API (repeatable; default: none)")
    serve.add_argument("--ctx", type=int, default=4096, help="context length per model in tokens (default 4096)")
    serve.add_argument("--memory", metavar="SIZE", help="memory the loaded models may take together by the estimate "
                       "(default: what is available at start); the least recently used are unloaded to make room")
    serve.add_argument("--threads", type=int, metavar="N", help="CPU threads per model (default: all cores)")
    serve.add_argument("--gpu-layers", default="auto", metavar="N|auto",
                       help="layers to offload to a GPU (default auto: all when a GPU is present)")
    serve.add_argument("--kv-type", choices=("f16", "q8_0", "q4_0"), default="f16", help="KV cache type")
    serve.add_argument("--quiet", action="store_true", help="do not print a line per request")
    _lora_option(serve, "apply this GGUF LoRA adapter at SCALE (default 1; repeatable) to every model served; a "
                 "model it does not fit fails to load with a sentence saying so")
    _rpc_argument(serve)

    worker = command("worker", "a llama.cpp RPC worker: this machine holds layers of a model run elsewhere "
                     "(trusted networks only: no authentication, no encryption)", _run_worker)
    worker.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every network)")
    worker.add_argument("--port", type=int, default=50052, help="port to listen on (default 50052)")
    worker.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all cores)")
    worker.add_argument("--mem", metavar="SIZE", help="report at most SIZE free (e.g. 8GiB), so clients place no "
                        "more than that here (default: the memory free now)")

    command("demo", "the whole flow on the bundled starter model", _run_demo)
    about = command("about", "versions, compute backends, and where qdesk keeps its settings, models, caches and log",
                    _run_about)
    about.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["gui", *(["--debug"] if args.debug else [])])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.handler(args)
    except (Cancelled, KeyboardInterrupt):
        print("qdesk: cancelled; nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except UsageError as error:
        parser.error(str(error))
    except BrokenPipeError as error:
        if not _stdout_gone():
            return _internal_error(error, args.debug)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # whoever read stdout stopped (`| head`)
        return EXIT_USER_ERROR
    except UserError as error:  # NativeError included
        if args.debug:
            traceback.print_exc()
        print(f"qdesk: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:  # an unexpected failure still gets one sentence; --debug shows why
        return _internal_error(error, args.debug)


def _internal_error(error: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(error)
    print(f"qdesk: internal error ({type(error).__name__}: {error}); run again with --debug and report the "
          "traceback.", file=sys.stderr)
    return EXIT_USER_ERROR


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone away."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or no real stdout
        return False
