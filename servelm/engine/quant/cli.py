"""`servelm quantize --report MODEL`: print the precision ladder for a model."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the `quantize` sub-command to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("quantize", help="weight bytes per precision (FP32 ... NF4-DQ) for a model")
    p.add_argument("--report", metavar="MODEL", nargs="?", const="default", required=True,
                   help="GGUF file, HF directory, 'dummy:<shape>' (e.g. dummy:llama-2-7b) or 'default' (embedded SmolLM2)")
    p.add_argument("--group-size", type=int, default=None, help="group size for int4/nf4 (default: per source)")
    p.add_argument("--include-lm-head", action="store_true", help="quantize lm_head too")
    p.add_argument("--measure", action="store_true", help="also load and quantize the model to measure bytes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Prints the ladder; returns 0, or 2 with a message on stderr for a bad model or option."""
    from servelm.engine.models.config import ModelLoadError

    from .report import format_ladder, ladder

    model = None if args.report == "default" else args.report
    try:
        r = ladder(model, args.group_size, args.include_lm_head, args.measure)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"servelm quantize: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if args.json else format_ladder(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m servelm.engine.quant.cli --report MODEL`)."""
    parser = argparse.ArgumentParser(prog="servelm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quantize", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
