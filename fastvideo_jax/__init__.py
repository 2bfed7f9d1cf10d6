"""fastvideo_jax: FastVideo's video diffusion models in JAX / Flax NNX.

Importing the package is cheap: model modules are imported by the registry only when a checkpoint asks for
them.
"""

__version__ = "0.1.0"
