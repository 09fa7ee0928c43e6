"""Where does a decode step spend its GPU time? Trace `sampling.generate` and rank kernels.

    python bench/profile_decode.py --preset qwen2.5-7b --out $OUT/profile_decode.json

The workload of `bench/decode.py`'s uniform case (batch 64, 128-token random prompts, exactly 256 new
tokens, random bf16 weights). Two calls are traced: the whole call, and a call with one new token
(prefill and the first token); their difference divided by the remaining tokens is the decode step.
Reported per step: wall time, GPU busy time (the sum of kernel durations on the GPU's streams) and
kernel launches. GPU busy well under the wall time means the step waits on the host (launches, the
while loop's condition), not on memory; GPU busy well over the weights' read time (7B bf16: 15.2 GB,
~3.2 ms at the H200's 4.8 TB/s) means the kernels themselves are slow.
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from decode import random_lora  # noqa: E402
from profile_inner import classify, gpu_kernel_times  # noqa: E402
from seal_jax.model import transformer  # noqa: E402
from seal_jax.model.config import LoraConfig  # noqa: E402
from seal_jax.model.presets import get_preset  # noqa: E402
from seal_jax.sampling import SamplingParams, generate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen2.5-7b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--mode", default="top-p", choices=("top-p", "greedy"))
    ap.add_argument("--adapters", type=int, default=0, help="K distinct adapters (0: none)")
    ap.add_argument("--out", default="profile_decode.json")
    args = ap.parse_args(argv)

    cfg = get_preset(args.preset)
    params = jax.block_until_ready(transformer.init_params(cfg, jax.random.key(0)))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt_tokens)).tolist()
    lora_cfg = LoraConfig(rank=32, alpha=64.0, targets=("q", "v"))
    lora = random_lora(cfg, lora_cfg, args.adapters, seed=1) if args.adapters else None
    index = [i * args.adapters // args.batch for i in range(args.batch)] if args.adapters else None

    def sampling(new_tokens):
        if args.mode == "greedy":
            return SamplingParams(temperature=0.0, max_new_tokens=new_tokens, stop_ids=())
        return SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=new_tokens, stop_ids=(), seed=1)

    def runner(new_tokens):
        def run():
            gens = generate(params, prompts, cfg=cfg, sampling=sampling(new_tokens), batch_size=args.batch,
                            lora=lora, lora_cfg=lora_cfg if lora is not None else None,
                            adapter_index=index)
            assert all(len(g.token_ids) == new_tokens for g in gens)
        return run

    measured = {}
    for new_tokens in (1, args.new_tokens):
        run = runner(new_tokens)
        run()  # compiles
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
        per_kernel, counts = gpu_kernel_times(run)
        measured[new_tokens] = (wall, per_kernel, counts)

    steps = args.new_tokens - 1
    wall_1, kernels_1, counts_1 = measured[1]
    wall_n, kernels_n, counts_n = measured[args.new_tokens]
    per_kernel = collections.Counter({n: kernels_n[n] - kernels_1.get(n, 0) for n in kernels_n})
    counts = collections.Counter({n: counts_n[n] - counts_1.get(n, 0) for n in counts_n})
    by_class = collections.Counter()
    for name, us in per_kernel.items():
        by_class[classify(name)] += us
    report = {
        "preset": args.preset, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "mode": args.mode, "adapters": args.adapters,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "wall_s": round(wall_n, 4), "prefill_wall_s": round(wall_1, 4),
        "prefill_gpu_s": round(sum(kernels_1.values()) / 1e6, 4),
        "tok_per_s": round(args.batch * args.new_tokens / wall_n, 1),
        "ms_per_step_wall": round(1e3 * (wall_n - wall_1) / steps, 3),
        "ms_per_step_gpu": round(sum(per_kernel.values()) / 1e3 / steps, 3),
        "kernels_per_step": round(sum(counts.values()) / steps, 1),
        "by_class_ms_per_step": {k: round(v / 1e3 / steps, 3) for k, v in by_class.most_common()},
        "top_kernels": [{"name": n[:160], "ms_per_step": round(us / 1e3 / steps, 4),
                         "calls_per_step": round(counts[n] / steps, 2)}
                        for n, us in per_kernel.most_common(40)],
    }
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "top_kernels"}, indent=1))
    for row in report["top_kernels"][:25]:
        print(f"{row['ms_per_step']:8.4f} ms/step  x{row['calls_per_step']:<6} {row['name'][:110]}")


if __name__ == "__main__":
    main()
