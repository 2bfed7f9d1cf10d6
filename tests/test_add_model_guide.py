"""docs/add_model.md followed literally: its code blocks become a toy DiT family in a temporary package (at most
three files), its registry line registers it, a PyTorch original defined here is saved with save_pretrained and
loaded through TransformerLoader (parity), the family runs through the registered WanPipeline (parity with
diffusers' WanPipeline on the same components), and every pitfall in the guide's checklist raises the error the
guide quotes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from einops import rearrange

from fastvideo_jax.entrypoints.model_spec import ModelSpec
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.models import registry
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from tests.oracles import add_noise, errors, tiny_wan_parts

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "add_model.md"
ARCH = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=8, text_dim=32, freq_dim=32,
            num_layers=2, patch_size=(1, 2, 2))


# ---- what the guide says --------------------------------------------------------------------------------------
def guide_blocks() -> tuple[dict[str, str], str]:
    """The guide's ``# file: NAME`` blocks (name -> source) and its ``# registry line`` block."""
    files, registry_line = {}, None
    for block in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            files[first.removeprefix("# file: ").strip()] = rest
        elif first.strip() == "# registry line":
            registry_line = rest
    return files, registry_line


def guide_pitfalls() -> dict[str, str]:
    """Pitfall id -> the error text the guide quotes (``...`` separates pieces that appear in that order)."""
    rows = re.findall(r"^\| (P\d+) \| .*? \| `(.+)`.*\|$", GUIDE.read_text(), flags=re.M)
    return dict(rows)


def matches_quote(quote: str, text: str) -> bool:
    pos = 0
    for piece in (p.strip() for p in quote.split("...")):
        found = text.find(piece, pos)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


# ---- the PyTorch original (what a checkpoint of the toy family holds) ----------------------------------------
def _torch_classes():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.cache_utils import CacheMixin
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

        def forward(self, x, context):
            def split(t):
                return rearrange(t, "b l (n e) -> b n l e", n=self.heads)

            out = nn.functional.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                                             split(self.to_v(context)))
            return self.to_out(rearrange(out, "b n l e -> b l (n e)"))

    class Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
            self.attn1, self.attn2 = Attention(dim, heads), Attention(dim, heads)
            self.ff = nn.Module()
            self.ff.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x, context, temb):
            h = self.norm1(x) + temb[:, None]
            x = x + self.attn1(h, h)
            x = x + self.attn2(self.norm2(x), context)
            return x + self.ff.net(self.norm3(x))

    class ToyVideoTransformer(ModelMixin, ConfigMixin, CacheMixin):
        @register_to_config
        def __init__(self, in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=8,
                     text_dim=32, freq_dim=32, num_layers=2, patch_size=(1, 2, 2)):
            super().__init__()
            dim, p = num_attention_heads * attention_head_dim, math.prod(patch_size)
            self.patch_embedding = nn.Linear(in_channels * p, dim)
            self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.text_proj = nn.Linear(text_dim, dim)
            self.blocks = nn.ModuleList([Block(dim, num_attention_heads) for _ in range(num_layers)])
            self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
            self.proj_out = nn.Linear(dim, out_channels * p)

        def forward(self, hidden_states, timestep, encoder_hidden_states, attention_kwargs=None, return_dict=True):
            pt, ph, pw = self.config.patch_size
            B, C, F, H, W = hidden_states.shape
            x = self.patch_embedding(rearrange(hidden_states, "b c (f pt) (h ph) (w pw) -> b (f h w) (pt ph pw c)",
                                               pt=pt, ph=ph, pw=pw))
            half = self.config.freq_dim // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            args = timestep.float()[:, None] * freqs
            temb = self.time_embedding(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
            context = self.text_proj(encoder_hidden_states)
            for block in self.blocks:
                x = block(x, context, temb)
            out = rearrange(self.proj_out(self.norm_out(x)), "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                            f=F // pt, h=H // ph, w=W // pw, pt=pt, ph=ph, pw=pw)
            return (out,)

    return ToyVideoTransformer


# ---- the toy family, written from the guide -------------------------------------------------------------------
@contextlib.contextmanager
def toy_package(directory: Path, edits: dict[str, list[tuple[str, str]]] | None = None):
    """The guide's files written into ``directory`` (each edited by (old, new) replacements that must apply),
    importable as top-level modules while the context lasts; the registry is restored after it."""
    files, _ = guide_blocks()
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        for old, new in (edits or {}).get(name, []):
            assert old in source, f"edit {old!r} does not apply to {name}: the guide changed"
            source = source.replace(old, new)
        (directory / name).write_text(source)
    names = [Path(n).stem for n in files]
    saved_modules = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    entries = dict(registry.ModelRegistry._entries)
    kinds = {k: dict(v) for k, v in registry._KINDS.items()}
    sys.path.insert(0, str(directory))
    try:
        yield directory
    finally:
        sys.path.remove(str(directory))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved_modules)
        registry.ModelRegistry._entries.clear()
        registry.ModelRegistry._entries.update(entries)
        for k, v in kinds.items():
            registry._KINDS[k].clear()
            registry._KINDS[k].update(v)


def register_from_guide() -> None:
    _, line = guide_blocks()
    exec(line, {"register_model": registry.register_model})  # noqa: S102 - the guide's own line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A diffusers WanPipeline whose transformer is the noised toy original, saved with save_pretrained."""
    from diffusers import WanPipeline

    torch.manual_seed(0)
    transformer = add_noise(_torch_classes()(**ARCH).eval(), seed=1)
    pipe = WanPipeline(transformer=transformer, **tiny_wan_parts())
    root = tmp_path_factory.mktemp("toy_pipe")
    pipe.save_pretrained(root)
    return root, pipe


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 6, 10, generator=g)
    return x, torch.tensor([900.0, 3.0]), torch.randn(2, 7, 32, generator=g)


