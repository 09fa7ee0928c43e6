"""The paper E-step's evaluation as the sampler batches it: how many decode rows do work, and how long a
call takes, with the rows per adapter group chosen by `sampling.adapter_group_size` (the default) and
by the earlier rule (the largest adapter's request count rounded up to a power of two), side by side.

    python bench/eval_groups.py --tokenizer .tok                       # the fill table (no model run)
    python bench/eval_groups.py --tokenizer .tok --time tiny-llama     # + one call timed per rule (CPU)
    python bench/eval_groups.py --tokenizer .tok --time qwen2.5-7b     # the same on a GPU

Candidates: the first 50 passages of ../shared/data/squad/self_edits_qwen7b_train_iter0.json x their
5 recorded self-edits x 3 reps, cut into calls of --k by `inner.group_candidates` (the E-step's cut);
each candidate answers its passage's questions (2-10, 4.5 on average). Timing: random weights (every
answer runs to --new-tokens), a random rank-32 q/v adapter per candidate, greedy, batch --batch.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from inner_selfedits import DATA, candidates, random_preset  # noqa: E402
from seal_jax import inner, sampling  # noqa: E402
from seal_jax import lora as lora_lib  # noqa: E402
from seal_jax.model.config import LoraConfig  # noqa: E402
from seal_jax.model.loading import load_tokenizer  # noqa: E402
from seal_jax.model.presets import get_preset  # noqa: E402


def power_of_two_rule(counts, batch_size, _share):
    """The rule before `adapter_group_size`."""
    counts = np.asarray(counts)
    return sampling.bucket(int(counts.max()), maximum=batch_size)


def row_fill(counts: np.ndarray, size: int) -> float:
    """Share of the row-slots that decode a request when each adapter's requests take ceil(c / R)
    waves of its group's R rows."""
    return float(counts.sum() / (size * -(-counts // size)).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="embedded")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--k", type=int, default=128, help="candidates per E-step call")
    ap.add_argument("--batch", type=int, default=256, help="decode rows (the paper config's eval.batch_size)")
    ap.add_argument("--time", default="", help="a preset to time one call of each rule on (random weights)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--call", type=int, default=1, help="which call to time (1: the second, with a 10-question passage)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    records = json.load(open(args.data))[:50]
    cands = candidates(tokenizer, args.data, 50, 5, 3)
    questions = [rec["questions"] for rec in records for _ in range(5 * 3)]  # the order of `cands`
    hparams = inner.pin_seeds(None, len(cands))
    groups = inner.group_candidates(cands, hparams, inner.InnerConfig(epochs=10, append_eos=True), args.k)
    report = {"k": args.k, "batch": args.batch, "calls": []}
    lora_cfg = LoraConfig(rank=32, alpha=64.0, targets=("q", "v"))
    shares = {}
    for name in ("smollm2-135m", "llama-3.2-1b", "qwen2.5-7b"):
        cfg = get_preset(name)
        base = cfg.num_params() * 2  # bf16
        shares[name] = lora_lib.lora_num_params(cfg, lora_cfg) * 4 / base  # float32 adapters
    for g in groups:
        counts = np.array([len(questions[i]) for i in g])
        row = {"candidates": len(g), "requests": int(counts.sum()), "largest": int(counts.max()),
               "power_of_two": {"rows_per_group": power_of_two_rule(counts, args.batch, 0.0)}}
        row["power_of_two"]["fill"] = round(row_fill(counts, row["power_of_two"]["rows_per_group"]), 3)
        for name, share in shares.items():
            size = sampling.adapter_group_size(counts, args.batch, share)
            row[name] = {"rows_per_group": size, "fill": round(row_fill(counts, size), 3)}
        report["calls"].append(row)
    report["adapter_share"] = shares

    if args.time:
        cfg, params = random_preset(args.time, tokenizer)
        g = groups[args.call]
        prompts, index = [], []
        for slot, i in enumerate(g):
            for q in questions[i]:
                prompts.append(tokenizer.encode(tokenizer.escape(q["question"])))
                index.append(slot)
        # Random A and B (B non-zero: each candidate's adapter changes its answers, as trained ones do).
        rng = np.random.default_rng(1)
        lora = {t: {"a": rng.normal(0, 0.02, (len(g), cfg.num_layers, *cfg.projection_shape(t)[:1], lora_cfg.rank)),
                    "b": rng.normal(0, 0.02, (len(g), cfg.num_layers, lora_cfg.rank, cfg.projection_shape(t)[1]))}
                for t in lora_cfg.targets}
        lora = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), lora)
        sp = sampling.SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_ids=())
        timings = {}
        outputs = {}
        for rule, chooser in (("power_of_two", power_of_two_rule), ("default", sampling.adapter_group_size)):
            original = sampling.adapter_group_size
            sampling.adapter_group_size = chooser
            try:
                run = lambda: sampling.generate(params, prompts, cfg=cfg, sampling=sp, lora=lora,  # noqa: E731
                                                lora_cfg=lora_cfg, adapter_index=index, batch_size=args.batch)
                run()  # compile
                start = time.perf_counter()
                outputs[rule] = [o.token_ids for o in run()]
                timings[rule] = round(time.perf_counter() - start, 3)
            finally:
                sampling.adapter_group_size = original
        report["timed"] = {"preset": args.time, "backend": jax.default_backend(), "requests": len(prompts),
                           "candidates": len(g), "seconds": timings,
                           "same_outputs": outputs["power_of_two"] == outputs["default"]}
    text = json.dumps(report, indent=1)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    for row in report["calls"]:
        print(f"call of {row['candidates']:3d}: {row['requests']:3d} requests, largest {row['largest']:2d}; "
              f"power of two R={row['power_of_two']['rows_per_group']} fill {row['power_of_two']['fill']:.2f}; "
              + "; ".join(f"{n} R={row[n]['rows_per_group']} fill {row[n]['fill']:.2f}" for n in shares))
    if "timed" in report:
        print(json.dumps(report["timed"]))


if __name__ == "__main__":
    main()
