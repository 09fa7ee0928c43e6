#!/usr/bin/env bash
# One device call: seal_jax's inner loop and the PyTorch peer (shared/bench/peer_inner_loop.py, carried
# in .peer/) on the same GPU, same workload, results under $OUT.
# Usage: bench/gpu_inner_loop.sh MODEL KS SHUFFLES PEER_MODES [PEER_CANDIDATES] [extra inner_loop.py args]
set -uo pipefail
model="$1"; ks="$2"; shuffles="$3"; peer_modes="$4"; peer_cands="${5:-2}"; shift 5 || shift $#
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 - <<'PY' | tee "$OUT/env.txt"
import jax, flax, optax, orbax.checkpoint as ocp, torch, transformers, peft
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", ocp.__version__)
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
print("devices", jax.devices())
PY
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$OUT/env.txt"
python3 bench/inner_loop.py --models "$model" --ks "$ks" --shuffle "$shuffles" --out "$OUT/seal_jax.jsonl" "$@" 2>&1 | grep -v "^{\"peak" | tail -n 40
if [ "$peer_modes" != "none" ]; then
  (cd "$OUT" && python3 "$OLDPWD/.peer/peer_inner_loop.py" "$model" "$peer_modes" "$peer_cands" 2>&1 | grep -E "candidate|^\{" | tail -n 20)
fi
