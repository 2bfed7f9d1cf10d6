"""The ``fastvideo-jax`` command: ``convert`` (weights), ``generate`` (video), ``preprocess`` (training data),
``train`` (finetune a DiT).

Known errors (``fastvideo_jax.errors.UserError``: bad input, checkpoint or path; a missing file) print one
line ``error: ...`` and exit 2; ``--debug`` or ``FASTVIDEO_JAX_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from converters import ConversionError
from fastvideo_jax.entrypoints.convert_cli import add_convert_arguments, run_convert
from fastvideo_jax.errors import UserError, debug_env
from fastvideo_jax.utils.quiet import silence_known_noise

# Errors that are the user's to fix, printed as one line. OSError covers missing files, permissions, full disks.
KNOWN_ERRORS = (UserError, ConversionError, OSError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvideo-jax", description="FastVideo in JAX: convert weights, generate video.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a Diffusers pipeline to orbax checkpoints (or back)",
                          description="Convert every component of a pipeline: SRC is read only; DST appears only "
                          "when the whole conversion succeeded.")
    add_convert_arguments(conv)
    conv.set_defaults(run=run_convert)
    from fastvideo_jax.entrypoints.generate_cli import add_generate_parser

    add_generate_parser(sub)
    from fastvideo_jax.entrypoints.preprocess_cli import add_preprocess_parser

    add_preprocess_parser(sub)
    from fastvideo_jax.entrypoints.train_cli import add_train_parser

    add_train_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    silence_known_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KNOWN_ERRORS as e:
        if args.debug or debug_env():
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = str(e) if not isinstance(e, OSError) or not e.strerror else (
        f"{e.strerror}: {e.filename}" if e.filename else e.strerror)
    return " ".join(text.split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
