"""Torch-free safetensors IO agrees with the reference library (bf16 included) and rejects bad files."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvideo_jax.models.loader.safetensors_io import (
    CheckpointError,
    SafetensorsCheckpoint,
    SafetensorsFile,
    find_safetensors,
    save_safetensors,
)


def test_reads_what_torch_writes_bf16_included(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2).half(),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    for k, t in tensors.items():
        ours = f.get(k)
        ref = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert ours.shape == tuple(t.shape)
        np.testing.assert_array_equal(ours.astype(np.float64) if k == "b" else ours, ref)
    assert f.get("b").dtype == ml_dtypes.bfloat16


def test_torch_reads_what_we_write(tmp_path):
    arrs = {"x": np.random.rand(4, 3).astype(np.float32), "y": np.arange(5, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    save_safetensors(tmp_path / "o.safetensors", arrs, metadata={"format": "pt"})
    back = load_file(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(back["x"].numpy(), arrs["x"])
    np.testing.assert_array_equal(back["y"].float().numpy(), arrs["y"].astype(np.float32))


def test_sharded_index(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = SafetensorsCheckpoint.from_dir(tmp_path)
    assert sorted(ckpt) == ["a", "b"] and ckpt["b"].shape == (3,)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        find_safetensors(tmp_path)


def test_duplicate_key_across_files(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="appears in both"):
        SafetensorsCheckpoint.from_dir(tmp_path)


def test_empty_dir_and_bad_entries(tmp_path):
    with pytest.raises(CheckpointError, match=r"no weight files \(\*\.safetensors, or PyTorch \*\.bin pickles\)"):
        find_safetensors(tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="'w' has 8 bytes"):
        SafetensorsFile(tmp_path / "bad.safetensors")
