"""LoRA: our saved files in diffusers, diffusers' (and original-format) files in ours, merge / unmerge, refusals,
adapter-only gradients. Oracle: diffusers' WanTransformer3DModel with peft adapters (noised A and B, alpha != r)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fastvideo_jax.errors import CheckpointError
from fastvideo_jax.models.layers.lora import (
    LORA_FILTER, LoRAParam, adapted_layers, inject_lora, linear_layers, merge_lora, remove_lora, set_lora_strength,
    unmerge_lora,
)
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.models.loader.lora_io import load_lora, read_lora, save_lora
from fastvideo_jax.models.loader.safetensors_io import SafetensorsFile, save_safetensors
from tests.oracles import dit_call, errors, tiny_wan_dit, torch_out

peft = pytest.importorskip("peft")
# peft flags 1-D lora_B biases in a state dict as possibly unsharded FSDP tensors; they are lora_bias vectors here
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out", "time_proj"]


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan")
    tiny_wan_dit(d)
    return d


@pytest.fixture
def ours(dit_dir):
    return TransformerLoader().load(dit_dir, precision="fp32")


def _torch_dit(dit_dir):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(dit_dir).eval()


def _wan_pipeline(dit_dir):
    """diffusers' WanPipeline around the tiny DiT (only its LoRA loader is exercised: no VAE / text encoder)."""
    from diffusers import WanPipeline

    return WanPipeline(transformer=_torch_dit(dit_dir), vae=None, text_encoder=None, tokenizer=None, scheduler=None)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 3, 6, 10, generator=g), torch.tensor([999.0, 300.0]), torch.randn(2, 7, 32, generator=g)


def _ours_out(model, inputs):
    return np.asarray(dit_call(model, *(jnp.asarray(t.numpy()) for t in inputs)))


@pytest.fixture(scope="module")
def diffusers_lora(dit_dir, tmp_path_factory):
    """A LoRA made with peft on diffusers' model (noised A, B and lora_B biases; alpha 6 on rank 4, one layer of
    rank 2, FFN out-projections at alpha 3; also the non-scanned proj_out and time_proj), saved by diffusers. Returns
    (folder, peft state dict, the LoRA'd diffusers model)."""
    from diffusers import WanPipeline

    model = _torch_dit(dit_dir)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, rank_pattern={"blocks.1.attn1.to_q": 2},
                             alpha_pattern={"ffn.net.2": 3}, lora_bias=True)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    state = peft.utils.get_peft_model_state_dict(model)
    folder = tmp_path_factory.mktemp("diffusers_lora")
    WanPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                  transformer_lora_adapter_metadata=config.to_dict())
    return folder, state, model


def _noise_adapters(model, seed=7):
    for i, linear in enumerate(adapted_layers(model).values()):
        for var in (linear.lora.lora_A, linear.lora.lora_B):
            var[...] = jax.random.normal(jax.random.key(seed * 100 + i), var[...].shape) * 0.1
            seed += 1


