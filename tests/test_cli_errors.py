"""User errors end in one line (plus a hint) and a non-zero exit; --debug / SEAL_DEBUG=1 show tracebacks."""
import os
import subprocess
import sys
import textwrap

import pytest

from seal_jax.config import ConfigError, closest_keys, load_config, set_dotted
from seal_jax.errors import DataError, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from seal_jax.model.hf import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWLEDGE = os.path.join(REPO, "configs", "knowledge.py")

# A driver whose main raises what argv[1] names (after the --config flags were parsed for real).
DRIVER = textwrap.dedent("""
    import sys
    from seal_jax.config import cli_main
    from seal_jax.errors import Interrupted
    scenario = sys.argv.pop(1)

    def main(config):
        if scenario == "broken_model":
            from seal_jax.model.loading import load_model
            load_model(config.model)
        elif scenario == "missing_file":
            open("/nonexistent/passages.json")
        elif scenario == "interrupted":
            raise Interrupted("stopped by SIGINT after round 0", hint="resume with: --config.resume=R")
        elif scenario == "bug":
            raise RuntimeError("a genuine bug")
        print("ran", config.self_edit.k)

    cli_main(main)
""")


def _run(args, *, env_extra=None, module=False, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("SEAL_DEBUG", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "seal_jax", *args] if module else [sys.executable, "-c", DRIVER, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def _assert_one_line_error(rc, err, *needles):
    assert rc == EXIT_USER_ERROR, (rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines[0].startswith("error: ") and len(lines) <= 2, lines
    assert len(lines) == 1 or lines[1].startswith("hint: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_misspelled_key_names_the_key_and_the_closest_valid_ones():
    rc, _, err = _run(["--config", KNOWLEDGE + ":demo", "--config.inner.learnig_rate=1"], module=True)
    _assert_one_line_error(rc, err, "unknown config key 'inner.learnig_rate'", "inner.learning_rate")
    rc, _, err = _run(["--config=" + KNOWLEDGE, "--config.learning_rate=1"], module=True)
    _assert_one_line_error(rc, err, "'learning_rate'", "inner.learning_rate")


@pytest.mark.parametrize("args, needle", [
    (["--config.inner.epochs=abc"], "--config.inner.epochs=abc: invalid literal for int()"),
    (["--config.self_edit.k=1.5"], "--config.self_edit.k=1.5"),
])
def test_wrong_type_override_is_one_line(args, needle):
    rc, _, err = _run(["--config=" + KNOWLEDGE + ":demo", *args], module=True)
    _assert_one_line_error(rc, err, needle)


def test_bad_config_file_or_variant_is_one_line():
    rc, _, err = _run(["--config=configs/nope.py"], module=True)
    _assert_one_line_error(rc, err, "No such file or directory", "configs/nope.py")
    rc, _, err = _run(["--config=" + KNOWLEDGE + ":bogus"], module=True)
    _assert_one_line_error(rc, err, "unknown knowledge config variant 'bogus'")


def test_debug_flag_or_env_shows_the_traceback():
    args = ["--config=" + KNOWLEDGE + ":demo", "--config.inner.epochs=abc"]
    rc, _, err = _run(args + ["--debug"], module=True)
    assert rc == EXIT_USER_ERROR and "Traceback" in err and "error: " in err
    rc, _, err = _run(args, module=True, env_extra={"SEAL_DEBUG": "1"})
    assert rc == EXIT_USER_ERROR and "Traceback" in err


@pytest.mark.slow  # five interpreters, one of which imports jax
def test_errors_raised_by_the_run_itself(tmp_path):
    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    rc, _, err = _run(["broken_model", "--config=" + KNOWLEDGE, f"--config.model={broken}"])
    _assert_one_line_error(rc, err, str(broken))
    rc, _, err = _run(["missing_file", "--config=" + KNOWLEDGE])
    _assert_one_line_error(rc, err, "No such file or directory: /nonexistent/passages.json")
    rc, _, err = _run(["interrupted", "--config=" + KNOWLEDGE])
    assert rc == EXIT_INTERRUPTED and "Traceback" not in err
    assert "interrupted: stopped by SIGINT after round 0" in err and "hint: resume with: --config.resume=R" in err
    rc, _, err = _run(["bug", "--config=" + KNOWLEDGE])  # not a user error: the traceback stays
    assert rc == 1 and "Traceback" in err and "RuntimeError: a genuine bug" in err
    rc, out, err = _run(["ok", "--config=" + KNOWLEDGE, "--config.self_edit.k=3"])
    assert rc == 0 and "ran 3" in out, err


def test_error_hierarchy_and_in_process_key_suggestions():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, UserError) and issubclass(DataError, UserError)
    cfg = load_config(KNOWLEDGE + ":demo")
    with pytest.raises(ConfigError, match=r"'self_edit\.kk'; did you mean self_edit\.k\?"):
        set_dotted(cfg, "self_edit.kk", 3)
    keys = ["inner.learning_rate", "cpt.learning_rate", "inner.epochs"]
    assert closest_keys("inner.learnig_rate", keys)[0] == "inner.learning_rate"
    assert set(closest_keys("learning_rate", keys)) == {"inner.learning_rate", "cpt.learning_rate"}
    assert closest_keys("zzz", keys) == []
