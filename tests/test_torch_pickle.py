"""The torch-free reader of ``torch.save`` zip checkpoints: files written by real ``torch.save`` read bit for bit
(every dtype, strided views, shared storages, a module's state dict, sharded index), pickles naming any other
global refused before anything runs, the legacy format refused; Transformers ``pytorch_model.bin`` components load
through our loaders (and ``fastvideo-jax convert``) exactly as their safetensors do."""

from __future__ import annotations

import json
import os
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tests.oracles import add_noise

from fastvideo_jax.configs.models.encoders.bert import BERT_PRESETS
from fastvideo_jax.configs.models.encoders.clip import CLIP_TEXT_PRESETS
from fastvideo_jax.models.loader.component_loader import TextEncoderLoader
from fastvideo_jax.models.loader.safetensors_io import CheckpointError, SafetensorsCheckpoint, find_safetensors
from fastvideo_jax.models.loader.torch_pickle import ALLOWED_GLOBALS, TorchPickleFile

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as unsigned integers of its width (compares bf16 / fp8 / NaN payloads exactly)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.numpy().view(np.uint8)
    return t.view(_BITS[t.element_size()]).numpy()


def _same_bits(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    assert got.shape == tuple(want.shape), f"{what}: shape {got.shape} vs {tuple(want.shape)}"
    width = np.dtype(f"u{got.dtype.itemsize}") if got.dtype != np.bool_ else np.uint8
    np.testing.assert_array_equal(np.array(got, order="C").view(width), _bits(want).view(width), err_msg=what)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    shared = torch.randn(24, generator=g)
    return {
        "fp32": torch.randn(3, 4, generator=g),
        "fp16": torch.randn(6, generator=g).half(),
        "bf16": torch.randn(2, 3, 5, generator=g).bfloat16(),
        "fp64": torch.randn(4, generator=g).double(),
        "fp8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "int64": torch.arange(-5, 7),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "transposed": base.t(),  # stride (1, 7)
        "sliced": base[1:4, 2:6],  # storage offset 9, stride (7, 1)
        "stepped": base[::2, ::3],  # stride (14, 3)
        "shared_a": shared[:12].view(3, 4),  # two tensors on one storage
        "shared_b": shared[6:].view(2, 9),
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
    }


def test_every_dtype_and_layout_bit_for_bit(tmp_path):
    tensors = _tensors()
    torch.save(tensors, tmp_path / "w.bin")
    f = TorchPickleFile(tmp_path / "w.bin")
    assert f.keys() == list(tensors)
    assert f.tensors["sliced"].offset == 9 and f.tensors["transposed"].stride == (1, 7)
    assert f.tensors["shared_a"].record == f.tensors["shared_b"].record
    assert f.tensors["bf16"].nbytes == 2 * 30
    for key, want in tensors.items():
        got = f.read(key)
        assert got.flags.c_contiguous and got.dtype.itemsize == want.element_size(), key
        _same_bits(got, want, f"read {key}")
        view = f.get(key)
        assert not view.flags.writeable
        _same_bits(view, want, f"get {key}")
    assert str(f.read("bf16").dtype) == "bfloat16" and str(f.read("fp8").dtype) == "float8_e4m3fn"


def test_module_state_dict_through_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Conv1d(6, 2, 3))
    module.register_buffer("steps", torch.tensor(7))
    state = module.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    ckpt = SafetensorsCheckpoint.from_dir(tmp_path)
    assert list(ckpt) == list(state) and ckpt["2.weight"].shape == (2, 6, 3)
    assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in state.values())
    for key, want in state.items():
        _same_bits(ckpt.read(key), want, key)
        _same_bits(ckpt.array(key), want, key)


def test_sharded_index(tmp_path, caplog):
    a, b = {"a": torch.randn(3, 2)}, {"b": torch.arange(4.0).bfloat16()}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    torch.save({"junk": torch.ones(1)}, tmp_path / "not_listed.bin")  # the index decides which files are shards
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with caplog.at_level("INFO", logger="fastvideo_jax.models.loader.safetensors_io"):
        ckpt = SafetensorsCheckpoint.from_dir(tmp_path)
    assert sorted(ckpt) == ["a", "b"]
    _same_bits(ckpt.read("a"), a["a"], "a")
    _same_bits(ckpt.read("b"), b["b"], "b")
    logged = [r.getMessage() for r in caplog.records if "PyTorch pickle" in r.getMessage()]
    assert len(logged) == 1 and "restricted unpickler" in logged[0] and "2 PyTorch pickle" in logged[0]
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="lists shard files that do not exist.*00002-of-00002.bin"):
        find_safetensors(tmp_path)