def test_saved_lora_loads_in_diffusers(dit_dir, ours, inputs, diffusers_lora, tmp_path):
    """Our file, read by diffusers' WanPipeline.load_lora_weights, gives diffusers' DiT our LoRA'd output (also
    after a diffusers LoRA with lora_B biases went through us: read, then saved)."""
    base = _ours_out(ours, inputs)
    paths = inject_lora(ours, rank=4, alpha=8, rngs=nnx.Rngs(3))  # scale 2: alpha must travel in the file
    assert "blocks.to_q" in paths and "blocks.ffn.fc_out" in paths and "blocks.attn2.to_k" in paths
    _noise_adapters(ours)
    out = _ours_out(ours, inputs)
    file = save_lora(ours, tmp_path / "lora")
    meta = json.loads(SafetensorsFile(file).metadata["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and "blocks.0.attn1.to_q" in meta["transformer.target_modules"]

    pipe = _wan_pipeline(dit_dir)
    pipe.load_lora_weights(tmp_path / "lora")
    ref = torch_out(pipe.transformer, *inputs)
    err, rel = errors(out, ref)
    assert rel <= 1e-4, f"ours vs diffusers with our LoRA: max-abs {err:.3e}, relative {rel:.3e}"
    assert errors(base, ref)[1] > 1e-2  # the LoRA changes the output: the check is not vacuous

    folder, _, model = diffusers_lora  # diffusers' LoRA (biases, mixed ranks, alpha patterns) through us
    remove_lora(ours)
    load_lora(ours, folder, merge=False)
    save_lora(ours, tmp_path / "again")
    pipe = _wan_pipeline(dit_dir)
    pipe.load_lora_weights(tmp_path / "again")
    err, rel = errors(torch_out(pipe.transformer, *inputs), torch_out(model, *inputs))
    assert rel <= 1e-5, f"diffusers' LoRA read and saved by us, in diffusers: max-abs {err:.3e}, relative {rel:.3e}"


def test_diffusers_lora_loads_in_ours(ours, inputs, diffusers_lora):
    folder, _, model = diffusers_lora
    ref = torch_out(model, *inputs)
    base = _ours_out(ours, inputs)
    assert load_lora(ours, folder, merge=False) is None
    assert ours.blocks.to_q.lora.rank == 4  # layer 1's rank-2 adapter is zero-padded into the stack
    np.testing.assert_allclose(np.asarray(ours.blocks.to_q.lora.scale[...]), [1.5, 3.0])  # 6/4, 6/2
    np.testing.assert_allclose(np.asarray(ours.blocks.ffn.fc_out.lora.scale[...]), [0.75, 0.75])  # 3/4
    out = _ours_out(ours, inputs)
    err, rel = errors(out, ref)
    assert rel <= 1e-4, f"ours vs diffusers with diffusers' LoRA: max-abs {err:.3e}, relative {rel:.3e}"
    assert errors(base, ref)[1] > 1e-2


def _to_original(state: dict, alpha: float) -> dict:
    """diffusers/peft LoRA names -> the original Wan layout (``diffusion_model.``, lora_down/up, ``.alpha``)."""
    table = (("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"), ("attn1.to_", "self_attn."),
             ("attn2.to_", "cross_attn."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
             ("proj_out", "head.head"), ("condition_embedder.time_proj", "time_projection.1"))
    out = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")
        for ours, theirs in table:
            module = module.replace(ours, theirs)
        down = kind.startswith("A")
        part = "diff_b" if kind == "B.bias" else f"lora_{'down' if down else 'up'}.weight"
        out[f"diffusion_model.{module}.{part}"] = value.numpy()
        if down and module.startswith("blocks."):  # diffusers' converter reads alphas on blocks only
            out[f"diffusion_model.{module}.alpha"] = np.asarray(alpha, np.float32)
    return out


def test_original_format_lora_matches_diffusers(dit_dir, ours, inputs, diffusers_lora, tmp_path):
    """An original-layout LoRA with alphas: ours (through lora_param_names_mapping) equals diffusers' own
    conversion of the same file."""
    _, state, _ = diffusers_lora
    file = tmp_path / "original.safetensors"
    save_safetensors(file, _to_original(state, alpha=5.0))
    load_lora(ours, file, merge=False)
    out = _ours_out(ours, inputs)
    pipe = _wan_pipeline(dit_dir)
    pipe.load_lora_weights(tmp_path, weight_name="original.safetensors")
    ref = torch_out(pipe.transformer, *inputs)
    err, rel = errors(out, ref)
    assert rel <= 1e-4, f"original-format LoRA: max-abs {err:.3e}, relative {rel:.3e}"


def _to_musubi(state: dict, alpha: float) -> dict:
    """diffusers/peft names -> musubi-tuner's (``lora_unet_blocks_0_self_attn_q.lora_down.weight``, ``.alpha``);
    blocks only, no biases (what diffusers' musubi converter takes)."""
    table = (("attn1.to_out.0", "self_attn_o"), ("attn2.to_out.0", "cross_attn_o"), ("attn1.to_", "self_attn_"),
             ("attn2.to_", "cross_attn_"), ("ffn.net.0.proj", "ffn_0"), ("ffn.net.2", "ffn_2"))
    out = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")
        if not module.startswith("blocks.") or kind == "B.bias":
            continue
        for ours, theirs in table:
            module = module.replace(ours, theirs)
        module = "lora_unet_" + module.replace(".", "_")
        down = kind.startswith("A")
        out[f"{module}.lora_{'down' if down else 'up'}.weight"] = value.numpy()
        if down:
            out[f"{module}.alpha"] = np.asarray(alpha, np.float32)
    return out


def test_musubi_lora_matches_diffusers(dit_dir, ours, inputs, diffusers_lora, tmp_path):
    """A kohya/musubi-tuner Wan LoRA: ours (lora_param_names_mapping rows) equals diffusers' conversion."""
    _, state, _ = diffusers_lora
    save_safetensors(tmp_path / "musubi.safetensors", _to_musubi(state, alpha=3.0))
    load_lora(ours, tmp_path / "musubi.safetensors", merge=False)
    assert ours.blocks.attn2.to_out.lora is not None and ours.proj_out.lora is None
    out = _ours_out(ours, inputs)
    pipe = _wan_pipeline(dit_dir)
    pipe.load_lora_weights(tmp_path, weight_name="musubi.safetensors")
    err, rel = errors(out, torch_out(pipe.transformer, *inputs))
    assert rel <= 1e-4, f"musubi LoRA: max-abs {err:.3e}, relative {rel:.3e}"


def test_merge_equals_separate_and_unmerge_restores_exact_weights(ours, inputs, diffusers_lora):
    folder, _, _ = diffusers_lora
    kernels = {p: np.asarray(m.kernel[...]) for p, m in linear_layers(ours).items()}
    load_lora(ours, folder, merge=False, strength=0.7)
    separate = _ours_out(ours, inputs)
    saved = merge_lora(ours)
    assert set(saved.kernels) == set(adapted_layers(ours))
    merged = _ours_out(ours, inputs)
    err, rel = errors(merged, separate)
    assert rel <= 1e-5, f"merged vs separate: max-abs {err:.3e}, relative {rel:.3e}"
    assert not np.array_equal(np.asarray(ours.blocks.to_q.kernel[...]), kernels["blocks.to_q"])
    unmerge_lora(ours, saved)
    for p, m in linear_layers(ours).items():
        np.testing.assert_array_equal(np.asarray(m.kernel[...]), kernels[p], err_msg=p)
    np.testing.assert_array_equal(_ours_out(ours, inputs), separate)  # unmerged again: the same forward
    set_lora_strength(ours, 0.0)
    remove_lora(ours)
    assert not adapted_layers(ours)


def test_strength_scales_the_delta(ours, inputs, diffusers_lora):
    folder, _, _ = diffusers_lora
    base = _ours_out(ours, inputs)
    load_lora(ours, folder, merge=False, strength=1.0)
    one = _ours_out(ours, inputs)
    set_lora_strength(ours, 0.0)
    np.testing.assert_allclose(_ours_out(ours, inputs), base, rtol=0, atol=1e-6)
    assert errors(one, base)[1] > 1e-2


def test_other_architecture_refused_with_names(ours, tmp_path):
    """A HunyuanVideo LoRA (and a Wan LoRA of another size) is refused naming the tensors, model untouched."""
    kernels = {p: np.asarray(m.kernel[...]) for p, m in linear_layers(ours).items()}
    r = np.zeros((4, 24), np.float32)
    hunyuan = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": r,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": r.T.copy(),
               "transformer.single_transformer_blocks.3.proj_mlp.lora_A.weight": r}
    save_safetensors(tmp_path / "hunyuan.safetensors", hunyuan)
    with pytest.raises(CheckpointError, match="match no layer") as e:
        read_lora(tmp_path / "hunyuan.safetensors", ours)
    for key in hunyuan:
        assert key in str(e.value)
    bigger = {"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 5120), np.float32),
              "transformer.blocks.0.attn1.to_q.lora_B.weight": np.zeros((5120, 4), np.float32),
              "transformer.blocks.7.attn1.to_q.lora_A.weight": np.zeros((4, 24), np.float32)}
    save_safetensors(tmp_path / "wan14b.safetensors", bigger)
    with pytest.raises(CheckpointError, match=r"blocks\.7\.attn1\.to_q\.lora_A\.weight"):  # no layer 7 here
        load_lora(ours, tmp_path / "wan14b.safetensors")
    del bigger["transformer.blocks.7.attn1.to_q.lora_A.weight"]
    save_safetensors(tmp_path / "wan14b.safetensors", bigger)
    with pytest.raises(CheckpointError, match=r"shapes do not fit.*\[4, 5120\]"):
        load_lora(ours, tmp_path / "wan14b.safetensors")
    save_safetensors(tmp_path / "diff.safetensors", {"diffusion_model.blocks.0.self_attn.q.diff": r})
    with pytest.raises(CheckpointError, match=r"not supported.*self_attn\.q\.diff \(full weight delta"):
        load_lora(ours, tmp_path / "diff.safetensors")
    assert not adapted_layers(ours)
    for p, m in linear_layers(ours).items():
        np.testing.assert_array_equal(np.asarray(m.kernel[...]), kernels[p])


def test_training_over_lora_filter_touches_only_adapters(ours, inputs):
    """Gradients over LORA_FILTER are adapters only; AdamW steps on them lower the loss and leave every base
    weight bit for bit."""
    import optax

    inject_lora(ours, rank=2, rngs=nnx.Rngs(0))
    assert not nnx.to_flat_state(nnx.state(ours, nnx.All(nnx.Param, LORA_FILTER)))  # no adapter is an nnx.Param
    x, t, ctx = (jnp.asarray(a.numpy()[:1]) for a in inputs)
    x = x[:, :, :1, :4, :4]

    def loss(model):
        return jnp.mean(model.forward(x, t, ctx) ** 2)

    base = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    opt = nnx.Optimizer(ours, optax.adamw(1e-2), wrt=LORA_FILTER)

    @nnx.jit
    def step(model, opt):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LORA_FILTER))(model)
        opt.update(model, grads)
        return value, grads

    value, grads = step(ours, opt)
    leaves = nnx.to_flat_state(grads)
    assert leaves and all(isinstance(v, LoRAParam) for _, v in leaves)
    names = {".".join(map(str, p)) for p, _ in leaves}
    assert "blocks.to_q.lora.lora_B" in names and "blocks.ffn.fc_in.lora.lora_A" in names
    assert float(jnp.abs(grads["blocks"]["to_q"]["lora"]["lora_B"][...]).max()) > 0  # B starts at 0: it moves first
    losses = [float(value)] + [float(step(ours, opt)[0]) for _ in range(3)]
    assert losses[-1] < losses[0], losses
    for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v[...]), base[p], err_msg=str(p))
    assert float(jnp.abs(ours.blocks.to_q.lora.lora_B[...]).max()) > 0


