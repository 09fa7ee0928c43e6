"""The paper-size SEAL round as users run it: a replay of one ReST-EM round on real, ragged self-edits.

Workload (issue "A paper-size round in minutes"): the first 50 passages of
../shared/data/squad/self_edits_qwen7b_train_iter0.json with their first 5 recorded Qwen2.5-7B
self-edits each x 3 reps = 750 candidates, each fine-tuned (the `paper` variant's inner loop: LoRA r32
alpha 64 on q/v, lr 1e-3, 10 epochs, batch 1, linear decay) and evaluated on its passage's questions
(greedy, 64 tokens) and graded (EM/F1), through the same E-step as `python -m seal_jax`
(`seal_jax.estep.score_self_edits`) with the `paper` config's defaults (candidates_per_call, length
buckets, shuffle); then one M-step on the best edit per passage; and a sampling phase of 250 self-edits
(50 passages x 5) with the policy's sampler (temperature 1, top-p 0.95).

    python bench/round.py --model embedded --out round_embedded.json
    python bench/round.py --model preset:qwen2.5-7b --out round_7b.json --peer-workload peer_7b.json
    python bench/round.py --passages 1 --edits 2 --reps 1 --sample 2 --set self_edit.max_new_tokens=32   # CPU smoke

Models: the embedded SmolLM2-135M (real weights), and random-weight presets (`preset:llama-3.2-1b`,
`preset:qwen2.5-7b`, bf16) with the embedded tokenizer, so token lengths are the real ones. Never read
accuracy off random weights. Random weights never emit EOS, so for presets every sampled self-edit runs
to its row's cap; the cap is set to the token length of the recorded self-edit it replaces, so the
sampling phase decodes as many tokens as the real self-edits have (the embedded model samples with the
`paper` cap and stops by itself).

Printed and written as JSON: wall time per phase (sample, train, evaluate = generate answers, grade,
M-step, and "precompile": the E-step's training programs compiled in parallel threads while the calls
run, the time until the last was ready) with
compile time (XLA backend compiles, from jax.monitoring) counted inside the phases and reported
separately, candidates per hour of the E-step, compiled programs, padding fraction of the
trained tokens, and peak device memory. `--peer-workload FILE` also writes the first few candidates
(their token sequences and question prompts) for `bench/round_peer.py`, the reference's own cost per
candidate, which the report extrapolates to all 750.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from seal_jax import compile_cache  # noqa: E402
from seal_jax import experiment as X  # noqa: E402
from seal_jax import inner  # noqa: E402
from seal_jax.config import load_config  # noqa: E402
from seal_jax.estep import score_self_edits  # noqa: E402
from seal_jax.sampling import SamplingParams  # noqa: E402
from seal_jax.tasks.knowledge import data as D  # noqa: E402
from seal_jax.tasks.knowledge.setup import knowledge_domain  # noqa: E402

DEFAULT_EDITS = REPO.parent / "shared" / "data" / "squad" / "self_edits_qwen7b_train_iter0.json"


class PhaseClock:
    """Wall time per phase (nested phases count only in the innermost) and XLA compile time per phase.

    Phases are tracked per thread: the E-step evaluates one call in a worker thread while the main
    thread trains the next, so "train" and "evaluate" overlap and their sum exceeds the E-step's wall
    time (reported separately as `estep_wall_seconds`).
    """

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.compile_seconds = collections.defaultdict(float)
        self.calls = collections.Counter()
        self._local = threading.local()
        self.background_phase = None
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    @property
    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _on_event(self, event: str, duration: float, **_kwargs):
        if "backend_compile" not in event:
            return
        # Compiles in threads of their own (the parallel precompile) count in the phase that
        # started them; their sum exceeds that phase's wall time when they overlap.
        phase = self._stack[-1] if self._stack else self.background_phase
        if phase is not None:
            self.compile_seconds[phase] += duration

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        outer = self._stack[-1] if self._stack else None
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            self.calls[name] += 1
            if outer is not None:
                self.seconds[outer] -= elapsed

    def wrap(self, obj, method: str, name: str):
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            with self.phase(name):
                out = original(*args, **kwargs)
                jax.block_until_ready(getattr(out, "lora", None))
            # One line per call, so a run cut short still shows its pace.
            print(f"[{name}] call {self.calls[name]}: {len(args[0]) if args else 0} items, "
                  f"{time.perf_counter() - start:.2f} s (compile so far {self.compile_seconds[name]:.1f} s)",
                  flush=True)
            return out

        setattr(obj, method, timed)


def load_workload(path: pathlib.Path, passages: int, edits: int):
    records = json.loads(path.read_text())[:passages]
    ps = D.passages_from_records([{"title": r["title"], "context": r["context"],
                                   "questions": r["questions"]} for r in records], source=str(path))
    return ps, [list(r["completions"][:edits]) for r in records]


def peak_memory_gib() -> float | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends may not report
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--edits-file", default=str(DEFAULT_EDITS))
    ap.add_argument("--passages", type=int, default=50)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sample", type=int, default=250, help="self-edits to sample (0: skip)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (e.g. candidates_per_call=64); the default is the paper config")
    ap.add_argument("--out", default="round.json")
    ap.add_argument("--peer-workload", default="")
    ap.add_argument("--peer-candidates", type=int, default=4)
    ap.add_argument("--executable-cache", choices=("on", "off"), default="on",
                    help="off: XLA's compilation cache only, every program traced and lowered again "
                         "(the comparison for a warm run)")
    args = ap.parse_args()

    overrides = {"model": args.model, "grader.kind": "em_f1", "progress": False,
                 "run_root": "/tmp/seal_round_bench"}  # the compile cache goes under run_root
    if args.model.startswith("preset:"):
        overrides.update({"tokenizer": "embedded", "param_dtype": "bfloat16"})
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    c = load_config(str(REPO / "configs" / "knowledge.py") + ":paper", overrides)
    clock = PhaseClock()
    t_start = time.perf_counter()
    with clock.phase("load"):
        engine = X.build_engine(c)
        domain = knowledge_domain(c, engine.tokenizer)
    if args.executable_cache == "off":
        os.environ[compile_cache.EXECUTABLES_ENV] = "0"
    print(f"[load] {clock.seconds['load']:.1f} s; candidates_per_call={engine.settings.candidates_per_call} "
          "(0: fitted to the device)", flush=True)
    clock.wrap(engine, "train", "train")
    clock.wrap(engine, "answer", "evaluate")
    clock.wrap(domain, "score", "grade")
    start_precompile = engine.start_precompile_training

    def timed_precompile(*a, **kw):
        # Runs in background threads beside the calls: its compiles count in "precompile" (their
        # sum exceeds its wall time), and its wall time overlaps "train" and "evaluate".
        clock.background_phase = "precompile"
        handle = start_precompile(*a, **kw)

        def finished(h):
            clock.background_phase = None
            clock.seconds["precompile"] += h.seconds
            print(f"[precompile] {h.programs} training programs ready {h.seconds:.1f} s after the start, "
                  f"overlapping the calls ({h.wait()} compiled here or by a call that came first; "
                  f"compile time summed over threads {clock.compile_seconds['precompile']:.1f} s; "
                  f"executable cache so far {compile_cache.executable_counts()})",
                  flush=True)

        handle.add_done_callback(finished)
        return handle

    engine.start_precompile_training = timed_precompile
    # The plans of the training calls (precompile builds the same plans again: not counted twice).
    plans = []
    train_fitting = inner.train_candidates_fitting

    def recording_train_fitting(base_params, plan, **kw):
        plans.append(plan)
        return train_fitting(base_params, plan, **kw)

    inner.train_candidates_fitting = recording_train_fitting
    shapes_before = inner.compiled_shape_count()

    passages, edits = load_workload(pathlib.Path(args.edits_file), args.passages, args.edits)
    items = [(p, i, e) for p, es in zip(passages, edits) for i, e in enumerate(es)]
    estep_start = time.perf_counter()
    outcomes = score_self_edits(engine, domain, items, reps=args.reps, seed=0, phase="bench",
                                progress=False)
    estep_s = time.perf_counter() - estep_start
    # Printed now: a run cut later (its M-step, by a time limit) still shows the E-step's wall time.
    print(f"[estep] {estep_s:.1f} s wall for {sum(len(o.records) for o in outcomes)} candidates", flush=True)
    records = [r for o in outcomes for r in o.records]
    trained = [r for r in records if not r.get("failed")]
    failed = [r for r in records if r.get("failed")]

    # M-step: the best edit per passage (the reference's rule), one SFT of the policy.
    by_context = collections.defaultdict(list)
    for o in outcomes:
        if o.selectable:
            by_context[o.context_id].append(o)
    by_id = {p.id: p for p in passages}
    chosen = [max(group, key=lambda o: o.reward) for group in by_context.values()]
    examples = [(*domain.sft_example(by_id[o.context_id], o.self_edit), 1.0) for o in chosen]
    m_step = X.make_m_step(engine, X.sft_config(c))
    with clock.phase("m_step"):
        update = m_step(engine.params, examples)
        jax.block_until_ready(update.params)
    sft_metrics = update.metrics
    del update
    print(f"[m_step] {clock.seconds['m_step']:.1f} s", flush=True)

    # Sampling: 5 self-edits per passage from the policy's prompt.
    sampled_tokens = 0
    if args.sample:
        k = max(1, args.sample // max(1, len(passages)))
        prompt_ids = [domain.self_edit_prompt(p) for p in passages for _ in range(k)][:args.sample]
        if args.model.startswith("preset:"):  # random weights never stop: cap at the real lengths
            caps = [len(engine.tokenizer.encode(e)) for es in edits for e in (es * k)[:k]][:len(prompt_ids)]
        else:
            caps = [int(c.self_edit.max_new_tokens)] * len(prompt_ids)
        limit = int(engine.cfg.max_position_embeddings)
        sampling = [SamplingParams(temperature=float(c.self_edit.temperature), top_p=float(c.self_edit.top_p),
                                   max_new_tokens=max(1, min(cap, limit - len(p) - 1)), seed=i,
                                   stop_ids=tuple(engine.tokenizer.stop_ids))
                    for i, (p, cap) in enumerate(zip(prompt_ids, caps))]
        from seal_jax.sampling import generate

        with clock.phase("sample"):
            gens = generate(engine.params, prompt_ids, cfg=engine.cfg, sampling=sampling,
                            tokenizer=engine.tokenizer, batch_size=engine.settings.sample_batch_size)
        sampled_tokens = int(sum(len(g.token_ids) for g in gens))

    tokens = [p.token_counts() for p in plans]
    real = sum(t["real_tokens"] for t in tokens)
    computed = sum(t["computed_tokens"] for t in tokens)
    n_cand = len(records)
    report = {
        "model": args.model, "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "jax": jax.__version__, "candidates": n_cand, "trained": len(trained), "failed": len(failed),
        "passages": len(passages), "edits_per_passage": args.edits, "reps": args.reps,
        "candidates_per_call": int(c.candidates_per_call),
        "candidates_per_train_call": max((p.num_candidates for p in plans), default=0),
        "fitted_candidates_per_call": getattr(inner, "fitted_candidates_per_call", lambda *a: None)(
            engine.cfg, engine.settings.lora, engine.settings.inner),
        "seconds": {k: round(v, 2) for k, v in clock.seconds.items()},
        "compile_seconds": {k: round(v, 2) for k, v in clock.compile_seconds.items()},
        "estep_wall_seconds": round(estep_s, 2),
        "candidates_per_hour": round(n_cand / estep_s * 3600) if estep_s else None,
        "compiled_train_programs": inner.compiled_shape_count() - shapes_before,
        "executable_cache": {"enabled": args.executable_cache == "on", **compile_cache.executable_counts()},
        "train_calls": clock.calls["train"], "eval_calls": clock.calls["evaluate"],
        "real_train_tokens": real, "computed_train_tokens": computed,
        "padding_fraction": round(1 - real / max(1, computed), 4),
        "mean_reward": float(np.mean([o.reward for o in outcomes if o.reward is not None] or [float("nan")])),
        "m_step": {"examples": len(examples), **{k: v for k, v in sft_metrics.items() if k != "losses"}},
        "sampled_self_edits": args.sample, "sampled_tokens": sampled_tokens,
        "sample_tok_per_s": round(sampled_tokens / clock.seconds["sample"]) if args.sample else None,
        "peak_memory_gib": peak_memory_gib(),
        "total_seconds": round(time.perf_counter() - t_start, 2),
    }
    if args.peer_workload:
        first = [(o, r) for o in outcomes for r in o.records if not r.get("failed")][:args.peer_candidates]
        work = {"model": args.model.removeprefix("preset:"), "eos_id": engine.eos_id,
                "epochs": float(c.inner.epochs), "learning_rate": float(c.inner.learning_rate),
                "lora": {"rank": int(c.lora.rank), "alpha": float(c.lora.alpha), "targets": list(c.lora.targets)},
                "answer_max_new_tokens": int(c.eval.max_new_tokens), "candidates": []}
        for o, _r in first:
            spec = domain.build_candidate(by_id[o.context_id], o.self_edit)
            work["candidates"].append({"sequences": [np.asarray(s).tolist() for s in spec.sequences],
                                       "questions": [r.prompt_ids for r in domain.eval_requests(by_id[o.context_id])]})
        # What the peer needs to extrapolate: every candidate's number of sequences (its cost is
        # per padded 2048-token sequence, independent of length) and of questions.
        work["all_candidates"] = [{"sequences": len(domain.build_candidate(by_id[o.context_id], o.self_edit).sequences),
                                   "questions": len(by_id[o.context_id].questions)}
                                  for o in outcomes for r in o.records if not r.get("failed")]
        pathlib.Path(args.peer_workload).write_text(json.dumps(work))
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
