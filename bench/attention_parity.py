"""Does cuDNN attention compute what the XLA path computes, everywhere seal_jax runs the model? (GPU)

    python bench/attention_parity.py --out $OUT/attention_parity.json

On a preset with random bf16 weights (default: the embedded model's shape), the model is run with
`attention_impl="xla"` and with `"cudnn"` on the same inputs, in the three ways seal_jax calls it:
  packed:   `forward` over rows of several segments (the inner loop's packed steps) -- logits;
  vmapped:  the gradient of a per-candidate loss under `jax.vmap` over K adapters (the inner loop's
            row-per-candidate steps; jax's batching rule for cuDNN attention is exercised here);
  prefill:  `forward_with_cache` of right-aligned prompts into a KV cache with a cursor (the
            sampler's prefill) -- logits of the real tokens.
Each comparison is the largest absolute difference over the largest magnitude of the XLA result.
Both paths compute in bf16, so they agree to bf16 rounding, not bit for bit; the script exits 1
when a difference exceeds --tolerance (default 0.05, a few bf16 ulps of accumulated error).
Off CUDA both settings run the XLA path, and the differences are 0.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from seal_jax import lora as lora_lib  # noqa: E402
from seal_jax.model import transformer  # noqa: E402
from seal_jax.model.config import LoraConfig  # noqa: E402
from seal_jax.model.presets import get_preset  # noqa: E402


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(1e-6, float(np.max(np.abs(a)))))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--out", default="attention_parity.json")
    args = ap.parse_args(argv)

    base = get_preset(args.model).replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    cfgs = {impl: base.replace(attention_impl=impl) for impl in ("xla", "cudnn")}
    params = transformer.init_params(base, jax.random.PRNGKey(0))
    lora_cfg = LoraConfig(rank=8, alpha=16.0, targets=("q", "v"))
    rng = np.random.default_rng(0)
    report = {"model": args.model, "backend": jax.default_backend(), "selected": {}}

    # Packed rows: 4 rows of 256 tokens, 3 segments each and a padded tail.
    rows, t = 4, 256
    tokens = rng.integers(3, base.vocab_size, (rows, t)).astype(np.int32)
    segments = np.zeros((rows, t), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(16, t - 16), 2, replace=False))
        segments[r, :cuts[0]], segments[r, cuts[0]:cuts[1]], segments[r, cuts[1]:t - 8 * r] = 1, 2, 3
    logits = {impl: jax.jit(lambda p, c=c: transformer.forward(p, tokens, cfg=c, segment_ids_BxT=segments))(params)
              for impl, c in cfgs.items()}
    real = segments > 0
    report["packed"] = relative(np.asarray(logits["xla"])[real], np.asarray(logits["cudnn"])[real])

    # Row per candidate under vmap: gradients w.r.t. K adapters (B made non-zero so they matter).
    k, t = 4, 192
    lora = lora_lib.init_lora(base, lora_cfg, jax.random.PRNGKey(1), k)
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.PRNGKey(2), x.shape, x.dtype), lora)
    seq_tokens = jnp.asarray(rng.integers(3, base.vocab_size, (k, 1, t)).astype(np.int32))
    lengths = rng.integers(t // 2, t + 1, k)
    seg = jnp.asarray((np.arange(t)[None, None, :] < lengths[:, None, None]).astype(np.int32))

    def loss(adapter, toks, seg_ids, cfg):
        out = transformer.forward(params, toks, cfg=cfg, lora=adapter, lora_cfg=lora_cfg, segment_ids_BxT=seg_ids)
        return jnp.sum(jnp.where(seg_ids[:, :, None] > 0, out, 0.0) ** 2) * 1e-6

    grads = {impl: jax.jit(jax.vmap(jax.grad(lambda a, x, s, c=c: loss(a, x, s, c))))(lora, seq_tokens, seg)
             for impl, c in cfgs.items()}
    report["vmapped_grad"] = max(relative(a, b) for a, b in zip(jax.tree.leaves(grads["xla"]),
                                                                jax.tree.leaves(grads["cudnn"])))

    # Prefill into a cache: right-aligned prompts of different lengths, written at cursor 0.
    batch, p, s = 4, 64, 128
    prompt = rng.integers(3, base.vocab_size, (batch, p)).astype(np.int32)
    lengths = np.array([64, 40, 17, 2])
    token_mask = np.arange(p)[None, :] >= (p - lengths)[:, None]
    positions = np.maximum(np.cumsum(token_mask, axis=1) - 1, 0).astype(np.int32)

    def prefill(cfg):
        cache = transformer.init_cache(cfg, batch, s)
        out, _ = transformer.forward_with_cache(params, prompt, cache, cfg=cfg, positions_BxT=positions,
                                                token_mask_BxT=token_mask)
        return out

    pre = {impl: jax.jit(lambda c=c: prefill(c))() for impl, c in cfgs.items()}
    report["prefill"] = relative(np.asarray(pre["xla"])[token_mask], np.asarray(pre["cudnn"])[token_mask])
    for name, (q, kv) in {"packed": (256, 256), "vmapped_grad": (192, 192), "prefill": (p, s)}.items():
        report["selected"][name] = transformer.select_attention_impl(
            "cudnn", dtype=base.dtype, head_dim=base.head_dim, q_len=q, kv_len=kv)
    report["tolerance"] = args.tolerance
    report["ok"] = all(report[n] <= args.tolerance for n in ("packed", "vmapped_grad", "prefill"))
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
