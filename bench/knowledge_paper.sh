#!/usr/bin/env bash
# Issue 12's paper-size knowledge experiment on the embedded SmolLM2-135M, as one resumable command
# (run from the repo root; no network needed):
#
#   bench/knowledge_paper.sh [--config.<key>=<value> ...]
#
# 1. ReST-EM (configs/knowledge.py:paper_embedded): 2 rounds of 50 passages x 5 self-edits x 3 reps;
#    the single-passage table on the reference's 200 evaluation passages before the first round (base,
#    passage only, base self-edits) and after each round (SEAL rounds 1 and 2);
# 2. CPT (paper_embedded_cpt): one adapter on the same 200 passages' base-model self-edits;
# 3. the report (bench/knowledge_paper_report.py) into $RESULTS.
#
# Each step continues the newest run folder under $RUN_ROOT/<run name> when there is one (the same
# arguments plus --config.resume=<folder>; a finished run only rewrites its results), so running the
# same command again resumes where the last one stopped. Extra arguments go to both runs and must be
# the same on every call (resume refuses a changed setting).
#
# Stopping: SIGTERM or SIGINT to the process group (what `timeout -s TERM` and Ctrl-C do). The run
# stops after its current call (a training chunk, a sampling call, the M-step), records and caches
# saved, and exits 130; this script then stops too (exit 130) without starting the next step. Leave
# the run time for that call (up to a few minutes on a GPU) before a hard kill. Do not signal the
# python process itself twice: a second signal abandons the current call at once (resumable, but the
# call's work is lost).
#
# Environment: DATA_DIR (default .peer) holds squad_dev_public.json and
# self_edits_qwen7b_train_iter0.json; RUN_ROOT (default runs/paper); RESULTS (default
# bench/results/knowledge_paper_embedded; "none": no report); ARCHIVE (optional: a .tar.gz to write
# both finished run folders into, without their checkpoints, ~0.5 GB each); PYTHON (default python3).
set -uo pipefail

DATA_DIR=${DATA_DIR:-.peer}
RUN_ROOT=${RUN_ROOT:-runs/paper}
RESULTS=${RESULTS:-bench/results/knowledge_paper_embedded}
PYTHON=${PYTHON:-python3}
REST_EM_NAME=knowledge-paper-embedded
CPT_NAME=knowledge-paper-embedded-cpt
export PYTHONUNBUFFERED=1

for f in squad_dev_public.json self_edits_qwen7b_train_iter0.json; do
  if [ ! -f "$DATA_DIR/$f" ]; then
    echo "knowledge_paper.sh: $DATA_DIR/$f not found (set DATA_DIR to the folder holding it)" >&2
    exit 2
  fi
done

# With a trap set, bash lets the running python finish its stop (it got the signal too, through the
# process group) and runs the trap afterwards, instead of dying and leaving python orphaned.
stopped=0
trap 'stopped=1' INT TERM

latest_run() {  # the newest marked run folder of a run name, or nothing (names sort by UTC time)
  local dir found=""
  for dir in "$RUN_ROOT/$1"/*/; do
    [ -f "${dir}seal_run.json" ] && found="${dir%/}"
  done
  printf '%s' "$found"
}

run_step() {  # variant run_name [args...]: run, or resume the newest run folder of that name
  local variant=$1 name=$2
  shift 2
  local dir
  dir=$(latest_run "$name")
  local args=(--config "configs/knowledge.py:$variant" --config.run_root="$RUN_ROOT"
              --config.run_name="$name" --config.progress=False "$@")
  if [ -n "$dir" ]; then
    echo "== $variant: resuming $dir"
    args+=(--config.resume="$dir")
  else
    echo "== $variant: new run under $RUN_ROOT/$name"
  fi
  "$PYTHON" -m seal_jax "${args[@]}"
}

finish_if_stopped() {  # step-name exit-status: stop the script after a failed or interrupted step
  if [ "$2" -ne 0 ] || [ "$stopped" -ne 0 ]; then
    local rc=$2
    [ "$rc" -eq 0 ] && rc=130
    echo "knowledge_paper.sh: $1 stopped (exit $rc); run the same command again to resume" >&2
    exit "$rc"
  fi
}

start=$SECONDS
run_step paper_embedded "$REST_EM_NAME" --config.data.path="$DATA_DIR/squad_dev_public.json" \
  --config.data.train_path="$DATA_DIR/self_edits_qwen7b_train_iter0.json" "$@"
finish_if_stopped "ReST-EM" $?
echo "== ReST-EM done after $((SECONDS - start)) s in this call"

run_step paper_embedded_cpt "$CPT_NAME" --config.data.path="$DATA_DIR/squad_dev_public.json" "$@"
finish_if_stopped "CPT" $?
echo "== CPT done after $((SECONDS - start)) s in this call"

if [ "$RESULTS" != none ]; then
  "$PYTHON" bench/knowledge_paper_report.py --rest-em "$(latest_run "$REST_EM_NAME")" \
    --cpt "$(latest_run "$CPT_NAME")" --out "$RESULTS"
  finish_if_stopped "the report" $?
fi
if [ -n "${ARCHIVE:-}" ]; then
  tar --exclude=checkpoints -czf "$ARCHIVE" "$(latest_run "$REST_EM_NAME")" "$(latest_run "$CPT_NAME")"
  finish_if_stopped "the archive" $?
  echo "== run folders (without checkpoints): $ARCHIVE"
fi
