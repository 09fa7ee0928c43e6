"""Decode throughput of `sampling.generate` on a random-weight preset (GPU benchmark).

    python bench/decode.py --preset qwen2.5-7b --out $OUT/decode.json

Uniform case (issue 8's measurement): --batch rows (64), --prompt-tokens random prompt tokens (128),
exactly --new-tokens new tokens per row (256; no stop ids), for
(greedy, top-p 0.95 at temperature 1) x (no adapter, --adapters distinct LoRA adapters, one per
group of batch/K rows). Each configuration is called once to compile (`first_call_s`, of which
`compile_s` is what jax reports compiling) and then --repeats times; `tok_per_s` is
batch * new_tokens / best time, end to end (prefill included). `prefill_s` is one call with a
single new token (prefill + first token), so `decode_tok_per_s` = batch * (new - 1) / (best - prefill).

Ragged case (rows finishing at different times): --ragged-requests requests on the same batch, of
which --ragged-long write --ragged-long-tokens tokens and the rest --ragged-short-tokens (top-p);
timed with refill (finished rows take pending requests) and without (whole batches), each twice
(the first call compiles what it needs). `useful_tok_per_s` counts the requested tokens only.
The defaults keep every cache capacity of this case in one bucket, so it compiles one more decode
program; the whole script stays within a few minutes on an H200 including compilation.

Random weights: the text is meaningless, and a random model's flat distribution makes the top-p
nucleus nearly the whole vocabulary (the worst case for nucleus sampling). Never quote accuracy
from this script. Writes JSON to --out (and prints each row as it is measured).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile_seconds: list[float] = []


def _record_compile(event: str, seconds: float, **_):
    if event in COMPILE_EVENTS:
        _compile_seconds.append(seconds)


def random_lora(cfg, lora_cfg, k, seed):
    """K random adapters [K, L, ...] in the model's compute dtype (non-zero A and B)."""
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(lora_cfg.targets)))
    lora = {}
    for target in lora_cfg.targets:
        d_in, d_out = cfg.projection_shape(target)
        lead = (k, cfg.num_layers)
        lora[target] = {
            "a": 0.02 * jax.random.normal(next(keys), lead + (d_in, lora_cfg.rank), cfg.dtype),
            "b": 0.02 * jax.random.normal(next(keys), lead + (lora_cfg.rank, d_out), cfg.dtype),
        }
    return lora


