"""FSDP x sequence-parallel training (fsdp=4 x sequence=2: video tokens split over devices, Ulysses attention
in the forward and the backward) gives the single-device losses (<= 1e-5 relative)."""

from __future__ import annotations

import pytest

from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.testing.tiny_checkpoints import write_random_dit
from tests.test_train_sharded import _run, check_sharded_run


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_random_dit(tmp_path_factory.mktemp("dit"), "tiny", seed=2)


def test_fsdp_sequence_losses_equal_one_device(dit_dir):
    single = _run(dit_dir, None)[0]
    check_sharded_run(dit_dir, single, make_mesh(MeshConfig(fsdp=4, sequence=2)))
