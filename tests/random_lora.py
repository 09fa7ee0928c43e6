"""Random candidate-stacked LoRA for tests where adapters must visibly change the outputs."""
import jax.numpy as jnp
import numpy as np


def random_lora(cfg, lora_cfg, num_candidates, seed):
    """Candidate-stacked LoRA with non-zero A and B, large enough to change the model's outputs."""
    rng = np.random.default_rng(seed)
    lora = {}
    for target in lora_cfg.targets:
        d_in, d_out = cfg.projection_shape(target)
        shape = (num_candidates, cfg.num_layers)
        lora[target] = {
            "a": jnp.asarray(rng.normal(0, 0.5, shape + (d_in, lora_cfg.rank)), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 0.5, shape + (lora_cfg.rank, d_out)), jnp.float32),
        }
    return lora
