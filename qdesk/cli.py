"""The `qdesk` command line: the headless face of the app (see docs/cli.md for the contract)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from qdesk import __version__
from qdesk.errors import Cancelled, NotYetAvailable, UserError

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130

Handler = Callable[[argparse.Namespace], int]


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

    info = read_model_info(args.file)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print(render_text(info))
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

    calibrate = command("calibrate", "compute an importance matrix", _not_yet("calibrate", "the native bridge"))
    calibrate.add_argument("model", type=Path)
    calibrate.add_argument("-o", "--output", type=Path)
    calibrate.add_argument("--text", type=Path, action="append")
    calibrate.add_argument("--chunks", type=int)
    calibrate.add_argument("--ctx", type=int)

    quantize = command("quantize", "quantize to a llama.cpp preset or a size budget",
                       _not_yet("quantize", "the native bridge"))
    quantize.add_argument("source", type=Path)
    quantize.add_argument("-o", "--output", type=Path)
    budget = quantize.add_mutually_exclusive_group()
    budget.add_argument("--preset")
    budget.add_argument("--like")
    budget.add_argument("--target-size")
    budget.add_argument("--target-bpw", type=float)
    quantize.add_argument("--imatrix")
    quantize.add_argument("--text", type=Path, action="append")
    quantize.add_argument("--plan-out", type=Path)

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
    info.add_argument("file", type=Path, metavar="FILE.gguf")
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
    except UserError as error:
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
