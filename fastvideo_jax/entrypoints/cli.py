"""The ``fastvideo-jax`` command: ``convert`` (weights) and ``generate`` (video)."""

from __future__ import annotations

import argparse
import sys

from converters.cli import add_convert_arguments, run_convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvideo-jax", description="FastVideo in JAX: convert weights, generate video.")
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a Diffusers pipeline to orbax checkpoints (or back)",
                          description="Convert every component of a pipeline: SRC is read only; DST appears only "
                          "when the whole conversion succeeded.")
    add_convert_arguments(conv)
    conv.set_defaults(run=run_convert)
    try:
        from fastvideo_jax.entrypoints.generate_cli import add_generate_parser
    except ImportError:
        pass
    else:
        add_generate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
