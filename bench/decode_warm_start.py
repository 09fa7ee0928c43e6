"""How long does a process's first generation take when its programs are cached?

    python bench/decode_warm_start.py --out bench/results/decode_warm_start_cpu.json

The embedded model answers 24 short questions (greedy, 12 new tokens, batch 16), each time in a fresh
process, twice per process (the second call shows the cost once every program is in memory):
1. `cold`: empty cache directory; XLA compiles and the executables are stored.
2. `xla_cache_only`: XLA's cache warm, `SEAL_JAX_EXECUTABLE_CACHE=0` (every program traced and
   lowered again, then read from XLA's cache).
3. `executables`: both warm (the decode programs loaded without tracing).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys, time
from seal_jax import compile_cache
from seal_jax.model.embedded import load_embedded
from seal_jax.sampling import SamplingParams, generate

compile_cache.enable(sys.argv[1])
cfg, params, tok = load_embedded()
prompts = [tok.encode(f"Question {i}: what is the capital of country number {i}?") for i in range(24)]
sampling = [SamplingParams(temperature=0.0, max_new_tokens=12, stop_ids=tuple(tok.stop_ids))] * len(prompts)
seconds, tokens = [], None
for _ in range(2):
    start = time.perf_counter()
    out = generate(params, prompts, cfg=cfg, sampling=sampling, tokenizer=tok, batch_size=16)
    seconds.append(round(time.perf_counter() - start, 2))
    tokens = [list(map(int, g.token_ids)) for g in out]
print("RESULT " + json.dumps({"first_s": seconds[0], "second_s": seconds[1], "tokens": tokens,
                              **compile_cache.executable_counts()}))
"""


def run(cache: pathlib.Path, executables: bool) -> dict:
    env = dict(os.environ, SEAL_JAX_EXECUTABLE_CACHE="1" if executables else "0")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(cache)], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True)
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="decode_warm_start.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = pathlib.Path(tmp) / "xla_cache"
        rows = {"cold": run(cache, True), "xla_cache_only": run(cache, False), "executables": run(cache, True)}
    same = len({json.dumps(r.pop("tokens")) for r in rows.values()}) == 1
    report = {"workload": "embedded model, 24 prompts, greedy, 12 new tokens, batch 16",
              "device": "cpu", "cpu_count": os.cpu_count(), "same_tokens": same, "runs": rows}
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
