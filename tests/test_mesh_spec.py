"""Mesh specs from users: parsing, the checks that run before any weight is read, and the default mesh."""

import jax
import pytest

from fastvideo_jax.errors import UserError
from fastvideo_jax.parallel.mesh import MeshConfig
from fastvideo_jax.parallel.spec import default_mesh_config, parse_mesh_spec, resolve_mesh


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2,sequence=4") == MeshConfig(data=2, sequence=4)
    assert parse_mesh_spec(" fsdp = -1 , tensor=2 ") == MeshConfig(fsdp=-1, tensor=2)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=2,seq=4", "unknown axis 'seq'"),
        ("data=two", "size of 'data' is 'two', not an integer"),
        ("data=0", "size of 'data' must be a positive integer"),
        ("data=2,data=2", "axis 'data' given twice"),
        ("data", "'data' is not axis=size"),
        ("", "names no axis"),
    ],
)
def test_bad_spec_strings(spec, message):
    with pytest.raises(UserError, match=message):
        parse_mesh_spec(spec)


def test_sizes_must_divide_the_device_count():
    with pytest.raises(UserError, match="needs 3 devices .* does not divide the 8 devices"):
        resolve_mesh("sequence=3")
    with pytest.raises(UserError, match="needs 16 devices"):
        resolve_mesh("data=2,sequence=8")
    with pytest.raises(UserError, match="at most one axis may be -1"):
        resolve_mesh("data=-1,sequence=-1")


def test_heads_must_divide_tensor_times_sequence():
    with pytest.raises(UserError, match="12 attention heads do not divide over mesh tensor=1 x sequence=8"):
        resolve_mesh("sequence=8", num_heads=12)
    with pytest.raises(UserError, match="tensor=2 x sequence=4 = 8"):
        resolve_mesh("tensor=2,sequence=4", num_heads=12)


def test_resolved_mesh_shapes():
    mesh = resolve_mesh("data=2,sequence=4", num_heads=12)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
    assert dict(resolve_mesh("data=2,sequence=-1").shape)["sequence"] == 4
    assert resolve_mesh("data=1") is None  # one device: no mesh
    assert mesh.devices.size == len(jax.devices()) == 8
    assert resolve_mesh("sequence=2").devices.size == 2  # a divisor of the device count uses that many


def test_default_mesh_puts_cfg_on_data_and_the_rest_on_sequence(caplog):
    assert default_mesh_config(8, num_heads=12) == MeshConfig(data=2, fsdp=1, sequence=4)
    assert default_mesh_config(8, num_heads=40) == MeshConfig(data=2, sequence=4)
    assert default_mesh_config(8, num_heads=10) == MeshConfig(data=2, fsdp=2, sequence=2)
    assert default_mesh_config(8, num_heads=16, use_cfg=False) == MeshConfig(data=1, sequence=8)
    assert default_mesh_config(1) == MeshConfig()
    with caplog.at_level("WARNING", logger="fastvideo_jax.parallel.spec"):
        mesh = resolve_mesh(None, num_heads=12)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
    assert "no mesh given: using data=2,fsdp=1,tensor=1,sequence=4 on 8 devices" in caplog.text
