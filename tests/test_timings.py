"""Wall time per phase (seal_jax.timings): one line per phase however it ends, summed over sessions."""
import json

import pytest

from seal_jax import timings
from seal_jax.errors import Interrupted


def test_phases_are_logged_when_they_end_however_they_end(tmp_path):
    with timings.phase(tmp_path, "round0/sample"):
        pass
    with pytest.raises(Interrupted):
        with timings.phase(tmp_path, "round0/estep"):
            raise Interrupted("stopped by SIGTERM")
    with pytest.raises(ValueError):
        with timings.phase(tmp_path, "round0/m_step"):
            raise ValueError("boom")
    timings.record(tmp_path, "setup", 1.25)
    entries = timings.read(tmp_path)
    assert [(e["phase"], e["status"]) for e in entries] == [
        ("round0/sample", "done"), ("round0/estep", "interrupted"), ("round0/m_step", "failed"),
        ("setup", "done")]
    assert all(e["seconds"] >= 0 and e["session"] for e in entries)
    assert entries[-1]["seconds"] == 1.25


def test_a_resumed_phase_is_summed_over_sessions_and_a_torn_line_is_skipped(tmp_path):
    lines = [{"phase": "round0/estep", "seconds": 10.0, "status": "interrupted", "session": "a"},
             {"phase": "setup", "seconds": 2.0, "status": "done", "session": "b"},
             {"phase": "round0/estep", "seconds": 5.5, "status": "done", "session": "b"},
             {"phase": "round1/estep", "seconds": 3.0, "status": "interrupted", "session": "b"}]
    (tmp_path / timings.TIMINGS_FILE).write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + '{"phase": "round1/est')  # killed mid-write
    summary = timings.summarize(timings.read(tmp_path))
    assert summary == [
        {"phase": "round0/estep", "seconds": 15.5, "calls": 2, "sessions": 2, "done": True},
        {"phase": "setup", "seconds": 2.0, "calls": 1, "sessions": 1, "done": True},
        {"phase": "round1/estep", "seconds": 3.0, "calls": 1, "sessions": 1, "done": False}]
    timings.record(tmp_path, "round1/estep", 1.0)  # the next session: its line survives the torn one
    assert [e["phase"] for e in timings.read(tmp_path)][-1] == "round1/estep"
    (tmp_path / timings.TIMINGS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    md = "\n".join(timings.markdown(timings.read(tmp_path)))
    assert "summed over 2 session(s)" in md and "| round1/estep | 3 | 1 | no |" in md
    assert "| total | 20.5 | 2 |  |" in md
    assert timings.markdown([]) == [] and timings.read(tmp_path / "missing") == []
