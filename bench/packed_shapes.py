"""How many training programs does the paper E-step compile, with and without merging rare shapes?

    python bench/packed_shapes.py --out bench/results/packed_shapes_cpu.json

The paper E-step's candidates (`bench/round.py`'s workload: the recorded self-edits of the first 50
passages x 5 edits x 3 reps, split and tokenized as the knowledge domain does, EOS appended, 10
epochs) are grouped into calls at each K, least work first as `seal_jax.estep` orders them, and
planned with the default `InnerConfig` but for `pack_merge_share`. For each (K, share) it counts
the distinct chunk programs exactly as the E-step's precompile keys them (step shape, K padded as
the call pads it, members per step), the first call's programs, the chunks dispatched, and the
computed tokens. No model is needed: a program's shape is the plan's.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

EDITS = REPO.parent / "shared" / "data" / "squad" / "self_edits_qwen7b_train_iter0.json"


def program_keys(plan, inner_cfg) -> set:
    from seal_jax import inner  # noqa: PLC0415

    padded = plan.padded(inner._padded_count(plan.num_candidates, 1, inner_cfg.candidate_buckets))  # noqa: SLF001
    c = inner_cfg.steps_per_chunk
    return {(c, *inner._program_dims(xs))  # noqa: SLF001 - the precompile's own key
            for _, _, xs in inner._chunk_batches(padded, c, padded.packs_rows)}  # noqa: SLF001


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="128,64,16", help="calls' K (the fitted K: embedded, 1B, 7B)")
    ap.add_argument("--shares", default="0,0.03")
    ap.add_argument("--self-edits", default=str(EDITS))
    ap.add_argument("--tokenizer", default="embedded")
    ap.add_argument("--out", default="packed_shapes.json")
    args = ap.parse_args(argv)

    from inner_selfedits import candidates  # noqa: PLC0415
    from seal_jax import inner  # noqa: PLC0415
    from seal_jax.engine import candidate_buckets  # noqa: PLC0415
    from seal_jax.model.loading import load_tokenizer  # noqa: PLC0415

    tokenizer = load_tokenizer(args.tokenizer)
    cands = candidates(tokenizer, args.self_edits, 50, 5, 3)
    hparams = inner.pin_seeds(None, len(cands))
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        for share in (float(x) for x in args.shares.split(",")):
            icfg = inner.InnerConfig(epochs=10, append_eos=True, pack_merge_share=share,
                                     candidate_buckets=candidate_buckets(k))  # as the Engine pads K
            groups = inner.group_candidates(cands, hparams, icfg, k)[::-1]
            keys, first, chunks, computed, real = set(), None, 0, 0, 0
            for g in groups:
                plan = inner.build_plan([cands[i] for i in g], [hparams[i] for i in g], icfg,
                                        pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
                call_keys = program_keys(plan, icfg)
                first = len(call_keys) if first is None else first
                keys |= call_keys
                counts = plan.token_counts()
                computed += counts["computed_tokens"]
                real += counts["real_tokens"]
                chunks += len(plan.packed_chunks(icfg.steps_per_chunk) if plan.packs_rows
                              else plan.chunks(icfg.steps_per_chunk))
            rows.append({"k": k, "pack_merge_share": share, "calls": len(groups), "programs": len(keys),
                         "first_call_programs": first, "chunks": chunks, "computed_tokens": computed,
                         "padding_fraction": round(1 - real / computed, 4)})
            print(json.dumps(rows[-1]), flush=True)
    pathlib.Path(args.out).write_text(json.dumps({"workload": "paper E-step, 750 candidates, 10 epochs",
                                                  "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
