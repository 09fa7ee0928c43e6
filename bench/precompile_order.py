"""How long does the E-step's first call wait for its programs while the rest compile beside it?

    python bench/precompile_order.py --model tiny-llama --k 128 --out bench/results/precompile_order_cpu.json

The paper E-step's training calls (`bench/round.py`'s workload: the recorded self-edits of the first 50
passages x 5 edits x 3 reps, grouped by work at K, least work first as `seal_jax.estep` orders them) are
planned, and their programs are compiled once into a fresh persistent compilation cache. Then, each in
a new process with that cache warm (what a repeated or resumed run finds), `inner.start_precompile`
starts on all of them and the main thread trains the first call, as the E-step does. Reported per
variant: when the first call finished and when the last program was ready.

Variants: `ordered` (the default: background jobs trace and lower one at a time in the order the calls
need them, `inner.LoweringOrder`) and `concurrent` (every worker lowers at once, as before; the GIL
then goes round-robin over all of them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

EDITS = REPO.parent / "shared" / "data" / "squad" / "self_edits_qwen7b_train_iter0.json"


def _setup(args):
    """(cfg, random params, LoRA config, the E-step's plans in call order, inner config)."""
    from inner_selfedits import candidates as selfedit_candidates, random_preset  # noqa: PLC0415
    from seal_jax import compile_cache, inner  # noqa: PLC0415
    from seal_jax.model.config import LoraConfig  # noqa: PLC0415
    from seal_jax.model.loading import load_tokenizer  # noqa: PLC0415

    compile_cache.enable(args.cache)
    tokenizer = load_tokenizer(args.tokenizer)
    cfg, params = random_preset(args.model, tokenizer)
    lora_cfg = LoraConfig(rank=32, alpha=64.0, targets=("q", "v"))  # the knowledge config's adapter
    icfg = inner.InnerConfig(epochs=args.epochs, append_eos=True)  # the knowledge config's
    cands = selfedit_candidates(tokenizer, args.self_edits, 50, 5, 3)
    hparams = inner.pin_seeds(None, len(cands))
    groups = inner.group_candidates(cands, hparams, icfg, args.k)[::-1]  # least work first, as the E-step
    plans = [inner.build_plan([cands[i] for i in g], [hparams[i] for i in g], icfg,
                              pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id) for g in groups]
    return cfg, params, lora_cfg, plans, icfg


def run_variant(args) -> dict:
    import jax  # noqa: PLC0415

    from seal_jax import inner  # noqa: PLC0415

    cfg, params, lora_cfg, plans, icfg = _setup(args)
    if args.variant == "concurrent":
        inner._lowering_turn = contextlib.nullcontext  # noqa: SLF001 - the comparison's only change
    t0 = time.perf_counter()
    compiling = inner.start_precompile(params, plans, cfg=cfg, lora_cfg=lora_cfg, inner_cfg=icfg,
                                       workers=args.workers)
    result = inner.train_candidates(params, plans[0], cfg=cfg, lora_cfg=lora_cfg, inner_cfg=icfg)
    jax.block_until_ready(result.lora)
    first_call = time.perf_counter() - t0
    compiling.wait()
    all_ready = time.perf_counter() - t0
    return {"variant": args.variant, "first_call_s": round(first_call, 2), "all_programs_s": round(all_ready, 2),
            "programs": compiling.programs, "first_call_steps": int(plans[0].num_steps)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--self-edits", default=str(EDITS))
    ap.add_argument("--tokenizer", default="embedded")
    ap.add_argument("--variants", default="ordered,concurrent")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=15,
                    help="precompile threads (the product's default is one per core but one; 15 on the H200 host)")
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)  # internal: one measured process
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="precompile_order.json")
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory() as cache:
        common = [sys.executable, __file__, "--model", args.model, "--k", str(args.k), "--epochs",
                  str(args.epochs), "--self-edits", args.self_edits, "--tokenizer", args.tokenizer,
                  "--workers", str(args.workers), "--cache", cache]
        # Fill the cache (the programs compile once; this run's own numbers are cold and not reported).
        subprocess.run(common + ["--variant", "ordered"], check=True, capture_output=True, text=True)
        runs = []
        for _ in range(args.repeats):  # interleaved, so a drift of the machine hits both
            for variant in args.variants.split(","):
                out = subprocess.run(common + ["--variant", variant], check=True, capture_output=True,
                                     text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]))
    report = {"model": args.model, "k": args.k, "epochs": args.epochs, "workers": args.workers, "cache": "warm",
              "runs": runs}
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
