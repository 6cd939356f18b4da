"""The ``servelm`` command: each subsystem registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules exposing ``register(subparsers)``; each adds its commands.
COMMAND_MODULES = ["servelm.terminal", "servelm.server.cli", "servelm.rag.cli", "servelm.engine.quant.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servelm", description="servelm: a production LLM serving stack")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=os.environ.get("SERVELM_LOG_LEVEL", "WARNING"))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # ModelLoadError and bad settings: a message, not a traceback
        print(f"servelm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
