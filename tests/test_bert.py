"""BERT text encoder (StepVideo's bilingual "HunyuanClip"): parity with Transformers' ``BertModel`` (fp32, noised
odd tiny config, right padding, batch > 1, every hidden state), the pooler dropped on load, compile discipline,
sharded load, config errors, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tests.oracles import add_noise, errors

from fastvideo_jax.configs.models.encoders.bert import BERT_PRESETS, BertArchConfig, BertEncoderConfig, bert_preset
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, TextEncoder
from fastvideo_jax.models.encoders.bert import BertModel
from fastvideo_jax.models.loader.component_loader import TextEncoderLoader
from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint

TINY = dict(BERT_PRESETS["tiny"])
TOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> SimpleNamespace:
    """The noised tiny Transformers BertModel (with its pooler) saved with save_pretrained, and ours from it."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    ref = add_noise(transformers.BertModel(transformers.BertConfig(**TINY)).eval(), seed=10)
    ref.save_pretrained(root / "bert")
    ours = TextEncoderLoader().load(root / "bert", precision="fp32")
    return SimpleNamespace(torch=ref, dir=root / "bert", ours=ours)


def _batch(length=15, valid=(15, 9, 4), seed=0):
    """Right-padded rows as BertTokenizer pads them: [CLS] ids [SEP], then pad id 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, TINY["vocab_size"], (len(valid), length)).astype(np.int64)
    ids[:, 0] = 1
    mask = (np.arange(length)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
    return np.where(mask > 0, ids, TINY["pad_token_id"]), mask


def _torch(model, **inputs):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, output_hidden_states=True)
    return out.last_hidden_state.numpy(), tuple(h.numpy() for h in out.hidden_states)


def _compare(got: BaseEncoderOutput, want, what: str) -> None:
    """Every hidden state at every position (padded ones included: StepVideo's DiT attends to all 77) within TOL."""
    last, hidden = want
    assert len(got.hidden_states) == len(hidden) == 1 + TINY["num_hidden_layers"], what
    pairs = [("last_hidden_state", got.last_hidden_state, last)]
    pairs += [(f"hidden_states[{i}]", g, w) for i, (g, w) in enumerate(zip(got.hidden_states, hidden))]
    for field, g, w in pairs:
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"{what}: {field} shape {g.shape} vs {w.shape}"
        err, rel = errors(g, w)
        assert err <= TOL, f"{what}: {field} max-abs {err:.3g}, relative {rel:.3g}"


def test_parity_padded_batch(ckpt):
    model = ckpt.ours
    assert isinstance(model, TextEncoder) and isinstance(model, BertModel)
    assert model.embeddings.word_embeddings.embedding[...].dtype == jnp.float32
    ids, mask = _batch()
    out = model(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    _compare(out, _torch(ckpt.torch, input_ids=ids, attention_mask=mask), "right-padded")
    np.testing.assert_array_equal(out.attention_mask, mask)
    assert out.pooler_output is None
    plain = model(jnp.asarray(ids), jnp.asarray(mask))
    assert plain.hidden_states is None
    np.testing.assert_array_equal(plain.last_hidden_state, out.last_hidden_state)


def test_parity_without_mask(ckpt):
    ids, _ = _batch(length=11, valid=(11, 11), seed=1)
    out = ckpt.ours(jnp.asarray(ids), output_hidden_states=True)
    _compare(out, _torch(ckpt.torch, input_ids=ids), "no mask")
    assert out.attention_mask is None


def test_padded_keys_are_hidden(ckpt):
    """A real token's state is the same whatever the padded positions hold (the key mask hides them)."""
    ids, mask = _batch(valid=(15, 6), seed=3)
    other = np.where(mask > 0, ids, 7)
    a = ckpt.ours(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
    b = ckpt.ours(jnp.asarray(other), jnp.asarray(mask)).last_hidden_state
    np.testing.assert_allclose(np.asarray(a)[mask > 0], np.asarray(b)[mask > 0], atol=1e-6)
    assert not np.allclose(np.asarray(a)[mask == 0], np.asarray(b)[mask == 0], atol=1e-3)


def test_pooler_and_buffers_are_dropped(ckpt, tmp_path):
    """The checkpoint's pooler (saved by BertModel) is dropped; a pooler-less checkpoint loads the same model;
    a ``BertForMaskedLM`` checkpoint (``bert.`` prefix, ``cls.`` head) loads as its encoder."""
    saved = SafetensorsCheckpoint.from_dir(ckpt.dir)
    assert "pooler.dense.weight" in saved
    no_pool = transformers.BertModel(ckpt.torch.config, add_pooling_layer=False).eval()
    no_pool.load_state_dict({k: v for k, v in ckpt.torch.state_dict().items() if not k.startswith("pooler.")})
    no_pool.save_pretrained(tmp_path / "nopool")
    ids, mask = _batch(seed=4)
    got = TextEncoderLoader().load(tmp_path / "nopool", precision="fp32")(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(got.last_hidden_state, ckpt.ours(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state)
    mlm = transformers.BertForMaskedLM(ckpt.torch.config).eval()
    mlm.bert.load_state_dict(no_pool.state_dict())
    mlm.save_pretrained(tmp_path / "mlm")
    config = json.loads((tmp_path / "mlm" / "config.json").read_text())
    (tmp_path / "mlm" / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert any(k.startswith("cls.") for k in SafetensorsCheckpoint.from_dir(tmp_path / "mlm"))
    got = TextEncoderLoader().load(tmp_path / "mlm", precision="fp32")(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(got.last_hidden_state, ckpt.ours(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state)


def test_second_eager_call_does_not_compile(ckpt, count_compiles):
    ids, mask = _batch(seed=6)
    first = ckpt.ours(jnp.asarray(ids), jnp.asarray(mask))
    with count_compiles() as compiles:
        second = ckpt.ours(jnp.asarray((ids + 1) % TINY["vocab_size"]), jnp.asarray(mask))
    assert compiles[0] == 0, f"a second eager call with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first.last_hidden_state, second.last_hidden_state)


def test_fp32_runs_every_matmul_at_highest_precision(ckpt, matmul_precisions):
    found = matmul_precisions(ckpt.ours, *(jnp.asarray(a) for a in _batch()))
    # Per layer (scanned: traced once): q, k, v, two attention einsums, attention output, intermediate, output.
    assert len(found) >= 8 and set(found) == {"HIGHEST"}, f"{len(found)} matmuls at {set(found)}"


def test_sharded_load_matches(ckpt):
    """Loaded on 8 devices (fsdp 4 x tensor 2): weights split (heads over tensor), same states."""
    from jax.sharding import PartitionSpec

    from fastvideo_jax.parallel.activations import mesh_scope
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    model = TextEncoderLoader().load(ckpt.dir, mesh=mesh, precision="fp32")
    q = model.encoder.layer.attention.self.query.kernel[...]  # (layers, embed 24, heads 24)
    assert q.sharding.spec[2] == "tensor", q.sharding.spec
    ids, mask = (jnp.asarray(a) for a in _batch(length=16, valid=(16, 8, 3, 9), seed=7))
    with mesh_scope(mesh):
        got = model(ids, mask)
    err, rel = errors(got.last_hidden_state, ckpt.ours(ids, mask).last_hidden_state)
    assert err <= TOL, f"sharded vs one device: max-abs {err:.3g}, relative {rel:.3g}"
    assert PartitionSpec is not None


def test_bad_inputs_are_user_errors(ckpt):
    with pytest.raises(UserError, match=r"input_ids must be \(batch, length <= 23\), got \(5,\)"):
        ckpt.ours(jnp.zeros((5,), jnp.int32))
    with pytest.raises(UserError, match=r"input_ids must be \(batch, length <= 23\), got \(1, 24\)"):
        ckpt.ours(jnp.zeros((1, 24), jnp.int32))
    with pytest.raises(UserError, match=r"attention_mask \(1, 5\) must have input_ids' shape \(1, 6\)"):
        ckpt.ours(jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(UserError, match=r"BertModel does not support attention backend 'cudnn'"):
        BertModel(BertEncoderConfig(arch_config=bert_preset("tiny"), attention_backend="cudnn"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad,match", [
    (dict(num_attention_heads=5), "hidden_size=24 is not a multiple of num_attention_heads=5"),
    (dict(hidden_act="tanh"), "hidden_act 'tanh' unsupported"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key' is not implemented"),
    (dict(is_decoder=True), "a decoder BERT"),
])
def test_config_errors_are_specific(bad, match):
    with pytest.raises(ValueError, match=match):
        BertArchConfig().update_model_arch({**TINY, **bad})


def test_hunyuan_clip_preset_reads_cleanly(caplog):
    """The real config.json's every key is a field (no 'not used' warning) and gives the 24 x 1024 encoder."""
    cfg = bert_preset("hunyuan-clip")
    assert "not used" not in caplog.text
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.vocab_size) == (1024, 24, 64, 47020)
