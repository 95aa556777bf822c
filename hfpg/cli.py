"""The ``hfpg`` command. ``hfpg config`` shows and validates training configs; training recipes arrive with
``hfpg train`` (issue 5)."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import ConfigError, PGConfig


def _config(args) -> int:
    if args.file is None and not args.overrides:
        sys.stdout.write(PGConfig.documented_yaml())
        return 0
    config = PGConfig.from_yaml(args.file, args.overrides) if args.file else PGConfig.from_dict({}, args.overrides)
    config.check_for(args.num_processes)
    sys.stdout.write(config.to_yaml())
    print(f"# valid for {args.num_processes} process(es): {config.num_mini_batches} minibatches of "
          f"{config.mini_batch_size} per step", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfpg", description="Policy-gradient RL for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"hfpg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "config",
        help="print the documented defaults, or validate a YAML config with key=value overrides",
        description="Without arguments: every config key with its default and one-line doc. With a file and/or "
                    "key=value overrides: the resolved config, or one clear error listing every problem.",
    )
    p.add_argument("file", nargs="?", help="a YAML file of PGConfig keys")
    p.add_argument("overrides", nargs="*", help="key=value pairs applied after the file (values parsed as YAML)")
    p.add_argument("--num-processes", type=int, default=1, help="check that batch sizes divide over N processes")
    p.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # `hfpg config k=v` (no file): argparse puts the first override in `file`
    if getattr(args, "file", None) and "=" in args.file and not args.file.endswith((".yaml", ".yml")):
        args.overrides = [args.file, *args.overrides]
        args.file = None
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