def test_adapters_sharded_like_their_kernels_and_mesh_equals_one_device(dit_dir, inputs, diffusers_lora):
    """On a data x fsdp x tensor mesh: A takes the kernel's input-axis sharding, B its output axis, the rank
    axis replicated; the LoRA'd forward equals the one-device one."""
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
    from fastvideo_jax.parallel.rules import DIT_RULES

    folder, _, _ = diffusers_lora
    one = TransformerLoader().load(dit_dir, precision="fp32")
    load_lora(one, folder, merge=False)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = TransformerLoader().load(dit_dir, precision="fp32", mesh=mesh, rules=DIT_RULES)
    load_lora(sharded, folder, merge=False)
    for path in ("blocks.to_q", "blocks.to_out", "blocks.ffn.fc_in", "proj_out"):
        linear = linear_layers(sharded)[path]
        k = tuple(linear.kernel[...].sharding.spec) + (None,) * 3
        lead = k[:linear.kernel[...].ndim - 2]
        n = len(lead)
        a_spec = tuple(linear.lora.lora_A[...].sharding.spec) + (None,) * 3
        b_spec = tuple(linear.lora.lora_B[...].sharding.spec) + (None,) * 3
        assert a_spec[: n + 2] == (*lead, k[n], None), (path, a_spec, k)
        assert b_spec[: n + 2] == (*lead, None, k[n + 1]), (path, b_spec, k)
    assert any(s is not None for s in tuple(sharded.blocks.to_q.lora.lora_A[...].sharding.spec))  # really sharded
    err, rel = errors(_ours_out(sharded, inputs), _ours_out(one, inputs))
    assert rel <= 1e-5, f"mesh vs one device with a LoRA: max-abs {err:.3e}, relative {rel:.3e}"