def test_guide_is_at_most_three_files_and_one_registry_line():
    files, line = guide_blocks()
    assert 1 <= len(files) <= 3, f"the guide's family takes {len(files)} files"
    assert line is not None and len([s for s in line.splitlines() if s.strip()]) == 1


def test_guide_family_loads_with_parity(checkpoint, tmp_path):
    root, pipe = checkpoint
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = pipe.transformer(x, t, ctx)[0].numpy()
    with toy_package(tmp_path / "pkg"):
        register_from_guide()
        model = TransformerLoader().load(root / "transformer", precision="fp32")
        ours = model(hidden_states=jnp.asarray(x.numpy()), encoder_hidden_states=jnp.asarray(ctx.numpy()),
                     timestep=jnp.asarray(t.numpy()))
    err, rel = errors(ours, ref)
    assert err < 1e-4, f"toy DiT vs its PyTorch original: max-abs {err:.3e}, relative {rel:.3e}"


def test_guide_family_runs_in_the_registered_pipeline(checkpoint, tmp_path):
    root, pipe = checkpoint
    request = dict(negative_prompt="blurry", height=32, width=48, num_frames=5, num_inference_steps=3,
                   guidance_scale=4.0)
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = pipe(prompt="a toy", max_sequence_length=16, latents=latents.clone(), output_type="latent",
                   **request).frames.float().numpy()
    with toy_package(tmp_path / "pkg"):
        register_from_guide()
        gen = VideoGenerator.from_pretrained(root, dit_precision="fp32", vae_decode_precision="fp32", text_len=16,
                                             flow_shift=3.0)
        out = gen.generate_video("a toy", latents=latents.numpy(), progress=False, **request)
    assert type(gen.pipeline).__name__ == "WanPipeline" and type(gen.pipeline.transformer).__name__ == "ToyDiT"
    err, rel = errors(out["latents"], ref)
    assert err < 1e-4, f"final latents vs diffusers' WanPipeline with the toy: max-abs {err:.3e}, relative {rel:.3e}"
    assert out["frames"].shape == (5, 32, 48, 3)


def _edit_config_json(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _pitfall_error(pitfall: str, checkpoint, tmp_path, caplog) -> str:
    """Make the pitfall's mistake and return what came of it: ``Type: message`` of the error, or the log."""
    root, _ = checkpoint
    transformer = root / "transformer"
    edits: dict[str, list[tuple[str, str]]] = {
        "P3": {"toy_dit.py": [("    config_class = ToyConfig\n", "")]},
        "P4": {"toy_dit.py": [("def __call__(self, hidden_states, encoder_hidden_states,",
                               "def __call__(self, hidden_states, context,"),
                              ("hidden_states, encoder_hidden_states, timestep)", "hidden_states, context, timestep)")]},
        "P5": {"toy_config.py": [('    (r"^time_embedding\\.0\\.(.*)$", r"time_embedding.fc_in.\\1"),\n', "")]},
        "P6": {"toy_config.py": [('    scanned_prefixes: tuple[str, ...] = internal(("blocks",))\n', "")]},
        "P8": {"toy_dit.py": [("        self.blocks = make_blocks(rngs)\n",
                               "        self.blocks = make_blocks(rngs)\n        self.extra = nnx.Param(jnp.zeros(4))\n")]},
        "P10": {"toy_config.py": [("    freq_dim: int = 32\n", "    frequency_dim: int = 32\n")],
                "toy_dit.py": [("cfg.freq_dim", "cfg.frequency_dim")]},
    }.get(pitfall, {})
    with toy_package(tmp_path / pitfall, edits):
        try:
            if pitfall == "P1":
                TransformerLoader().load(transformer)
            elif pitfall == "P2":
                registry.register_model("ToyVideoTransformer", "toy_dit:ToyDiT")
            elif pitfall in ("P3", "P4"):
                import toy_dit  # noqa: F401 - the class statement itself fails
            elif pitfall == "P7":
                register_from_guide()
                TransformerLoader().load(_edit_config_json(transformer, tmp_path / "t33", text_dim=33))
            elif pitfall == "P9":
                register_from_guide()
                TransformerLoader().load(transformer, attention_backend="SAGE_ATTN")
            elif pitfall == "P10":
                register_from_guide()
                with caplog.at_level(logging.WARNING):
                    TransformerLoader().load(transformer, precision="fp32")
                return caplog.text
            elif pitfall == "P11":
                index = tmp_path / "index"
                shutil.copytree(root, index)
                data = json.loads((index / "model_index.json").read_text())
                (index / "model_index.json").write_text(json.dumps({**data, "_class_name": "ToyPipeline"}))
                register_from_guide()
                ModelSpec.open(index)
            else:
                register_from_guide()
                TransformerLoader().load(transformer)
        except Exception as e:  # the pitfall's error, whatever its type: the guide names the type
            return f"{type(e).__name__}: {e}"
    return "(no error)"


@pytest.mark.parametrize("pitfall", sorted(guide_pitfalls(), key=lambda p: int(p[1:])))
def test_guide_pitfall_gives_the_documented_error(pitfall, checkpoint, tmp_path, caplog):
    quote = guide_pitfalls()[pitfall]
    got = _pitfall_error(pitfall, checkpoint, tmp_path, caplog)
    assert matches_quote(quote, got), f"{pitfall}: the guide says {quote!r}; got {got[:600]!r}"


def test_pitfall_checklist_is_complete():
    assert sorted(guide_pitfalls(), key=lambda p: int(p[1:])) == [f"P{i}" for i in range(1, 12)]
