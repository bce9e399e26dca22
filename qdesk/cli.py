"""The `qdesk` command line: the headless face of the app (see docs/cli.md for the contract)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from native.errors import NativeError
from qdesk import __version__
from qdesk.errors import Cancelled, NotYetAvailable, UserError

if TYPE_CHECKING:
    from converters.calibration import CalibrationText

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130

Handler = Callable[[argparse.Namespace], int]
PRESET_NAMES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


class UsageError(Exception):
    """Arguments argparse accepted but that do not make sense together (exit status 2)."""


def _not_yet(command: str, issue: str) -> Handler:
    def handler(_: argparse.Namespace) -> int:
        raise NotYetAvailable(f"`qdesk {command}` is not yet available in this version; it arrives with {issue}.")

    return handler


def _run_convert(args: argparse.Namespace) -> int:
    from converters.convert import convert_checkpoint
    from qdesk.terminal import ProgressBar

    bar = ProgressBar("convert")
    try:
        result = convert_checkpoint(args.source, args.output, outtype=args.outtype, progress=bar)
    finally:
        bar.close()
    print(f"wrote {result.path} ({result.bytes_written / 1e6:.1f} MB, {result.tensor_count} tensors)")
    return EXIT_OK


def _run_info(args: argparse.Namespace) -> int:
    from qdesk.info import read_model_info, render_text

    if args.backends:
        return _run_backends(args)
    if args.file is None:
        raise UsageError("give a GGUF file to describe, or --backends")
    info = read_model_info(args.file)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print(render_text(info))
    return EXIT_OK


def _run_backends(args: argparse.Namespace) -> int:
    from native.backends import discover, render_text

    system = discover()
    print(json.dumps(system.to_json(), indent=2) if args.json else render_text(system))
    return EXIT_OK


def _calibration_arguments(parser: argparse.ArgumentParser) -> None:
    from converters.calibration import DEFAULT_CHUNKS, DEFAULT_CTX

    parser.add_argument("--text", type=Path, action="append", metavar="FILE",
                        help="calibration text from your task (repeatable; default: the built-in mixed text)")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS,
                        help=f"chunks of text to evaluate (default: {DEFAULT_CHUNKS})")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per chunk (default: {DEFAULT_CTX})")
    parser.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                        help="layers to offload to a GPU while calibrating (default: 0, CPU only)")


def _calibration_texts(args: argparse.Namespace) -> list[CalibrationText] | None:
    from converters.calibration import read_text_file

    return [read_text_file(path) for path in args.text] if args.text else None


def _run_calibrate(args: argparse.Namespace) -> int:
    from converters.calibration import calibrate
    from converters.imatrix import write_legacy_imatrix
    from qdesk.terminal import ProgressBar

    suffix = ".imatrix.dat" if args.legacy_dat else ".imatrix.gguf"
    output = args.output or args.model.with_name(args.model.stem + suffix)
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
    from converters.plan import QuantPlan
    from converters.quantize import quantize
    from qdesk.terminal import ProgressBar

    recipe = QuantPlan.load(args.plan) if args.plan is not None else args.preset
    if recipe is None:
        raise NotYetAvailable("--like, --target-size and --target-bpw are not yet available; they arrive with the "
                              "sensitivity-based mix, so use --preset NAME for now.")
    bar = ProgressBar("quantize")
    try:
        result = quantize(args.source, args.output, recipe, args.imatrix, texts=_calibration_texts(args),
                          chunks=args.chunks, ctx=args.ctx, gpu_layers=args.gpu_layers, threads=args.threads,
                          plan_out=args.plan_out,
                          progress=bar)
    finally:
        bar.close()
    for warning in result.warnings:
        print(f"qdesk: warning: {warning}", file=sys.stderr)
    matrix = f", importance matrix: {result.imatrix.origin}" if result.imatrix else ", no importance matrix"
    types = ", ".join(f"{count} {name}" for name, count in result.plan.type_counts().items())
    print(f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.plan.bits_per_weight:.2f} bpw; "
          f"{types}{matrix})")
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    from qdesk.demo import run_demo

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

    command("gui", "open the desktop app", _not_yet("gui", "the desktop app"))

    convert = command("convert", "convert a Hugging Face checkpoint folder to GGUF", _run_convert)
    convert.add_argument("source", type=Path, metavar="SRC", help="checkpoint folder (config.json + weights)")
    convert.add_argument("-o", "--output", type=Path, metavar="OUT.gguf",
                         help="output file (default: GGUF naming convention, beside the checkpoint)")
    convert.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                         help="tensor type of the weight matrices (default: f16)")

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
    quantize.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all cores)")

    backends = command("backends", "the compute backends and devices llama.cpp can use here", _run_backends)
    backends.add_argument("--json", action="store_true", help="print one JSON document")

    evaluate = command("eval", "measure candidates against a reference", _not_yet("eval", "evaluation"))
    evaluate.add_argument("candidates", type=Path, nargs="*")
    evaluate.add_argument("--ref", type=Path)
    evaluate.add_argument("--text", type=Path, action="append")
    evaluate.add_argument("--chunks", type=int)
    evaluate.add_argument("--ctx", type=int)
    evaluate.add_argument("--tasks")
    evaluate.add_argument("--json", action="store_true")

    chat = command("chat", "chat with a model", _not_yet("chat", "the engine"))
    chat.add_argument("model", type=Path)
    chat.add_argument("--prompt")
    chat.add_argument("--system")
    chat.add_argument("--temp", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--max-tokens", type=int)

    compare = command("compare", "one prompt through several models", _not_yet("compare", "the engine"))
    compare.add_argument("models", type=Path, nargs="*")
    compare.add_argument("--prompt")
    compare.add_argument("--system")
    compare.add_argument("--seed", type=int)
    compare.add_argument("--max-tokens", type=int)
    compare.add_argument("--json", action="store_true")

    info = command("info", "describe a GGUF file", _run_info)
    info.add_argument("file", type=Path, metavar="FILE.gguf", nargs="?")
    info.add_argument("--backends", action="store_true", help="describe the compute backends instead of a file")
    info.add_argument("--json", action="store_true", help="print one JSON document")

    models = command("models", "the local model library", _not_yet("models", "the model library"))
    models.add_argument("action", choices=("list", "import", "rm"))
    models.add_argument("target", nargs="?")
    models.add_argument("--json", action="store_true")

    download = command("download", "download from the Hugging Face Hub", _not_yet("download", "hub support"))
    download.add_argument("repo_id")
    download.add_argument("--include", action="append")
    download.add_argument("--revision")

    command("demo", "the whole flow on the bundled starter model", _run_demo)
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
    except (UserError, NativeError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"qdesk: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:  # an unexpected failure still gets one sentence; --debug shows why
        if args.debug:
            traceback.print_exc()
        print(
            f"qdesk: internal error ({type(error).__name__}: {error}); run again with --debug "
            "and report the traceback.",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
