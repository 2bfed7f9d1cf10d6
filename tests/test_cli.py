"""The ``fastvideo-jax`` command's error contract: known errors are one line and exit 2; ``--debug`` or
``FASTVIDEO_JAX_DEBUG`` lets the exception (and its traceback) through."""

from __future__ import annotations

import pytest

from fastvideo_jax.entrypoints.cli import main
from fastvideo_jax.errors import CheckpointError, debug_env

BAD = ["convert", "/nonexistent/pipeline", "/tmp/fastvideo-jax-never-written"]


def test_known_error_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("FASTVIDEO_JAX_DEBUG", raising=False)
    assert main(BAD) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /nonexistent/pipeline: not a pipeline directory") and err.count("\n") == 1


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_lets_the_exception_through(how, monkeypatch):
    monkeypatch.delenv("FASTVIDEO_JAX_DEBUG", raising=False)
    argv = ["--debug", *BAD] if how == "flag" else BAD
    if how == "env":
        monkeypatch.setenv("FASTVIDEO_JAX_DEBUG", "1")
    with pytest.raises(CheckpointError, match="not a pipeline directory"):
        main(argv)


@pytest.mark.parametrize("value,expected", [("", False), ("0", False), ("no", False), ("False", False),
                                            ("1", True), ("yes", True)])
def test_debug_env_values(value, expected, monkeypatch):
    monkeypatch.setenv("FASTVIDEO_JAX_DEBUG", value)
    assert debug_env() is expected
