"""jaxdistill: diffusion distillation in JAX/Flax.

The functional API is importable without side effects:

    from jaxdistill import diffusion, samplers, networks, data, methods
"""
from jaxdistill import diffusion, samplers  # noqa: F401  (light modules, no global state)

__version__ = "0.1.0"
