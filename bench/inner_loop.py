"""Inner-loop throughput: K candidate LoRA fine-tunes in one compiled program (seal_jax.inner).

Same workload as /work/shared/bench/peer_inner_loop.py (the PyTorch peer): per candidate 12
sequences of random tokens (11 x 48 + 1 x 180), LoRA r32 / alpha 64 on q,v, 10 epochs, batch size 1,
lr 1e-3, AdamW, linear decay, clip 1.0; random bf16 base weights (throughput does not depend on values).

    python bench/inner_loop.py --models llama-3.2-1b,qwen2.5-7b --ks 1,8,32,64,128 --out inner.jsonl
    python bench/inner_loop.py --models tiny-llama --ks 1,2          # CPU smoke check
    python bench/inner_loop.py --mesh candidate=2 ...                  # K split over 2 GPUs

For each model, shuffle mode and K (increasing until an out-of-memory error, which is caught and ends
that series), it builds the plan and trains twice with identical work: the first call compiles every
chunk program it needs (one per (K, length bucket)), the second is the steady state. Reported:
* compile_s: first call minus steady call, from a cold cache (compiled programs are dropped before
  every row unless --keep-cache), i.e. what the first round of a fresh process pays;
  compiled_shapes: chunk programs this row compiled;
* seconds_per_candidate: steady wall time / K (all K adapters trained, all 120 steps);
* real_tflops: 4 * N_params * real tokens / s, with real tokens = unpadded tokens trained on
  (the peer's definition); mfu: real_tflops / measured peak; hw_tflops / hw_mfu count the padded
  tokens actually computed, so real/hw = 1 - padding_fraction;
* peak_tflops: best of a large bf16 jnp.dot (measured first, same device).
Shuffle modes: "independent" (each candidate its own order; at large K nearly every step's length
bucket is set by someone's 180-token sequence), "shared" (one order of length ranks shared by the
candidates) and "aligned" (the default: as shared, ties within a length bucket broken per candidate;
see seal_jax/train_plan.py), which remove that padding; all are reported.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from seal_jax import inner, sharding  # noqa: E402
from seal_jax import lora as lora_lib  # noqa: E402
from seal_jax.model import transformer  # noqa: E402
from seal_jax.model.config import LoraConfig, ModelConfig  # noqa: E402
from seal_jax.model.presets import get_preset  # noqa: E402

LINE_LEN, N_LINES, PASSAGE_LEN = 48, 11, 180


def measure_peak_tflops(n: int, repeats: int = 10) -> float:
    """Best bf16 matmul throughput of an n x n x n product on the default device."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), jnp.bfloat16)
    b = jax.random.normal(key_b, (n, n), jnp.bfloat16)
    dot = jax.jit(lambda x, y: x @ y)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def make_candidates(k_count: int, vocab: int, seed: int = 0) -> list:
    """Per candidate: the peer's length profile (11 x 48 + 1 x 180), its own random tokens."""
    rng = np.random.default_rng(seed)
    lens = [LINE_LEN] * N_LINES + [PASSAGE_LEN]
    return [inner.CandidateData([rng.integers(100, vocab - 100, size=n).astype(np.int32)
                                 for n in lens]) for _ in range(k_count)]


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits (CPU smoke numbers are tiny, GPU ones large)."""
    return float(f"{x:.{digits}g}")


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


def run_one(params, cfg, lora_cfg, inner_cfg, k_count, mesh, epochs) -> dict:
    cands = make_candidates(k_count, cfg.vocab_size)
    hp = [{"seed": k, "epochs": epochs} for k in range(k_count)]
    t0 = time.perf_counter()
    plan = inner.build_plan(cands, hp, inner_cfg, pad_id=cfg.pad_token_id or 0)
    plan_s = time.perf_counter() - t0
    shapes_before = inner.compiled_shape_count()
    times, results = [], None
    for _ in range(2):  # 1st: compile + run; 2nd: the same work, all programs cached
        t0 = time.perf_counter()
        results = inner.train_candidates(params, plan, cfg=cfg, lora_cfg=lora_cfg,
                                         inner_cfg=inner_cfg, mesh=mesh)
        jax.block_until_ready(results.lora)
        times.append(time.perf_counter() - t0)
    counts = plan.token_counts()
    steady = times[1]
    n_params = cfg.num_params()
    real_tflops = 4 * n_params * counts["real_tokens"] / steady / 1e12
    hw_tflops = 4 * n_params * counts["computed_tokens"] / steady / 1e12
    final = results.losses[np.arange(k_count), plan.num_steps_K - 1]
    return {
        "k": k_count, "plan_s": round(plan_s, 4), "first_call_s": round(times[0], 3),
        "steady_s": round(steady, 3), "compile_s": round(times[0] - steady, 3),
        "compiled_shapes": inner.compiled_shape_count() - shapes_before,
        "chunks": len(plan.packed_chunks(inner_cfg.steps_per_chunk) if plan.packs_rows
                      else plan.chunks(inner_cfg.steps_per_chunk)),
        "steps": int(plan.num_steps),
        "seconds_per_candidate": round(steady / k_count, 5),
        "candidates_per_hour": round(3600 * k_count / steady, 1),
        "real_tokens_per_candidate": counts["real_tokens"] // k_count,
        "computed_tokens_per_candidate": counts["computed_tokens"] // k_count,
        "padding_fraction": round(counts["padding_fraction"], 4),
        "real_tok_per_s": round(counts["real_tokens"] / steady),
        "real_tflops": _sig(real_tflops), "hw_tflops": _sig(hw_tflops),
        "failed": int(results.failed.sum()),
        "final_loss_mean": float(np.nanmean(final)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama-3.2-1b,qwen2.5-7b")
    ap.add_argument("--ks", default="1,8,32,64,128")
    ap.add_argument("--shuffle", default="independent,shared,aligned")
    ap.add_argument("--packing", default="on", help="on,off: packed rows (the default) and/or a row per candidate")
    ap.add_argument("--buckets", default=",".join(map(str, inner.InnerConfig.length_buckets)),
                    help="sequence length buckets (one compiled program per bucket used; default: "
                         "InnerConfig's)")
    ap.add_argument("--steps-per-chunk", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--scan-unroll", type=int, default=1, help="layers per layer-scan iteration")
    ap.add_argument("--remat", default="auto", choices=["off", "on", "auto"],
                    help="rematerialise layers in the backward pass (InnerConfig.remat; auto, the "
                         "default: per program, where it would not fit without)")
    ap.add_argument("--loss-chunk-mib", type=int, default=inner.InnerConfig.loss_chunk_mib,
                    help="chunked cross-entropy budget (InnerConfig.loss_chunk_mib); 0: plain loss")
    ap.add_argument("--faithful", action="store_true",
                    help="reference_faithful: every sequence padded to 2048 with EOS targets "
                         "(the peer's 'seal' mode; use with --attention cudnn and/or --remat)")
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    ap.add_argument("--saved-residuals", default=ModelConfig.saved_residuals,
                    help="ModelConfig.saved_residuals, comma-separated to compare (dots, all)")
    ap.add_argument("--mesh", default="", help="e.g. candidate=2 or candidate=4,fsdp=2 (default: 1 device)")
    ap.add_argument("--peak-n", type=int, default=0, help="matmul size for the peak (default by backend)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="reuse compiled programs across rows (compile_s then shows only new shapes)")
    ap.add_argument("--out", default="", help="JSONL file to append results to")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    device = jax.devices()[0]
    peak_n = args.peak_n or (8192 if backend != "cpu" else 1024)
    peak = measure_peak_tflops(peak_n)
    mesh = None
    if args.mesh:
        axes = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.mesh.split(",")}
        mesh = sharding.make_mesh({"axes": axes})
    common = {"device": getattr(device, "device_kind", str(device)), "backend": backend,
              "num_devices": 1 if mesh is None else int(np.prod(list(mesh.shape.values()))),
              "mesh": args.mesh or None, "jax": jax.__version__, "peak_tflops": _sig(peak),
              "peak_matmul_n": peak_n, "remat": args.remat, "loss_chunk_mib": args.loss_chunk_mib, "scan_unroll": args.scan_unroll, "attention": args.attention, "faithful": args.faithful,
              "buckets": args.buckets, "steps_per_chunk": args.steps_per_chunk, "epochs": args.epochs,
              "lora": "r32 a64 q,v", "batch_size": 1, "lr": 1e-3}
    print(json.dumps({"peak_tflops": _sig(peak), "device": common["device"]}), flush=True)
    lora_cfg = LoraConfig(rank=32, alpha=64.0, targets=("q", "v"))
    out = open(args.out, "a") if args.out else None
    for model in args.models.split(","):
        cfg = get_preset(model)
        cfg = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16",
                          scan_unroll=args.scan_unroll,
                          attention_impl=args.attention)
        t0 = time.perf_counter()
        params = transformer.init_params(cfg, jax.random.PRNGKey(0))
        if mesh is not None:
            params = jax.device_put(params, sharding.logical_to_sharding(
                transformer.param_logical_axes(cfg), mesh, sharding.DEFAULT_RULES, params))
        jax.block_until_ready(params)
        init_s = time.perf_counter() - t0
        series = [(s, p, r) for s in args.shuffle.split(",") for p in args.packing.split(",")
                  for r in args.saved_residuals.split(",")]
        for shuffle, packing, residuals in series:
            cfg = cfg.replace(saved_residuals=residuals)
            inner_cfg = inner.InnerConfig(
                batch_size=1, epochs=args.epochs, learning_rate=1e-3,
                length_buckets=tuple(int(b) for b in args.buckets.split(",")),
                steps_per_chunk=args.steps_per_chunk, shuffle=shuffle, packing=packing == "on",
                reference_faithful=args.faithful,
                remat={"off": False, "on": True, "auto": None}[args.remat],
                loss_chunk_mib=args.loss_chunk_mib)
            for k_count in (int(k) for k in args.ks.split(",")):
                shards = sharding.candidate_shards(mesh)
                if k_count % shards:
                    print(f"skip K={k_count}: not a multiple of {shards} candidate shards", flush=True)
                    continue
                row = {"model": model, "params": cfg.num_params(),
                       "lora_params": lora_lib.lora_num_params(cfg, lora_cfg), "shuffle": shuffle,
                       "packing": packing, "saved_residuals": residuals,
                       "init_s": round(init_s, 2), **common}
                if not args.keep_cache:
                    inner.clear_compiled()
                    jax.clear_caches()
                try:
                    row.update(run_one(params, cfg, lora_cfg, inner_cfg, k_count, mesh, args.epochs))
                except Exception as err:  # noqa: BLE001 - only OOM is expected; anything else re-raises
                    if not is_oom(err):
                        raise
                    row.update({"k": k_count, "oom": True, "error": str(err).splitlines()[0][:300]})
                row["mfu"] = _sig(row["real_tflops"] / peak) if "real_tflops" in row else None
                row["hw_mfu"] = _sig(row["hw_tflops"] / peak) if "hw_tflops" in row else None
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                gc.collect()
                if row.get("oom"):
                    break
        del params
        gc.collect()
        jax.clear_caches()
    if out:
        out.close()


if __name__ == "__main__":
    main()
