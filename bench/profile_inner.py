"""Where does an inner-loop step spend its GPU time? Trace one steady-state call and rank kernels.

    python bench/profile_inner.py --model llama-3.2-1b --k 32 --out $OUT/profile.json

    python bench/profile_inner.py --model smollm2-135m --k 128 --self-edits FILE --tokenizer DIR

With --self-edits, the call profiled is the first call of the round's E-step (`bench/round.py`): the
recorded self-edits of the first 50 passages x 5 edits x 3 reps, split and tokenized as the knowledge
domain does, grouped by work (`inner.group_candidates`), and the group with the most work trained
with the knowledge config's inner settings. The report then also counts optimizer steps and rows, so
the wall time per step can be compared with the GPU's busy time per step (a gap is host or launch
overhead, not kernels).

Uses jax.profiler's perfetto trace (Chrome trace JSON; no TensorBoard plugin needed), keeps events on
GPU stream tracks, and groups kernels by name into coarse classes (matmul, attention softmax,
cross-entropy/logits, optimizer, copies, other) so a change can be aimed at the largest one.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import jax  # noqa: E402

from inner_loop import make_candidates  # noqa: E402
from seal_jax import inner  # noqa: E402
from seal_jax.model import transformer  # noqa: E402
from seal_jax.model.config import LoraConfig  # noqa: E402
from seal_jax.model.presets import get_preset  # noqa: E402

CLASSES = [("matmul", ("gemm", "cublas", "cutlass", "matmul", "dot", "xmma", "sm90", "wgmma", "triton_gemm")),
           ("reduce/softmax", ("reduce", "softmax", "logsumexp")),
           ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "concatenate", "dynamic")),
           ("scatter/gather", ("scatter", "gather", "select_and")),
           ("elementwise fusion", ("fusion", "loop_", "input_")),
           ]


def classify(name: str) -> str:
    low = name.lower()
    for label, keys in CLASSES:
        if any(k in low for k in keys):
            return label
    return "other"


def gpu_kernel_times(run) -> tuple[collections.Counter, collections.Counter]:
    """Trace one call of `run()`; per kernel name: (total GPU microseconds, launches).

    Uses jax.profiler's perfetto trace (Chrome trace JSON) and keeps the events on GPU stream tracks.
    """
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run()
    files = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    events = json.load(gzip.open(files[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("thread_name", "process_name"):
            names[(e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None)] = e["args"]["name"]
    per_kernel = collections.Counter()
    counts = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        thread = names.get((e.get("pid"), e.get("tid")), "")
        if "stream" not in thread.lower():
            continue
        per_kernel[e["name"]] += e["dur"]
        counts[e["name"]] += 1
    return per_kernel, counts


def parse_value(text: str):
    """A --inner value: true/false/none, a number, or the string itself."""
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--shuffle", default="shared")
    ap.add_argument("--buckets", default="64,128,256,512,1024,2048")
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--self-edits", default="", help="recorded self-edits JSON: profile the round's first call")
    ap.add_argument("--tokenizer", default="embedded", help="tokenizer for --self-edits (a directory or 'embedded')")
    ap.add_argument("--group", type=int, default=0, help="which call of the round (0: the most work)")
    ap.add_argument("--scan-unroll", type=int, default=1, help="layers per scan iteration (0: every layer)")
    ap.add_argument("--attention", default="xla", help="ModelConfig.attention_impl: xla, cudnn or auto")
    ap.add_argument("--inner", action="append", default=[], metavar="KEY=VALUE",
                    help="InnerConfig override (e.g. pack_row_segments=8, remat=true); repeatable")
    ap.add_argument("--saved-residuals", default="dots", help="ModelConfig.saved_residuals: dots or all")
    ap.add_argument("--out", default="profile.json")
    args = ap.parse_args(argv)

    cfg = get_preset(args.model).replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    cfg = cfg.replace(scan_unroll=args.scan_unroll or cfg.num_layers, attention_impl=args.attention,
                      saved_residuals=args.saved_residuals)
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    lora_cfg = LoraConfig(rank=32, alpha=64.0, targets=("q", "v"))
    if args.self_edits:
        icfg = inner.InnerConfig(epochs=args.epochs, append_eos=True)  # the knowledge config's
    else:
        icfg = inner.InnerConfig(epochs=args.epochs, shuffle=args.shuffle,
                                 length_buckets=tuple(int(b) for b in args.buckets.split(",")))
    for item in args.inner:
        key, value = item.split("=", 1)
        icfg = icfg.replace(**{key: parse_value(value)})
    if args.self_edits:
        from inner_selfedits import candidates as selfedit_candidates  # noqa: PLC0415
        from seal_jax.model.loading import load_tokenizer  # noqa: PLC0415
        tokenizer = load_tokenizer(args.tokenizer)
        cands = selfedit_candidates(tokenizer, args.self_edits, 50, 5, 3)
        hparams = inner.pin_seeds(None, len(cands))
        group = inner.group_candidates(cands, hparams, icfg, args.k)[args.group]
        plan = inner.build_plan([cands[i] for i in group], [hparams[i] for i in group], icfg,
                                pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
    else:
        plan = inner.build_plan(make_candidates(args.k, cfg.vocab_size),
                                [{"seed": k} for k in range(args.k)], icfg, pad_id=0)
    # The call's programs compile as the E-step compiles them (threads, in first-use order): the
    # compile time of a cold round's first call, for this model, attention and XLA flags.
    t0 = time.perf_counter()
    programs = inner.precompile(params, [plan], cfg=cfg, lora_cfg=lora_cfg, inner_cfg=icfg)
    precompile_s = time.perf_counter() - t0

    def run():
        result = inner.train_candidates(params, plan, cfg=cfg, lora_cfg=lora_cfg, inner_cfg=icfg)
        jax.block_until_ready(result.lora)
        return result

    first = run()  # dispatches the compiled programs once (and compiles any precompile missed)
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    per_kernel, counts = gpu_kernel_times(run)
    by_class = collections.Counter()
    for name, us in per_kernel.items():
        by_class[classify(name)] += us
    steps = int(plan.num_steps)
    kernels = sum(counts.values())
    memcpy = {n: c for n, c in counts.items() if "memcpy" in n.lower()}
    report = {
        "model": args.model, "k": args.k, "scan_unroll": cfg.scan_unroll, "steps": steps, "wall_s": wall,
        "workload": "self-edits, call %d" % args.group if args.self_edits else "uniform",
        "token_counts": {k: round(float(v), 4) for k, v in plan.token_counts().items()},
        "attention": args.attention, "saved_residuals": cfg.saved_residuals, "inner_overrides": args.inner, "programs": programs, "precompile_s": round(precompile_s, 1),
        # Each candidate's loss at its last step: compared between runs of other settings (e.g.
        # attention implementations), it shows they train the same function.
        "last_losses": [None if v is None else round(v, 5) for v in (
            next((float(x) for x in reversed(row) if x == x), None) for row in first.losses)],
        "kernels_per_step": round(kernels / steps, 1), "memcpy_calls": memcpy,
        "gpu_busy_s": sum(per_kernel.values()) / 1e6, "ms_per_step_wall": 1e3 * wall / steps,
        "ms_per_step_gpu": sum(per_kernel.values()) / 1e3 / steps,
        "by_class_ms_per_step": {k: round(v / 1e3 / steps, 3) for k, v in by_class.most_common()},
        "top_kernels": [{"name": n[:160], "ms_per_step": round(us / 1e3 / steps, 3), "calls": counts[n]}
                        for n, us in per_kernel.most_common(40)],
        # Every kernel, per step (calls / steps): where the launches come from, not only the time.
        "all_kernels": {n[:120]: [round(us / 1e3 / steps, 4), round(counts[n] / steps, 2)]
                        for n, us in per_kernel.most_common()},
    }
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("top_kernels", "all_kernels", "last_losses")},
                     indent=1))
    for row in report["top_kernels"][:25]:
        print(f"{row['ms_per_step']:8.3f} ms/step  x{row['calls']:<5} {row['name'][:110]}")


if __name__ == "__main__":
    main()
