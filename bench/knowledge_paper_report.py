"""The results folder of issue 12's paper-size knowledge run (bench/knowledge_paper.sh), from its runs.

    python bench/knowledge_paper_report.py --rest-em <run dir> [--cpt <run dir>] --out <folder>

Reads the run folders only (works on an unfinished run: what exists is reported) and writes:

  table.md             the single-passage table with 95% t-intervals, paired differences between
                       conditions on the same passages (did SEAL beat the base model's self-edits?),
                       the ReST-EM rounds, CPT, the degeneration check and wall time per phase
  summary.json         every number of table.md
  accuracy.png         accuracy per condition with intervals; self-edit lengths per policy
  config_rest_em.json, config_cpt.json     the runs' resolved configs
  results_rest_em.md, results_cpt.md       the runs' own reports
  records_sample_rest_em.jsonl             the first 20 candidate records
  selected_self_edits_round<r>.json        the M-step's examples of each round (best of k per passage)
  self_edit_samples.md the first self-edit of each policy on the same evaluation passages
  timings_rest_em.jsonl, timings_cpt.jsonl the raw phase timings

Paired differences: per passage, accuracy under condition A minus under condition B (the same
passages and questions; passages ungraded in either are left out), mean ± half-width of a 95% Student-t
interval over passages. The degeneration check asks whether the M-step makes the policy's self-edits
worse: per policy, on the same evaluation passages (k samples each), the share of empty and of
repetitive self-edits (more than half of the word 4-grams repeat an earlier one), the share that ran to
the generation cap, and the length distribution. Token counts are the tokenizer's re-encoding of the
saved (decoded, stripped) text, within a few tokens of what the sampler emitted: "at cap" means at
least 98% of `self_edit.max_new_tokens`.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import statistics
import sys
from typing import Any, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from seal_jax import results as R  # noqa: E402
from seal_jax.checkpoints import RecordLog  # noqa: E402
from seal_jax import timings as T  # noqa: E402

RECORDS_IN_SAMPLE = 20
SAMPLE_PASSAGES = 5  # passages shown in self_edit_samples.md
SAMPLE_CHARS = 800
REPETITIVE_SHARE = 0.5  # share of repeated word 4-grams above which a self-edit counts as repetitive
AT_CAP = 0.98

CONDITION_NAMES = {
    ("base", "base"): "base model, no adaptation",
    ("base", "passage_only"): "train on passage only",
    ("base", "self_edits"): "passage + base model's self-edits",
}


def row_name(model: str, condition: str) -> str:
    if (model, condition) in CONDITION_NAMES:
        return CONDITION_NAMES[(model, condition)]
    r = model.removeprefix("seal_round")
    return {"self_edits": f"SEAL round {r}: its self-edits, adapting the round-{r} policy",
            "base": f"round-{r} policy, no adaptation",
            "passage_only": f"round-{r} policy, passage only"}.get(condition, f"{model} {condition}")


# ------------------------------------------------------------------------------------------------
# Reading a run


def read_json(path: pathlib.Path, default: Any = None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def read_records(run: pathlib.Path) -> list[dict]:
    # The run's own reader: it drops the unterminated last line a killed process may leave.
    return RecordLog(run / "records.jsonl").read()


def latest_records(records: Sequence[dict], phase: str) -> dict[tuple, dict]:
    """{(passage id, edit index, rep): record} of a phase's candidates; the last record of a candidate
    wins (a resumed run may have written it again)."""
    latest: dict[tuple, dict] = {}
    for r in records:
        if r.get("phase") == phase and "edit_index" in r:
            latest[(r["context_id"], r["edit_index"], r["rep"])] = r
    return latest


def per_passage_rewards(records: Sequence[dict], phase: str) -> dict[str, float]:
    """{passage id: reward} of a table condition: the mean over its reps, failures counting 0 and
    ungraded reps left out (estep.EditOutcome's rule); the last record of a candidate wins (resume)."""
    reps: dict[str, list[float]] = {}
    for (cid, _, _), r in latest_records(records, phase).items():
        if r.get("failed"):
            reps.setdefault(cid, []).append(0.0)
        elif r.get("reward") is not None:
            reps.setdefault(cid, []).append(float(r["reward"]))
    return {cid: sum(v) / len(v) for cid, v in reps.items() if v}


def condition_rewards(run: pathlib.Path, records: Sequence[dict], model: str,
                      condition: str) -> dict[str, float]:
    if condition == "base":  # the un-adapted model: cached by label, not in the records
        return read_json(run / f"baseline_{model}.json", {}).get("reward", {})
    return per_passage_rewards(records, f"table/{model}/{condition}")


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict:
    """A - B per passage graded under both: mean, 95% t half-width, n, and how many went each way."""
    common = sorted(set(a) & set(b))
    diffs = [a[c] - b[c] for c in common]
    mean, ci = R.mean_ci95(diffs)
    return {"n": len(common), "mean": mean, "ci95": ci,
            "low": mean - ci if math.isfinite(ci) else float("nan"),
            "high": mean + ci if math.isfinite(ci) else float("nan"),
            "a_better": sum(d > 0 for d in diffs), "b_better": sum(d < 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs)}


def verdict(diff: dict, a: str, b: str) -> str:
    """One plain sentence on a paired difference: does its interval exclude zero?"""
    if diff["n"] < 2 or not math.isfinite(diff["ci95"]):
        return f"{a} vs {b}: too few passages ({diff['n']}) for an interval."
    span = f"{100 * diff['mean']:+.1f} pp [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}] over {diff['n']} passages"
    if diff["low"] > 0:
        return f"{a} beat {b}: {span}."
    if diff["high"] < 0:
        return f"{a} was worse than {b}: {span}."
    return f"{a} did not differ detectably from {b}: {span}; the interval includes 0."


# ------------------------------------------------------------------------------------------------
# Reward by the number of training sequences

# Lower edges of the bins of "sequences trained per candidate" (the passage plus the self-edit's lines):
# each sequence is another 10-epoch slice of the inner loop, so this is its training budget.
SEQUENCE_BIN_EDGES = (0, 2, 4, 8, 16)


def sequence_bin(num_sequences: int) -> str:
    edges = SEQUENCE_BIN_EDGES
    for low, high in zip(edges, edges[1:]):
        if num_sequences < high:
            return f"{low}-{high - 1}"
    return f"{edges[-1]}+"


SEQUENCE_BINS = tuple(sequence_bin(e) for e in SEQUENCE_BIN_EDGES)


def reward_by_sequences(records: Sequence[dict], phase: str) -> dict[str, dict]:
    """{bin: {"n", "reward"}} over a phase's graded candidates (the last record of each wins, failures
    score 0 in bin 0-1)."""
    rewards: dict[str, list[float]] = {}
    for r in latest_records(records, phase).values():
        if r.get("failed"):
            rewards.setdefault(sequence_bin(0), []).append(0.0)
        elif r.get("reward") is not None:
            rewards.setdefault(sequence_bin(int(r.get("num_sequences", 0))), []).append(float(r["reward"]))
    return {b: {"n": len(v), "reward": statistics.fmean(v)} for b, v in rewards.items()}


def binned_mean(bins: dict[str, dict]) -> float:
    n = sum(v["n"] for v in bins.values())
    return sum(v["reward"] * v["n"] for v in bins.values()) / n if n else float("nan")


def length_matched_reward(reference: dict[str, dict], target: dict[str, dict]) -> dict:
    """The reference condition's mean reward re-weighted to the target's sequence-count mix: what the
    reference's self-edits would score if they had the target's lengths. Bins the reference never
    visits are left out and counted (`covered` of `n`)."""
    covered = {b: v["n"] for b, v in target.items() if b in reference}
    n = sum(v["n"] for v in target.values())
    if not covered:
        return {"matched": float("nan"), "covered": 0, "n": n}
    matched = sum(reference[b]["reward"] * w for b, w in covered.items()) / sum(covered.values())
    return {"matched": matched, "covered": sum(covered.values()), "n": n}


# ------------------------------------------------------------------------------------------------
# The degeneration check


def repeated_4gram_share(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    if not grams:
        return 0.0
    seen, repeated = set(), 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams)


def self_edit_stats(texts: Sequence[str], count_tokens, cap: int) -> dict:
    """Emptiness, repetition, cap hits and lengths of a policy's self-edits."""
    n = len(texts)
    if not n:
        return {"n": 0}
    tokens = [count_tokens(t) for t in texts]
    words = [len(t.split()) for t in texts]
    lines = [len([x for x in t.splitlines() if x.strip()]) for t in texts]

    def quantile(values, q):
        return float(sorted(values)[min(len(values) - 1, int(q * len(values)))])

    return {
        "n": n,
        "empty": sum(not t.strip() for t in texts) / n,
        "repetitive": sum(repeated_4gram_share(t) > REPETITIVE_SHARE for t in texts) / n,
        "at_cap": sum(k >= AT_CAP * cap for k in tokens) / n,
        "tokens_median": float(statistics.median(tokens)), "tokens_p90": quantile(tokens, 0.9),
        "tokens_mean": float(statistics.fmean(tokens)), "words_median": float(statistics.median(words)),
        "lines_median": float(statistics.median(lines)),
        "tokens": tokens,
    }


def token_counter(run: pathlib.Path):
    """The policy's tokenizer (saved with the run) as a counter; word counts if it cannot be loaded."""
    try:
        from seal_jax.model.tokenizer import Tokenizer

        tok = Tokenizer.from_hf_dir(run / "policy")
        return (lambda text: len(tok.encode(text, add_special=False))), "tokens"
    except Exception as e:  # a report must not fail for want of a tokenizer
        print(f"note: no tokenizer in {run / 'policy'} ({e}); counting words instead", file=sys.stderr)
        return (lambda text: len(text.split())), "words"


def sample_files(run: pathlib.Path) -> list[tuple[str, str, dict]]:
    """(policy label, what, saved samples) of the run's self-edit files, in run order."""
    out = []
    for tag, label, what in [("base_eval", "base", "evaluation passages")] + [
            (f"seal_round{r}_eval", f"seal_round{r}", "evaluation passages") for r in range(1, 100)] + [
            (f"round{r}", "base" if r == 0 else f"seal_round{r}", "training passages of round "
             f"{r + 1}") for r in range(100)]:
        saved = read_json(run / f"self_edits_{tag}.json")
        if saved is not None:
            out.append((label, what, dict(saved, tag=tag)))
    return out


# ------------------------------------------------------------------------------------------------
# Building the summary


def rest_em_summary(run: pathlib.Path) -> dict:
    config = read_json(run / "config.json", {})
    state = read_json(run / "results.json", {"table": [], "rounds": [], "round": 0})
    records = read_records(run)
    rows = [dict(r, name=row_name(r["model"], r["condition"])) for r in state.get("table", [])]
    have = {(r["model"], r["condition"]) for r in rows}
    rewards = {key: condition_rewards(run, records, *key) for key in have}
    rounds = sorted({int(m.removeprefix("seal_round")) for m, _ in have if m.startswith("seal_round")})

    comparisons = []

    def compare(a, b):
        if a in rewards and b in rewards:
            diff = paired_difference(rewards[a], rewards[b])
            comparisons.append(dict(diff, a=row_name(*a), b=row_name(*b),
                                    sentence=verdict(diff, row_name(*a), row_name(*b))))

    for r in rounds:
        compare((f"seal_round{r}", "self_edits"), ("base", "self_edits"))
    for r in rounds[1:]:
        compare((f"seal_round{r}", "self_edits"), (f"seal_round{r - 1}", "self_edits"))
    compare(("base", "self_edits"), ("base", "passage_only"))
    compare(("base", "passage_only"), ("base", "base"))
    for r in rounds:
        compare((f"seal_round{r}", "base"), ("base", "base"))

    # Rows: each policy's self-edit condition by its model label, and the passage alone for scale.
    by_sequences = {}
    if ("base", "passage_only") in have:
        by_sequences["passage only"] = reward_by_sequences(records, "table/base/passage_only")
    for model, condition in sorted(have):
        if condition == "self_edits":
            by_sequences[model] = reward_by_sequences(records, f"table/{model}/self_edits")
    length_matched = []
    for r in rounds:
        model = f"seal_round{r}"
        if model in by_sequences and "base" in by_sequences:
            length_matched.append(dict(length_matched_reward(by_sequences["base"], by_sequences[model]),
                                       model=model, actual=binned_mean(by_sequences[model]),
                                       base=binned_mean(by_sequences["base"])))

    count, unit = token_counter(run)
    cap = int(config.get("self_edit", {}).get("max_new_tokens", 0)) or 1
    degeneration = []
    for label, what, saved in sample_files(run):
        texts = [t for edits in saved["self_edits"] for t in edits]
        degeneration.append(dict(self_edit_stats(texts, count, cap), policy=label, passages=what,
                                 tag=saved["tag"], k=saved.get("k")))

    selected = []
    for r in range(len(state.get("rounds", []))):
        chosen = read_json(run / f"sft_round{r}.json", [])
        not_better = sum(c["reward"] is not None and c.get("baseline") is not None
                         and c["reward"] <= c["baseline"] for c in chosen)
        selected.append({"round": r, "examples": len(chosen), "not_above_baseline": not_better,
                         "tokens_median": (float(statistics.median([count(c["completion"]) for c in chosen]))
                                           if chosen else float("nan")),
                         "reward_mean": (float(statistics.fmean([c["reward"] for c in chosen]))
                                         if chosen else float("nan"))})
    return {"run": str(run), "config": config, "rows": rows, "comparisons": comparisons,
            "rounds": state.get("rounds", []), "rounds_done": state.get("round", 0),
            "degeneration": degeneration, "by_sequences": by_sequences,
            "length_matched": length_matched, "length_unit": unit, "cap": cap, "selected": selected,
            "eval_passages": len(read_json(run / "split.json", {}).get("eval", [])),
            "timings": T.summarize(T.read(run)), "sessions": len({e.get("session") for e in T.read(run)})}


def cpt_summary(run: pathlib.Path) -> dict:
    out = read_json(run / "results.json", {})
    return {"run": str(run), "config": read_json(run / "config.json", {}), "rows": out.get("rows", []),
            "passages": out.get("passages"), "questions": out.get("questions"),
            "timings": T.summarize(T.read(run)), "sessions": len({e.get("session") for e in T.read(run)})}


# ------------------------------------------------------------------------------------------------
# Writing


def pct(v: Optional[float]) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def timing_groups(rows: Sequence[dict]) -> list[tuple[str, float]]:
    """Seconds per kind of work (sampling, E-step, M-step, ...), summed over rounds and tables."""
    groups: dict[str, float] = {}
    for r in rows:
        p = r["phase"]
        kind = ("setup (load, compile caches)" if p == "setup" else
                "sampling self-edits" if p.endswith("/sample") else
                "E-step (train + answer + grade)" if p.endswith("/estep") else
                "M-step (SFT + merge)" if p.endswith("/m_step") else
                "checkpoints" if p.endswith("/checkpoint") else
                "un-adapted answers (baselines)" if p.endswith("/baseline") or p.endswith("/base") else
                "table: train + answer + grade" if p.startswith("table/") else
                "CPT: train" if p.endswith("/train") else "CPT: answer + grade" if p.endswith("/eval")
                else p)
        groups[kind] = groups.get(kind, 0.0) + r["seconds"]
    return list(groups.items())


def markdown(rest: dict, cpt: Optional[dict]) -> str:
    c = rest["config"]
    md = ["# Knowledge incorporation at paper size on the embedded SmolLM2-135M (issue 12)", "",
          f"ReST-EM run `{pathlib.Path(rest['run']).name}`: {rest['rounds_done']} of "
          f"{c.get('rest_em', {}).get('rounds')} rounds of {c.get('rest_em', {}).get('passages_per_round')} "
          f"passages x {c.get('self_edit', {}).get('k')} self-edits x {c.get('rest_em', {}).get('reps')} reps; "
          f"table on {rest['eval_passages']} evaluation passages, {c.get('table', {}).get('self_edit_samples')} "
          f"samples per passage (the first {c.get('table', {}).get('fallback_rule')} one is trained, "
          f"{c.get('eval', {}).get('reps')} fine-tune each). Model `{c.get('model')}` (chat={c.get('chat')}), "
          f"grader `{c.get('grader', {}).get('kind')}` (lexical; the paper graded with GPT-4.1, so "
          "accuracies compare with each other, not with the paper's).", "",
          "## Single-passage table", "",
          "Accuracy = mean over passages of per-passage accuracy, in %, ± half-width of a 95% Student-t "
          "interval over passages; pooled = over all questions. Failed = candidates that could not be "
          "trained (e.g. an empty self-edit: reward 0); ungraded = passages left out.", "",
          R.markdown_table(["condition", "model", "accuracy %", "±95% CI", "pooled %", "passages",
                            "questions", "failed", "ungraded"],
                           [[r["name"], r["model"], pct(r["accuracy"]), pct(r["ci95"]), pct(r["pooled"]),
                             r["passages"], r["questions"], r["failed_candidates"],
                             r.get("ungraded_passages", 0)] for r in rest["rows"]]),
          "", "## Did SEAL beat the base model's self-edits? (paired, same passages)", ""]
    md += [f"- {d['sentence']} ({d['a_better']} passages up, {d['b_better']} down, {d['ties']} tied)"
           for d in rest["comparisons"]]
    if not rest["comparisons"]:
        md.append("- no pair of conditions finished yet")
    if rest["rounds"]:
        md += ["", "## ReST-EM rounds (training passages)", "",
               R.markdown_table(["round", "passages", "self-edits", "un-adapted %", "mean reward %",
                                 "selected reward %", "failed", "ungraded", "selected", "SFT steps",
                                 "SFT loss first → last"],
                                [[s["round"], s["contexts"], s["self_edits"], pct(s["baseline_mean"]),
                                  pct(s["reward_mean"]), pct(s["selected_reward_mean"]),
                                  s["failed_self_edits"], s["ungraded_candidates"], s["selected"],
                                  s.get("sft", {}).get("steps", "—"), _loss_span(s.get("sft", {}))]
                                 for s in rest["rounds"]])]
    if rest["selected"]:
        md += ["", "Selected self-edits (the M-step's examples): "
               + "; ".join(f"round {s['round']}: {s['examples']} examples, mean reward {pct(s['reward_mean'])}%, "
                           f"{s['not_above_baseline']} not above their passage's un-adapted accuracy, "
                           f"median {s['tokens_median']:.0f} {rest['length_unit']}" for s in rest["selected"])]
    md += ["", "## Degeneration check: does the M-step make the policy's self-edits worse?", "",
           f"Per policy, all sampled self-edits; lengths in {rest['length_unit']} (re-encoded), cap "
           f"{rest['cap']}; repetitive = more than {REPETITIVE_SHARE:.0%} of word 4-grams repeat an earlier "
           "one. The evaluation-passage rows are the same passages for every policy.", "",
           R.markdown_table(["policy", "passages", "samples", "empty %", "repetitive %", "at cap %",
                             "median", "p90", "mean", "median lines"],
                            [[d["policy"], d["passages"], d["n"], pct(d.get("empty")), pct(d.get("repetitive")),
                              pct(d.get("at_cap")), d.get("tokens_median", "—"), d.get("tokens_p90", "—"),
                              round(d.get("tokens_mean", float("nan")), 1), d.get("lines_median", "—")]
                             for d in rest["degeneration"]])]
    if rest.get("by_sequences"):
        md += ["", "## Reward by the number of training sequences (passage + self-edit lines)", "",
               "Table candidates binned by how many sequences they trained on (each one "
               f"{c.get('inner', {}).get('epochs', '?')} epochs of the inner loop at batch size "
               f"{c.get('inner', {}).get('batch_size', '?')}): n, "
               "mean reward %.", "",
               R.markdown_table(["policy", *SEQUENCE_BINS],
                                [[model, *(f"{bins[b]['n']}: {pct(bins[b]['reward'])}" if b in bins else "—"
                                           for b in SEQUENCE_BINS)]
                                 for model, bins in rest["by_sequences"].items()])]
        for m in rest["length_matched"]:
            md.append(f"- {m['model']}: {pct(m['actual'])}% over its candidates; the base model's self-edits "
                      f"scored {pct(m['base'])}%, and {pct(m['matched'])}% re-weighted to {m['model']}'s "
                      f"sequence counts ({m['covered']} of {m['n']} candidates in bins both visit): "
                      f"{100 * (m['matched'] - m['base']):+.1f} of the {100 * (m['actual'] - m['base']):+.1f} pp "
                      "difference goes with the shift in length alone.")
    if cpt and cpt["rows"]:
        md += ["", f"## CPT: one adapter on {cpt['passages']} passages ({cpt['questions']} questions)", "",
               "Pooled accuracy over all questions (the reference's CPT metric, one run); accuracy = mean "
               "over passages ± 95% t half-width.", "",
               R.markdown_table(["condition", "pooled %", "accuracy %", "±95% CI", "sequences", "steps",
                                 "failed self-edits"],
                                [[r["condition"], pct(r["pooled_accuracy"]), pct(r.get("accuracy")),
                                  pct(r.get("ci95")), r["sequences"], r.get("steps", 0),
                                  r.get("failed_self_edits", 0)] for r in cpt["rows"]])]
    md += ["", "## Wall time per phase", ""]
    for name, part in (("ReST-EM", rest), ("CPT", cpt)):
        if not part or not part["timings"]:
            continue
        total = sum(r["seconds"] for r in part["timings"])
        md += [f"{name}: {total:.0f} s over {part['sessions']} session(s) (a resumed phase is summed; "
               "compilation is inside the phases).", "",
               R.markdown_table(["work", "seconds", "share %"],
                                [[k, round(v, 1), pct(v / total if total else float("nan"))]
                                 for k, v in timing_groups(part["timings"])]), "",
               "<details><summary>every phase</summary>", "",
               R.markdown_table(["phase", "seconds", "sessions", "finished"],
                                [[r["phase"], r["seconds"], r["sessions"], "yes" if r["done"] else "no"]
                                 for r in part["timings"]]), "", "</details>", ""]
    return "\n".join(md) + "\n"


def _loss_span(sft: dict) -> str:
    losses = [x for x in sft.get("losses", []) if x is not None and math.isfinite(x)]
    return f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "—"


def plot(rest: dict, cpt: Optional[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    rows = [r for r in rest["rows"]]
    names = [f"{r['model']}\n{r['condition']}" for r in rows]
    values = [100 * (r["accuracy"] if r["accuracy"] is not None else float("nan")) for r in rows]
    errors = [100 * (r["ci95"] if r["ci95"] is not None and math.isfinite(r["ci95"]) else 0.0) for r in rows]
    colors = ["tab:gray" if r["condition"] == "base" else "tab:blue" if r["condition"] == "passage_only"
              else "tab:orange" if r["model"] == "base" else "tab:green" for r in rows]
    left.bar(range(len(rows)), values, yerr=errors, color=colors, capsize=3)
    if cpt:
        for r in cpt["rows"]:
            names.append(f"CPT\n{r['condition']}")
            left.bar(len(names) - 1, 100 * (r["pooled_accuracy"] or 0.0), color="tab:purple", alpha=0.7)
    left.set_xticks(range(len(names)))
    left.set_xticklabels(names, fontsize=7, rotation=45, ha="right")
    left.set_ylabel("accuracy %")
    left.set_ylim(bottom=0)
    left.set_title("single passage: mean ± 95% t over passages; CPT: pooled", fontsize=9)
    left.grid(axis="y", alpha=0.3)
    series = [d for d in rest["degeneration"] if d.get("n")]
    if series:
        right.boxplot([d["tokens"] for d in series], showfliers=True)
        right.set_xticks(range(1, len(series) + 1))
        right.set_xticklabels([f"{d['policy']}\n{d['tag']}" for d in series], fontsize=7, rotation=45,
                              ha="right")
        right.axhline(rest["cap"], color="red", lw=0.8, ls="--")
        right.set_ylabel(f"self-edit length ({rest['length_unit']})")
        right.set_title("self-edits per policy (dashed: the cap)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_markdown(run: pathlib.Path) -> str:
    """The first sample of every policy on the first evaluation passages, side by side."""
    files = [(label, saved) for label, what, saved in sample_files(run) if what == "evaluation passages"]
    if not files:
        return "# Self-edit samples\n\nNo evaluation samples yet.\n"
    split = read_json(run / "split.json", {})
    md = ["# The first self-edit of each policy on the same evaluation passages", ""]
    for i, cid in enumerate(split.get("eval", [])[:SAMPLE_PASSAGES]):
        md += [f"## Passage {i + 1} (`{cid}`)", ""]
        for label, saved in files:
            if cid in saved["context_ids"]:
                text = saved["self_edits"][saved["context_ids"].index(cid)][0]
                shown = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " [...]"
                md += [f"**{label}** ({len(text)} characters):", "", "```text", shown, "```", ""]
    return "\n".join(md) + "\n"


def write_report(rest_dir: pathlib.Path, cpt_dir: Optional[pathlib.Path], out: pathlib.Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rest = rest_em_summary(rest_dir)
    cpt = cpt_summary(cpt_dir) if cpt_dir else None
    (out / "table.md").write_text(markdown(rest, cpt), encoding="utf-8")
    R.write_json(out / "summary.json", {"rest_em": rest, "cpt": cpt})
    plot(rest, cpt, out / "accuracy.png")
    (out / "self_edit_samples.md").write_text(samples_markdown(rest_dir), encoding="utf-8")
    for name, run in (("rest_em", rest_dir), ("cpt", cpt_dir)):
        if run is None:
            continue
        for src, dst in (("config.json", f"config_{name}.json"), ("results.md", f"results_{name}.md"),
                         (T.TIMINGS_FILE, f"timings_{name}.jsonl")):
            if (run / src).exists():
                shutil.copyfile(run / src, out / dst)
    lines = (rest_dir / "records.jsonl").read_text(encoding="utf-8").splitlines(keepends=True) \
        if (rest_dir / "records.jsonl").exists() else []
    (out / "records_sample_rest_em.jsonl").write_text("".join(lines[:RECORDS_IN_SAMPLE]), encoding="utf-8")
    for r in range(len(rest["rounds"])):
        if (rest_dir / f"sft_round{r}.json").exists():
            shutil.copyfile(rest_dir / f"sft_round{r}.json", out / f"selected_self_edits_round{r}.json")
    return {"rest_em": rest, "cpt": cpt}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rest-em", required=True, type=pathlib.Path, help="the ReST-EM run folder")
    parser.add_argument("--cpt", type=pathlib.Path, default=None, help="the CPT run folder")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="the results folder to write")
    args = parser.parse_args(argv)
    for run in (args.rest_em, args.cpt):
        if run is not None and not (run / "seal_run.json").exists():
            parser.error(f"{run} is not a seal_jax run folder (no seal_run.json)")
    write_report(args.rest_em, args.cpt, args.out)
    print(f"report: {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