def test_safetensors_preferred_over_pickles(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert find_safetensors(tmp_path) == [tmp_path / "model.safetensors"]


class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func, named", [(os.system, f"{os.system.__module__}.system"), (eval, "builtins.eval")])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, func, named):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w')"
    torch.save({"w": torch.ones(2), "evil": _Payload(func, arg)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"refused to unpickle: it names the global {named}.*nothing was "
                                              "executed"):
        SafetensorsCheckpoint.from_dir(tmp_path)
    assert not marker.exists()
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)  # the check above can fail: torch runs it
    assert marker.exists()


def _archive(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")


def test_pickle_cannot_change_the_allowed_stand_ins(tmp_path):
    """BUILD on an allowed global (here the FloatStorage stand-in) would change how later files are read."""
    before = repr(ALLOWED_GLOBALS[("torch", "FloatStorage")])
    payload = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."
    _archive(tmp_path / "x.bin", payload)
    with pytest.raises(CheckpointError, match="tries to set the state of _StorageClass"):
        TorchPickleFile(tmp_path / "x.bin")
    assert repr(ALLOWED_GLOBALS[("torch", "FloatStorage")]) == before


def test_bad_files_are_clear_errors(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy.bin: not a zip-format torch.save file.*legacy pre-1.6"):
        TorchPickleFile(tmp_path / "legacy.bin")
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "nested.bin")
    with pytest.raises(CheckpointError, match=r"nested.bin: entries \['model'\] are not tensors"):
        TorchPickleFile(tmp_path / "nested.bin")
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        TorchPickleFile(tmp_path / "list.bin")
    torch.save({"w": torch.ones(4)}, tmp_path / "w.bin")
    raw = (tmp_path / "w.bin").read_bytes()
    with zipfile.ZipFile(tmp_path / "w.bin") as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        payload = z.read(pkl)
    _archive(tmp_path / "norecord.bin", payload)  # the storage record is missing
    with pytest.raises(CheckpointError, match="storage record archive/data/0 is missing"):
        TorchPickleFile(tmp_path / "norecord.bin")
    with zipfile.ZipFile(tmp_path / "w.bin") as z:
        members = {n: z.read(n) for n in z.namelist()}
    prefix = pkl.removesuffix("data.pkl")
    for name, edit, message in [
            ("big.bin", {prefix + "byteorder": b"big"}, "stored 'big'-endian; only little-endian"),
            ("past.bin", {pkl: payload.replace(b"K\x04\x85", b"K\x05\x85")},  # size (4,) -> (5,)
             r"tensor 'w' \(size \(5,\), stride \(1,\), offset 0\) reaches past its storage of 4 elements")]:
        with zipfile.ZipFile(tmp_path / name, "w", zipfile.ZIP_STORED) as z:
            for member, data in {**members, **edit}.items():
                z.writestr(member, data)
        with pytest.raises(CheckpointError, match=message):
            TorchPickleFile(tmp_path / name)
    (tmp_path / "cut.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cut.bin"):
        TorchPickleFile(tmp_path / "cut.bin")
    with pytest.raises(CheckpointError, match="nested.bin: not a directory"):
        find_safetensors(tmp_path / "nested.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no weight files \(\*\.safetensors, or PyTorch \*\.bin pickles\)"):
        find_safetensors(empty)


def _same_state(a: SafetensorsCheckpoint, b: SafetensorsCheckpoint) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a.read(key), b.read(key), err_msg=key)


def _save_pretrained_bin(model, directory, shards: int = 1) -> None:
    """What Transformers 4's ``save_pretrained(safe_serialization=False)`` wrote (Transformers 5 always writes
    safetensors): config.json and ``torch.save`` of the state dict, split into ``pytorch_model-0000i-of-0000n.bin``
    listed by ``pytorch_model.bin.index.json`` when sharded."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind, shards", [("bert", 1), ("clip", 3)])
def test_transformers_bin_component_loads_like_safetensors(tmp_path, kind, shards):
    torch.manual_seed(0)
    if kind == "bert":
        ref = transformers.BertModel(transformers.BertConfig(**BERT_PRESETS["tiny"]))
    else:
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_TEXT_PRESETS["tiny"]))
    ref = add_noise(ref.eval(), seed=5)
    ref.save_pretrained(tmp_path / "st")
    _save_pretrained_bin(ref, tmp_path / "bin", shards)
    assert len(find_safetensors(tmp_path / "bin")) == shards
    _same_state(SafetensorsCheckpoint.from_dir(tmp_path / "st"), SafetensorsCheckpoint.from_dir(tmp_path / "bin"))
    from_st = TextEncoderLoader().load(tmp_path / "st", precision="fp32")
    from_bin = TextEncoderLoader().load(tmp_path / "bin", precision="fp32")
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 60, (2, 9)))
    mask = jnp.ones((2, 9), jnp.int32)
    got, want = from_bin(ids, mask).last_hidden_state, from_st(ids, mask).last_hidden_state
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_convert_accepts_a_bin_component(tmp_path):
    from fastvideo_jax.entrypoints.convert_cli import convert

    torch.manual_seed(0)
    ref = add_noise(transformers.BertModel(transformers.BertConfig(**BERT_PRESETS["tiny"])).eval(), seed=6)
    src = tmp_path / "src"
    (src / "text_encoder").mkdir(parents=True)
    _save_pretrained_bin(ref, src / "text_encoder")
    (src / "model_index.json").write_text(json.dumps({"_class_name": "BinForTest",
                                                      "text_encoder": ["transformers", "BertModel"]}))
    dst = convert(src, tmp_path / "dst", to="diffusers", progress=False)
    written = load_file(dst / "text_encoder" / "model.safetensors")
    state = ref.state_dict()
    assert written and set(written) <= set(state)
    for key, got in written.items():
        np.testing.assert_array_equal(got, state[key].numpy(), err_msg=key)
    assert sorted(p.name for p in (src / "text_encoder").iterdir()) == ["config.json", "pytorch_model.bin"]
