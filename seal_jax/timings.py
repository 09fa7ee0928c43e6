"""Wall time per phase of a run, appended to the run directory's `timings.jsonl` as each phase ends.

A phase is a named span of the driver (`"round0/sample"`, `"round0/estep"`, `"table/base/passage_only"`,
...). Each ends with one line `{"phase", "seconds", "status", "session", "started_utc"}`, written even
when the phase is interrupted or fails (`status` says which), so a run stopped and resumed several
times still accounts for all of its wall time: a phase resumed in a later session gets a second line,
and `summarize` adds them up. `session` tells the processes (the first run and each resume) apart.

Timings live beside `results.json`, not inside it: results are deterministic (a resumed run writes the
same file as an uninterrupted one, byte for byte; the tests compare them), wall times never are.
Phases are flat, not nested, so their seconds add up to the run's time.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pathlib
import secrets
import time
from typing import Iterator, Sequence

from seal_jax.errors import Interrupted

TIMINGS_FILE = "timings.jsonl"
_SESSION = f"{os.getpid()}-{secrets.token_hex(3)}"  # one per process: the run, or one of its resumes


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _append(path: pathlib.Path, entry: dict) -> None:
    # One write() of one line, flushed. A line torn by a killed process is closed first, so it costs
    # only itself (`read` skips it), not the next line too.
    with open(path, "ab") as f:
        torn = f.tell() > 0 and _last_byte(path) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(entry) + "\n").encode("utf-8"))
        f.flush()


def _last_byte(path: pathlib.Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def record(run_dir: str | os.PathLike, name: str, seconds: float, *, started_utc: str = "") -> None:
    """A finished phase timed by the caller (e.g. setup, which ends before the run directory exists)."""
    _append(pathlib.Path(run_dir) / TIMINGS_FILE,
            {"phase": name, "seconds": round(float(seconds), 3), "status": "done", "session": _SESSION,
             "started_utc": started_utc})


@contextlib.contextmanager
def phase(run_dir: str | os.PathLike, name: str) -> Iterator[None]:
    """Time the block as phase `name` of the run in `run_dir` (one line on exit, however it exits)."""
    started_utc = utc_now()
    start = time.perf_counter()
    status = "failed"
    try:
        yield
        status = "done"
    except (Interrupted, KeyboardInterrupt):
        status = "interrupted"
        raise
    finally:
        _append(pathlib.Path(run_dir) / TIMINGS_FILE,
                {"phase": name, "seconds": round(time.perf_counter() - start, 3), "status": status,
                 "session": _SESSION, "started_utc": started_utc})


def read(run_dir: str | os.PathLike) -> list[dict]:
    """Every timing line of a run (a torn last line, from a killed process, is skipped)."""
    path = pathlib.Path(run_dir) / TIMINGS_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def summarize(entries: Sequence[dict]) -> list[dict]:
    """Per phase, in order of first appearance: total seconds over sessions, lines, and whether it
    finished (a phase that only has interrupted lines was still running when the run stopped)."""
    by_phase: dict[str, dict] = {}
    for e in entries:
        row = by_phase.setdefault(e["phase"], {"phase": e["phase"], "seconds": 0.0, "calls": 0,
                                               "sessions": set(), "done": False})
        row["seconds"] += float(e["seconds"])
        row["calls"] += 1
        row["sessions"].add(e.get("session", ""))
        row["done"] = row["done"] or e.get("status") == "done"
    return [dict(r, seconds=round(r["seconds"], 3), sessions=len(r["sessions"])) for r in by_phase.values()]


def markdown(entries: Sequence[dict]) -> list[str]:
    """A "wall time per phase" section for results.md (empty when nothing was timed)."""
    from seal_jax.results import markdown_table

    rows = summarize(entries)
    if not rows:
        return []
    sessions = len({e.get("session", "") for e in entries})
    total = sum(r["seconds"] for r in rows)
    return ["", f"## Wall time per phase (seconds, summed over {sessions} session(s))", "",
            markdown_table(["phase", "seconds", "sessions", "finished"],
                           [[r["phase"], r["seconds"], r["sessions"], "yes" if r["done"] else "no"]
                            for r in rows] + [["total", round(total, 3), sessions, ""]])]
