"""Loads the PyTorch StepVideo oracle files from the installed ``diffsynth`` / ``fastvideo`` wheels by path.

The wheels are installed with ``--no-deps`` (tests/requirements-oracles.txt); their package ``__init__`` files
import dependencies we do not install, so each needed file is imported as a submodule of a synthetic package
whose ``__path__`` is the wheel's folder. Test-only.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _package_dir(dist: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(dist)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"oracle package {dist!r} is not installed: pip install --no-deps -r tests/requirements-oracles.txt")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def _load(alias: str, folder: Path, module: str):
    if alias not in sys.modules:
        package = types.ModuleType(alias)
        package.__path__ = [str(folder)]
        sys.modules[alias] = package
    return importlib.import_module(f"{alias}.{module}")


def diffsynth_module(name: str):
    """``diffsynth.models.<name>`` (stepvideo_dit, stepvideo_text_encoder, stepvideo_vae) without diffsynth's init."""
    import transformers.modeling_utils as modeling_utils

    # diffsynth 1.1.9 imports PretrainedConfig from transformers.modeling_utils, where Transformers 4 re-exported
    # it; Transformers 5 keeps it only at the top level. Same class, so the oracle is unchanged.
    if not hasattr(modeling_utils, "PretrainedConfig"):
        import transformers

        modeling_utils.PretrainedConfig = transformers.PretrainedConfig
    return _load("_oracle_diffsynth_models", _package_dir("diffsynth", "models"), name)


def fastvideo_file(*parts: str) -> Path:
    """Path of a file inside the installed fastvideo 0.1.7 wheel (read it, or parse it, for facts)."""
    return _package_dir("fastvideo", *parts)


def diffsynth_flow_scheduler(**kwargs):
    """diffsynth's ``FlowMatchScheduler`` (``diffsynth.schedulers.flow_match``), as its StepVideo pipeline builds
    it by default: ``FlowMatchScheduler(sigma_min=0.0, extra_one_step=True, shift=13.0, reverse_sigmas=True,
    num_train_timesteps=1)`` (``kwargs`` override)."""
    module = _load("_oracle_diffsynth_schedulers", _package_dir("diffsynth", "schedulers"), "flow_match")
    args = dict(sigma_min=0.0, extra_one_step=True, shift=13.0, reverse_sigmas=True, num_train_timesteps=1)
    return module.FlowMatchScheduler(**{**args, **kwargs})
