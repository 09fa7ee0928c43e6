"""CPU benchmark of the embedded SmolLM2-135M: cold load time and greedy decode throughput.

    python bench/decode_cpu.py [--batch-sizes 1,16] [--new-tokens 64] [--prompt-tokens 32]

Measures
* load: `load_embedded()` in a fresh Python process (imports timed separately), i.e. a cold start;
* decode: `sampling.generate` greedy with no stop ids, so every row emits exactly --new-tokens.
  The first call of each shape compiles: `compile_s` is the tracing + lowering + XLA compile time
  jax reports through `jax.monitoring` during that call, `first_call_s` its wall time. Steady-state
  times are the best of --repeats calls.
  `decode_tokens_per_s` excludes the prefill: it is B * (N - 1) / (t(N) - t(1)), where t(1) is a
  prefill-plus-one-token call of the same batch.
Writes bench/results/decode_cpu.json and .md (machine info included: shared machines are noisy,
and the load average before and after is recorded so a reader can judge).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

COLD_LOAD = """
import json, time
t0 = time.perf_counter()
import jax, seal_jax.model.embedded as embedded
t1 = time.perf_counter()
cfg, params, tokenizer = embedded.load_embedded()
jax.block_until_ready(params)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def machine_info() -> dict:
    import jax

    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "platform": platform.platform(),
    }


def cold_load() -> dict:
    """load_embedded() in a fresh interpreter: nothing cached in memory, compile caches unused."""
    out = subprocess.run([sys.executable, "-c", COLD_LOAD], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_prompt(tokenizer, length: int) -> list[int]:
    text = ("The Apollo program was the third United States human spaceflight program carried out "
            "by NASA, which accomplished landing the first humans on the Moon from 1969 to 1972. ")
    ids = tokenizer.encode(text * 4)
    if len(ids) < length:
        raise ValueError(f"benchmark text encodes to {len(ids)} tokens, fewer than {length}")
    return ids[:length]


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile_seconds = []


def _record_compile(event: str, seconds: float, **_):
    if event in COMPILE_EVENTS:
        _compile_seconds.append(seconds)


def timed_generate(params, prompts, cfg, new_tokens, repeats):
    """(first-call wall s, compile s within it, best steady-state s, generations)."""
    from seal_jax.sampling import SamplingParams, generate

    sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, stop_ids=())
    run = lambda: generate(params, prompts, cfg=cfg, sampling=sampling, batch_size=len(prompts))
    _compile_seconds.clear()
    t0 = time.perf_counter()
    gens = run()
    first = time.perf_counter() - t0
    compile_s = sum(_compile_seconds)
    assert all(len(g.token_ids) == new_tokens for g in gens)
    steady = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        steady.append(time.perf_counter() - t0)
    return first, compile_s, min(steady), gens


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "decode_cpu"))
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    cold = cold_load()

    import jax
    from seal_jax.model.embedded import load_embedded

    jax.monitoring.register_event_duration_secs_listener(_record_compile)

    cfg, params, tokenizer = load_embedded()
    params = jax.device_put(params)  # once, as a real pipeline would; load_embedded returns numpy
    prompt = make_prompt(tokenizer, args.prompt_tokens)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [prompt] * batch
        _, _, steady_1, _ = timed_generate(params, prompts, cfg, 1, args.repeats)
        first_n, compile_n, steady_n, gens = timed_generate(params, prompts, cfg, args.new_tokens,
                                                            args.repeats)
        rows.append({
            "batch": batch,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "first_call_s": first_n,
            "compile_s": compile_n,
            "prefill_plus_1_s": steady_1,
            "total_s": steady_n,
            "end_to_end_tokens_per_s": batch * args.new_tokens / steady_n,
            "decode_tokens_per_s": batch * (args.new_tokens - 1) / max(steady_n - steady_1, 1e-9),
            "per_step_ms": 1e3 * (steady_n - steady_1) / (args.new_tokens - 1),
            "sample_text": tokenizer.decode(gens[0].token_ids)[:120],
        })
        print(json.dumps(rows[-1]), flush=True)

    result = {
        "benchmark": "decode_cpu",
        "model": "embedded SmolLM2-135M (seal_jax.model.embedded.load_embedded)",
        "dtypes": {"param": cfg.param_dtype, "compute": cfg.compute_dtype},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": ("Shared, busy machine (2 cores used by several engineers at once): absolute numbers "
                 "are noisy and pessimistic; compare runs only with similar load averages."),
        "cold_load": cold,
        "decode": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# CPU decode benchmark: embedded SmolLM2-135M",
        "",
        f"{r['when']} · {m['cpu_model']} · {m['usable_cores']} usable cores · jax {m['jax']} "
        f"({m['jax_backend']}) · params {r['dtypes']['param']}, compute {r['dtypes']['compute']}",
        "",
        f"**{r['note']}** Load average before/after: "
        f"{', '.join(f'{x:.1f}' for x in r['loadavg_before'])} / "
        f"{', '.join(f'{x:.1f}' for x in r['loadavg_after'])}.",
        "",
        f"Cold load (fresh process): imports {r['cold_load']['import_s']:.2f} s, "
        f"`load_embedded()` {r['cold_load']['load_s']:.2f} s.",
        "",
        "Greedy, no stop ids (every row emits all new tokens); times are the best of repeated calls "
        "after compilation.",
        "",
        "| batch | prompt | new | compile s | prefill+1 s | total s | decode tok/s | end-to-end tok/s "
        "| ms/step |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["decode"]:
        lines.append(
            f"| {row['batch']} | {row['prompt_tokens']} | {row['new_tokens']} | "
            f"{row['compile_s']:.1f} | {row['prefill_plus_1_s']:.2f} | {row['total_s']:.2f} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['end_to_end_tokens_per_s']:.1f} | "
            f"{row['per_step_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
