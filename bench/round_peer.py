"""The reference's own cost for the candidates of `bench/round.py`, in PyTorch, one candidate at a time.

For each candidate of a workload file written by `bench/round.py --peer-workload` (the same real,
ragged token sequences and question prompts that seal_jax trains and evaluates), this does what the
reference's TTT server does per candidate: a fresh PEFT LoRA on the base, HF `Trainer` with batch 1,
every sequence padded to 2048 with pad = EOS labels (the peer's `seal` mode,
../shared/bench/peer_inner_loop.py), then greedy answers to the candidate's questions with transformers
`generate` (64 new tokens, batched, left padding), then the adapter is removed. Random bf16 weights:
throughput does not depend on the values.

    python bench/round_peer.py WORKLOAD.json --out peer_round.jsonl

Prints and appends one JSON row per candidate (train_s, eval_s, sequences, real tokens) and a summary
row with the median seconds per candidate, which `bench/round.py`'s report extrapolates to 750
candidates. The model configs of the 1B / 7B presets come from the peer script itself (carried as
.peer/peer_inner_loop.py on the GPU machine, or ../shared/bench/); the embedded SmolLM2-135M's from
its published architecture.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
for candidate_dir in (HERE.parent / ".peer", HERE.parent.parent / "shared" / "bench"):
    if (candidate_dir / "peer_inner_loop.py").exists():
        sys.path.insert(0, str(candidate_dir))
        break

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments  # noqa: E402


def model_config(name: str):
    if name in ("embedded", "smollm2-135m"):
        return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                           tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
                           head_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    from peer_inner_loop import CONFIGS  # the peer's own architectures

    return CONFIGS[name]()


def seal_mode_rows(sequences, eos_id: int, max_len: int):
    """The reference TTT server's batch: right-pad to max_len with EOS, labels = input ids (pads too)."""
    rows = []
    for seq in sequences:
        seq = torch.tensor(seq[:max_len], dtype=torch.long)
        ids = torch.full((max_len,), eos_id, dtype=torch.long)
        ids[: len(seq)] = seq
        att = torch.zeros(max_len, dtype=torch.long)
        att[: len(seq)] = 1
        rows.append({"input_ids": ids, "attention_mask": att, "labels": ids.clone()})
    return rows


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def answer(model, prompts, eos_id: int, max_new_tokens: int):
    """Greedy answers to all of a candidate's questions in one left-padded generate call."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), eos_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    with torch.no_grad():
        return model.generate(input_ids=ids.cuda(), attention_mask=att.cuda(), do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload")
    ap.add_argument("--out", default="peer_round.jsonl")
    ap.add_argument("--max-len", type=int, default=2048)
    args = ap.parse_args()
    work = json.loads(pathlib.Path(args.workload).read_text())
    cfg = model_config(work["model"])
    eos = int(work.get("eos_id", cfg.eos_token_id if cfg.eos_token_id is not None else 0))
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    lora = work["lora"]
    rows_out = []
    for c, cand in enumerate(work["candidates"]):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = get_peft_model(base, LoraConfig(
            r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=[f"{t}_proj" for t in lora["targets"]]))
        trainer = Trainer(model=model, args=TrainingArguments(
            output_dir=f"/tmp/peer_round_{c}", per_device_train_batch_size=1,
            num_train_epochs=float(work["epochs"]), learning_rate=float(work["learning_rate"]),
            lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
            report_to="none", remove_unused_columns=False, bf16=True, disable_tqdm=True),
            train_dataset=_Rows(seal_mode_rows(cand["sequences"], eos, args.max_len)))
        trainer.train()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        if cand["questions"]:
            answer(model, cand["questions"], eos, int(work.get("answer_max_new_tokens", 64)))
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        base = model.unload()
        row = {"model": work["model"], "candidate": c, "train_s": round(t1 - t0, 3),
               "eval_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
               "sequences": len(cand["sequences"]), "questions": len(cand["questions"]),
               "real_tokens": int(sum(len(s) for s in cand["sequences"]))}
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    # The first candidate pays CUDA/cuBLAS warm-up; the median of the rest is the steady cost.
    steady = rows_out[1:] if len(rows_out) > 1 else rows_out
    summary = {"model": work["model"], "summary": True, "candidates_measured": len(rows_out),
               "median_total_s": statistics.median(r["total_s"] for r in steady),
               "median_train_s": statistics.median(r["train_s"] for r in steady),
               "median_eval_s": statistics.median(r["eval_s"] for r in steady),
               "mean_sequences": statistics.mean(r["sequences"] for r in steady),
               "seconds_per_sequence_epoch": statistics.median(
                   r["train_s"] / max(1, r["sequences"] * float(work["epochs"])) for r in steady)}
    print(json.dumps(summary), flush=True)
    with open(args.out, "a") as f:
        for row in rows_out + [summary]:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
