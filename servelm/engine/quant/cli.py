"""`servelm quantize [--model MODEL]`: print the precision ladder (weight bytes per precision) for a model."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the `quantize` sub-command to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("quantize", help="weight bytes per precision (FP32 ... NF4-DQ) for a model")
    p.add_argument("--model", default=None,
                   help="GGUF file, HF directory or 'dummy:<shape>', e.g. dummy:llama-2-7b (default: the embedded SmolLM2)")
    # `--report [MODEL]`, the spelling before --model: the report is what this command prints
    p.add_argument("--report", metavar="MODEL", nargs="?", const="default", default=None, help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, default=None, help="group size for int4/nf4 (default: per source)")
    p.add_argument("--include-lm-head", action="store_true", help="quantize lm_head too (default: kept in the source precision)")
    p.add_argument("--measure", action="store_true", help="also load and quantize the model to measure bytes (default: computed from the shapes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Prints the ladder; returns 0, or 2 with a message on stderr for a bad model or option."""
    from servelm.engine.models.config import ModelLoadError

    from .report import format_ladder, ladder

    model = args.model or args.report
    model = None if model == "default" else model
    try:
        r = ladder(model, args.group_size, args.include_lm_head, args.measure)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"servelm quantize: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if args.json else format_ladder(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m servelm.engine.quant.cli [--model MODEL]`)."""
    parser = argparse.ArgumentParser(prog="servelm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quantize", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
