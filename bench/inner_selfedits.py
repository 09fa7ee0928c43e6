"""E-step training replay on real self-edit lengths: the paper-size candidate set, trained in grouped,
memory-fitted calls with the default InnerConfig (issue 8).

Candidates: the first --passages passages of ../shared/data/squad/self_edits_qwen7b_train_iter0.json,
their first --edits recorded Qwen2.5-7B self-edits, x --reps seeds (50 x 5 x 3 = 750 by default),
each split into training sequences by the knowledge domain's `build_train_sequences` and tokenized
with the embedded tokenizer (EOS appended, as the knowledge config). Models: `embedded` (the real
135M) or a preset (`llama-3.2-1b`, `qwen2.5-7b`, random bf16 weights: throughput only; `tiny-llama`
for a CPU smoke run, its vocabulary widened to the tokenizer's).

    python bench/inner_selfedits.py --model qwen2.5-7b --k 32 --out bench/results/selfedits_7b.json
    python bench/inner_selfedits.py --model tiny-llama --k 2 --limit 4 --passages 2   # CPU smoke

Reports wall time of the first pass (compiles included) and, with --repeat 2, of a second pass
(steady state); chunk programs compiled; padding fraction of the grouped calls; the K the memory
fitting settled on (if a call ran out of memory); peak device memory; candidates per hour.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from seal_jax import compile_cache, inner  # noqa: E402
from seal_jax.model import transformer  # noqa: E402
from seal_jax.model.config import LoraConfig  # noqa: E402
from seal_jax.model.embedded import load_embedded  # noqa: E402
from seal_jax.model.presets import get_preset  # noqa: E402
from seal_jax.tasks.knowledge.sequences import build_train_sequences  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared/data/squad/self_edits_qwen7b_train_iter0.json"


def candidates(tokenizer, path, passages, edits, reps):
    records = json.load(open(path))[:passages]
    out = []
    for rec in records:
        for text in rec["completions"][:edits]:
            seqs = [np.asarray(tokenizer.encode(tokenizer.escape(t)), np.int32)
                    for t in build_train_sequences(text, rec["title"], rec["context"])]
            out.extend(inner.CandidateData(seqs) for _ in range(reps))
    return out


def random_preset(name, tokenizer):
    """(cfg, random params) of a preset, its vocabulary widened to the tokenizer's; bf16 off CPU."""
    cfg = get_preset(name)
    if cfg.vocab_size < tokenizer.vocab_size:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    if jax.default_backend() != "cpu":
        cfg = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    return cfg, transformer.init_params(cfg, jax.random.PRNGKey(0))


def peak_memory_gib():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**30, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--k", type=int, default=32, help="candidates per call (before memory fitting)")
    ap.add_argument("--passages", type=int, default=50)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="train only the first N candidates")
    ap.add_argument("--repeat", type=int, default=1, help="passes over the candidates (2: steady)")
    ap.add_argument("--shuffle", default=inner.InnerConfig.shuffle)
    ap.add_argument("--remat", default="auto", choices=["off", "on", "auto"])
    ap.add_argument("--loss-chunk-mib", type=int, default=inner.InnerConfig.loss_chunk_mib)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--compile-cache", default="", help="persistent XLA cache directory")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.compile_cache:
        compile_cache.enable(args.compile_cache)

    cfg, params, tokenizer = load_embedded()
    if args.model != "embedded":
        cfg, params = random_preset(args.model, tokenizer)
    lora_cfg = LoraConfig(rank=32, alpha=64.0, targets=("q", "v"))  # the knowledge config's adapter
    inner_cfg = inner.InnerConfig(append_eos=True, shuffle=args.shuffle,
                                  remat={"off": False, "on": True, "auto": None}[args.remat],
                                  loss_chunk_mib=args.loss_chunk_mib)
    cands = candidates(tokenizer, args.data, args.passages, args.edits, args.reps)
    if args.limit:
        cands = cands[: args.limit]
    hparams = inner.pin_seeds(None, len(cands))

    groups = inner.group_candidates(cands, hparams, inner_cfg, args.k)
    real = computed = 0
    for g in groups:
        counts = inner.build_plan([cands[k] for k in g], [hparams[k] for k in g], inner_cfg,
                                  pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id).token_counts()
        real, computed = real + counts["real_tokens"], computed + counts["computed_tokens"]
    row = {"model": args.model, "params": cfg.num_params(), "backend": jax.default_backend(),
           "device": str(jax.devices()[0].device_kind if hasattr(jax.devices()[0], "device_kind")
                         else jax.devices()[0]),
           "candidates": len(cands), "k": args.k, "calls": len(groups), "shuffle": args.shuffle,
           "remat": args.remat, "loss_chunk_mib": args.loss_chunk_mib,
           "sequences_mean": float(np.mean([len(c.sequences) for c in cands])),
           "tokens_mean": float(np.mean([sum(len(s) for s in c.sequences) for c in cands])),
           "real_tokens": real, "computed_tokens": computed,
           "padding_fraction": round(1 - real / max(1, computed), 4), "passes": []}
    for p in range(args.repeat):
        shapes = inner.compiled_shape_count()
        t0 = time.perf_counter()
        result = inner.train_grouped(params, cands, hparams, cfg=cfg, lora_cfg=lora_cfg,
                                     inner_cfg=inner_cfg, max_k=args.k, pad_id=tokenizer.pad_id,
                                     eos_id=tokenizer.eos_id)
        jax.block_until_ready(result.lora)
        wall = time.perf_counter() - t0
        row["passes"].append({
            "pass": p, "wall_s": round(wall, 2), "candidates_per_hour": round(3600 * len(cands) / wall),
            "seconds_per_candidate": round(wall / len(cands), 4),
            "new_compiled_programs": inner.compiled_shape_count() - shapes,
            "fitted_k": inner.fitted_candidates_per_call(cfg, lora_cfg, inner_cfg),
            "failed": int(result.failed.sum()), "truncated": int(result.truncated_sequences.sum()),
            "peak_memory_gib": peak_memory_gib(), "real_tokens_per_s": round(real / wall)})
        print(json.dumps(row["passes"][-1]), flush=True)
    print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
