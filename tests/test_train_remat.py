"""Remat of the DiT's scanned blocks: the same loss and gradients, and a remat primitive only when asked for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.testing.tiny_checkpoints import write_random_dit
from fastvideo_jax.training.objective import FlowMatchObjective
from fastvideo_jax.training.optim import OptimConfig
from fastvideo_jax.training.trainer import Trainer


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_random_dit(tmp_path_factory.mktemp("dit"), "tiny", seed=0)


def _clips(seed=0, n=2):
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((n, 16, 2, 4, 4)).astype(np.float32),
            "prompt_embeds": rng.standard_normal((n, 8, 32)).astype(np.float32)}


def test_remat_gives_the_same_gradients(dit_dir):
    """remat="full" recomputes each block in the backward: same loss and gradients, and the differentiated
    jaxpr holds a remat (checkpoint) primitive only then."""
    clips = _clips()
    grads = {}
    for remat in ("none", "full"):
        model = TransformerLoader().load(dit_dir, precision="fp32", remat=remat)
        trainer = Trainer(model, FlowMatchObjective(), OptimConfig())
        params = trainer.split.master_params()
        batch = {k: jnp.asarray(v) for k, v in clips.items()}
        fn = jax.value_and_grad(trainer.loss_fn)
        jaxpr = str(jax.make_jaxpr(fn)(params, batch["latents"], batch["prompt_embeds"], jax.random.key(1)))
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (remat == "full")
        grads[remat] = jax.jit(fn)(params, batch["latents"], batch["prompt_embeds"], jax.random.key(1))
    (l0, g0), (l1, g1) = grads["none"], grads["full"]
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-7, err_msg=k)