def timed(fn, repeats):
    """(first call s, compile s within it, best of `repeats` later calls s, last result)."""
    _compile_seconds.clear()
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    compile_s = sum(_compile_seconds)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return first, compile_s, best, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen2.5-7b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=8, help="K distinct adapters (0: skip)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-targets", default="q,v")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ragged-requests", type=int, default=128, help="0: skip the ragged case")
    parser.add_argument("--ragged-long", type=int, default=4)
    parser.add_argument("--ragged-long-tokens", type=int, default=512)
    parser.add_argument("--ragged-short-tokens", type=int, default=64)
    parser.add_argument("--compilation-cache", default="/tmp/seal_jax_decode_jit_cache",
                        help="persistent jax compilation cache ('' to disable)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "decode.json"))
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.monitoring.register_event_duration_secs_listener(_record_compile)

    from seal_jax.model import transformer
    from seal_jax.model.config import LoraConfig
    from seal_jax.model.presets import get_preset
    from seal_jax.sampling import SamplingParams, generate

    t0 = time.perf_counter()
    cfg = get_preset(args.preset)
    params = jax.block_until_ready(transformer.init_params(cfg, jax.random.key(0)))
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_tokens)).tolist()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_ids=())
    top_p = SamplingParams(temperature=1.0, top_p=args.top_p, max_new_tokens=args.new_tokens,
                           stop_ids=(), seed=1)
    lora_cfg = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                          targets=tuple(args.lora_targets.split(",")))
    adapter_cases = [("none", None, None)]
    if args.adapters:
        lora = random_lora(cfg, lora_cfg, args.adapters, seed=1)
        index = [i * args.adapters // args.batch for i in range(args.batch)]
        adapter_cases.append((f"K={args.adapters}", lora, index))

    def run(prompts_, sampling, lora=None, index=None, refill=True):
        return generate(params, prompts_, cfg=cfg, sampling=sampling, batch_size=args.batch,
                        lora=lora, lora_cfg=lora_cfg if lora is not None else None,
                        adapter_index=index, refill=refill)

    device = jax.devices()[0]
    rows, ragged = [], []
    result = {
        "benchmark": "decode",
        "preset": args.preset,
        "dtypes": {"param": cfg.param_dtype, "compute": cfg.compute_dtype},
        "lora": {"rank": lora_cfg.rank, "targets": list(lora_cfg.targets), "adapters": args.adapters},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": getattr(device, "device_kind", str(device)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "init_s": round(init_s, 2),
        "uniform": rows,
        "ragged": ragged,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=2) + "\n")

    one_token = SamplingParams(temperature=0.0, max_new_tokens=1, stop_ids=())
    first, _, prefill_s, _ = timed(lambda: run(prompts, one_token), args.repeats)
    result["prefill_s"] = round(prefill_s, 4)
    result["prefill_first_call_s"] = round(first, 3)
    print(json.dumps({"init_s": round(init_s, 2), "prefill_s": round(prefill_s, 4)}), flush=True)
    save()

    for mode, sampling in (("greedy", greedy), ("top-p", top_p)):
        for adapter_name, lora, index in adapter_cases:
            first, compile_s, best, gens = timed(lambda: run(prompts, sampling, lora, index),
                                                 args.repeats)
            assert all(len(g.token_ids) == args.new_tokens for g in gens)
            tokens = args.batch * args.new_tokens
            rows.append({
                "mode": mode, "adapters": adapter_name, "batch": args.batch,
                "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "first_call_s": round(first, 3), "compile_s": round(compile_s, 2),
                "best_s": round(best, 4), "tok_per_s": round(tokens / best, 1),
                "ms_per_step": round(1e3 * best / args.new_tokens, 3),
                "decode_tok_per_s": (round(args.batch * (args.new_tokens - 1) / (best - prefill_s), 1)
                                     if best > prefill_s else None),
            })
            print(json.dumps(rows[-1]), flush=True)
            save()
    for row in rows:
        if row["adapters"] != "none":
            base = next(r for r in rows if r["mode"] == row["mode"] and r["adapters"] == "none")
            row["vs_no_adapter"] = round(row["tok_per_s"] / base["tok_per_s"], 3)

    save()
    if args.ragged_requests:
        n = args.ragged_requests
        long_rows = {i * n // args.ragged_long for i in range(args.ragged_long)}
        max_new = [args.ragged_long_tokens if i in long_rows else args.ragged_short_tokens
                   for i in range(n)]
        ragged_prompts = rng.integers(3, cfg.vocab_size, (n, args.prompt_tokens)).tolist()
        sampling = [SamplingParams(temperature=1.0, top_p=args.top_p, max_new_tokens=m, stop_ids=(),
                                   seed=2) for m in max_new]
        outputs = {}
        for refill in (True, False):
            first, compile_s, best, gens = timed(
                lambda: run(ragged_prompts, sampling, refill=refill), 1)
            assert [len(g.token_ids) for g in gens] == max_new
            outputs[refill] = [g.token_ids for g in gens]
            ragged.append({
                "refill": refill, "requests": n, "long_requests": len(long_rows),
                "long_tokens": args.ragged_long_tokens, "short_tokens": args.ragged_short_tokens,
                "batch": args.batch, "first_call_s": round(first, 3),
                "compile_s": round(compile_s, 2), "best_s": round(best, 3),
                "useful_tok_per_s": round(sum(max_new) / best, 1),
            })
            print(json.dumps(ragged[-1]), flush=True)
            save()
        # Same samples either way: refill changes when a request runs, not what it writes.
        ragged[0]["same_tokens_as_no_refill"] = outputs[True] == outputs[False]
        ragged[0]["speedup_vs_no_refill"] = round(ragged[1]["best_s"] / ragged[0]["best_s"], 3)

    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        result["peak_device_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    save()
    print(table(result))
    return result


def table(r: dict) -> str:
    lines = [f"{r['preset']} on {r['device']} (jax {r['jax']}), prefill+1 token {r['prefill_s']} s",
             "| mode | adapters | tok/s | decode tok/s | ms/step | vs none | compile s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["uniform"]:
        lines.append(f"| {row['mode']} | {row['adapters']} | {row['tok_per_s']} | "
                     f"{row['decode_tok_per_s']} | {row['ms_per_step']} | "
                     f"{row.get('vs_no_adapter', '')} | {row['compile_s']} |")
    for row in r["ragged"]:
        lines.append(f"ragged refill={row['refill']}: {row['useful_tok_per_s']} useful tok/s, "
                     f"{row['best_s']} s (first call {row['first_call_s']} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
