"""Where an E-step's training time goes, from its plans alone (host only, no device).

Rebuilds the calls that `estep.score_self_edits` makes for the paper-size replay of `bench/round.py`
(same workload, grouping and plans), and prints per K: calls, optimizer steps (summed over calls),
chunk dispatches, computed and real tokens and the padding. With `--log` (a `bench/round.py` log of
the same workload and K), it fits each call's measured training time to
`a * steps + b * computed tokens + c` and reports the fit: what a step costs whatever its size, and
what a token costs.

    python bench/estep_cost_model.py --ks 16,32,64
    python bench/estep_cost_model.py --ks 32 --log bench/results/h200_round/round_embedded_2026-12-02_cache.log
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.round import DEFAULT_EDITS, load_workload  # noqa: E402
from seal_jax.config import load_config  # noqa: E402
from seal_jax.estep import _candidate_data, candidate_seed  # noqa: E402
from seal_jax.model.embedded import load_embedded  # noqa: E402
from seal_jax.tasks.knowledge.setup import knowledge_domain  # noqa: E402
from seal_jax.train_plan import build_plan, group_candidates  # noqa: E402
from seal_jax import experiment as X  # noqa: E402


def workload(edits_file: pathlib.Path, passages: int, edits: int, reps: int):
    c = load_config(str(REPO / "configs" / "knowledge.py") + ":paper", {"model": "embedded", "grader.kind": "em_f1"})
    tokenizer = load_embedded()[2]
    domain = knowledge_domain(c, tokenizer)
    inner_cfg = X.engine_configs(c)[1]
    ps, es = load_workload(edits_file, passages, edits)
    cands, hparams = [], []
    for p, texts in zip(ps, es):
        for i, text in enumerate(texts):
            spec = domain.build_candidate(p, text)
            for rep in range(reps):
                cands.append(_candidate_data(spec))
                hparams.append(dict(spec.hparams, seed=candidate_seed(0, domain.context_id(p), i, rep)))
    return c, inner_cfg, cands, hparams, tokenizer


def calls(cands, hparams, inner_cfg, k, pad_id, eos_id):
    """Per call: (optimizer steps, chunk dispatches, computed tokens, real tokens)."""
    out = []
    for group in group_candidates(cands, hparams, inner_cfg, k):
        plan = build_plan([cands[j] for j in group], [hparams[j] for j in group], inner_cfg,
                          pad_id=pad_id, eos_id=eos_id)
        counts = plan.token_counts()
        chunks = plan.packed_chunks if plan.packs_rows else plan.chunks
        out.append((plan.num_steps, len(chunks(inner_cfg.steps_per_chunk)),
                    counts["computed_tokens"], counts["real_tokens"]))
    return np.array(out, np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits-file", default=str(DEFAULT_EDITS))
    ap.add_argument("--passages", type=int, default=50)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ks", default="32")
    ap.add_argument("--log", default="", help="bench/round.py log to fit (its K must be in --ks)")
    ap.add_argument("--skip", type=int, default=2, help="first calls left out of the fit (warm-up)")
    args = ap.parse_args()
    c, inner_cfg, cands, hparams, tok = workload(pathlib.Path(args.edits_file), args.passages,
                                                  args.edits, args.reps)
    pad_id, eos_id = 0, int(tok.eos_id)  # the pad id changes no count
    print(f"{len(cands)} candidates; length buckets {inner_cfg.length_buckets}")
    print("| K | calls | steps | chunks | computed tokens | real tokens | padding |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    per_k = {}
    for k in (int(x) for x in args.ks.split(",")):
        a = per_k[k] = calls(cands, hparams, inner_cfg, k, pad_id, eos_id)
        print(f"| {k} | {len(a)} | {int(a[:, 0].sum())} | {int(a[:, 1].sum())} | {int(a[:, 2].sum())} | "
              f"{int(a[:, 3].sum())} | {1 - a[:, 3].sum() / a[:, 2].sum():.1%} |")
    if args.log:
        text = pathlib.Path(args.log).read_text()
        times = np.array([float(t) for t in re.findall(r"\[train\] call \d+: \d+ items, ([\d.]+) s", text)])
        found = re.search(r"K=(\d+)", text)  # else the K of --ks (logs that do not name it)
        k = int(found.group(1)) if found else int(args.ks.split(",")[0])
        a = per_k.get(k)
        if a is None or len(a) != len(times):
            sys.exit(f"the log has {len(times)} calls at K={k}; the plans give "
                     f"{None if a is None else len(a)} (pass --ks {k} and the same workload)")
        x = np.c_[a[args.skip:, 0], a[args.skip:, 2], np.ones(len(a) - args.skip)]
        coef, *_ = np.linalg.lstsq(x, times[args.skip:], rcond=None)
        rmse = float(np.sqrt(np.mean((x @ coef - times[args.skip:]) ** 2)))
        print(f"fit over {len(x)} calls: {coef[0] * 1e3:.1f} ms per step + {coef[1] * 1e6:.2f} us per "
              f"computed token + {coef[2]:.2f} s per call (RMSE {rmse:.2f} s); steps {coef[0] * a[:, 0].sum():.0f} s, "
              f"tokens {coef[1] * a[:, 2].sum():.0f} s of {times.sum():.0f} s")


if __name__ == "__main__":
    main()
