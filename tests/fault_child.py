"""`python tests/fault_child.py <point> <n> <cli args...>`: the real CLI, stopped at a chosen point.

Used by tests/test_fault_injection.py. `<point>` names where the n-th event kills this process with
SIGKILL (or, for `sigint_train`, sends it SIGINT): nothing in seal_jax knows about it, the functions
are wrapped from outside. `none` runs the CLI unchanged.

The tiny random model writes byte junk that the knowledge domain rejects as "no words", so no
candidate would ever train; every sampled text is therefore mapped, deterministically, to words
(`_wordy`) so that the round trains candidates, selects and runs its M-step; empty answers become
"the river" so that graders judge them.
"""
import os
import signal
import sys

WORDS = ("river", "city", "north", "founded", "bridge", "stone", "market", "old", "tower", "winter")
counts: dict[str, int] = {}


def _wordy(text: str) -> str:
    words = [WORDS[ord(ch) % len(WORDS)] for ch in text] or ["river"]
    return "The " + " ".join(words[:12]) + ".\nThe " + " ".join(reversed(words[:8])) + "."


def main() -> None:
    point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

    def hit(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1
        if counts[name] != nth:
            return
        if point == name:
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "sigint_" + name:
            os.kill(os.getpid(), signal.SIGINT)  # deferred: the run stops after this call

    from seal_jax import checkpoints, engine, estep, sft

    sample = engine.Engine.sample

    def wordy_sample(self, prompts, sampling):
        texts = [_wordy(t) for t in sample(self, prompts, sampling)]
        hit("sample")  # sampled, not yet saved
        return texts

    answer = engine.Engine.answer

    def wordy_answer(self, *args, **kwargs):
        # The random model answers with nothing, which graders mark wrong without asking anyone; a
        # deterministic non-empty answer makes the grader (e.g. an HTTP one) actually judge it.
        return [t if t.strip() else "the river" for t in answer(self, *args, **kwargs)]

    train = engine.Engine.train

    def killable_train(self, *args, **kwargs):
        hit("train")  # inside the E-step, before this chunk's inner loop finishes
        return train(self, *args, **kwargs)

    evaluate = estep.evaluate_contexts

    def killable_evaluate(*args, **kwargs):
        out = evaluate(*args, **kwargs)
        hit("evaluate")  # adapted models answered and graded, nothing recorded yet
        return out

    train_policy = sft.train_policy

    def killable_sft(*args, **kwargs):
        out = train_policy(*args, **kwargs)
        hit("m_step")  # the policy is updated in memory only
        return out

    extend = checkpoints.RecordLog.extend

    def killable_extend(self, records):
        records = list(records)
        counts["record"] = counts.get("record", 0) + 1
        if point == "record" and counts["record"] == nth:
            import json

            line = json.dumps(dict(records[0]), separators=(",", ":")).encode()
            with open(self.path, "ab") as f:  # half a record on disk, then death
                f.write(line[:len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return extend(self, records)

    engine.Engine.sample = wordy_sample
    engine.Engine.answer = wordy_answer
    engine.Engine.train = killable_train
    estep.evaluate_contexts = killable_evaluate
    sft.train_policy = killable_sft
    checkpoints.RecordLog.extend = killable_extend

    if point == "checkpoint":
        # Die between orbax writing a step into its temporary folder and renaming it into place.
        from orbax.checkpoint._src.path import async_path

        rename = async_path.rename

        async def killable_rename(src, dst):
            if "tmp" in str(src):
                hit("checkpoint")
            return await rename(src, dst)

        async_path.rename = killable_rename

    from seal_jax.__main__ import main as seal_main
    from seal_jax.config import cli_main

    cli_main(seal_main, argv=["seal_jax", *argv])


if __name__ == "__main__":
    main()
