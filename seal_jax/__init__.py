"""seal_jax: SEAL (Self-Adapting LLMs) in JAX/Flax."""
from seal_jax import xla_defaults as _xla_defaults

_xla_defaults.apply()  # before any backend starts: XLA reads XLA_FLAGS once
