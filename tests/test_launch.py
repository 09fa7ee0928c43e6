"""Launchers: the local one really runs 2 processes; SLURM and TPU print the right per-host commands."""
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


def _launch(script, args, *, env=None, timeout=240):
    """Run a launcher in its own process group; whatever it started dies with the group."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    proc = subprocess.Popen([PY, str(REPO / "launch" / script), *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(300)
def test_local_launcher_runs_two_processes_on_one_global_mesh():
    rc, out, err = _launch("local.py", [
        "--num-processes", "2", "--cpu-devices", "2", "--timeout", "200", "--module", "launch.check",
        "--", "--config", "configs/knowledge.py:demo", "--config.mesh.axes={'candidate': 2, 'fsdp': 2}"])
    assert rc == 0, err[-3000:]
    checks = sorted((json.loads(line[len("CHECK "):]) for line in out.splitlines()
                     if line.startswith("CHECK ")), key=lambda c: c["process_index"])
    assert [c["process_index"] for c in checks] == [0, 1], out
    for c in checks:
        assert c["process_count"] == 2 and c["local_devices"] == 2 and c["global_devices"] == 4
        assert c["mesh"] == {"candidate": 2, "fsdp": 2} and c["mesh_processes"] == 2
        assert c["row_sums_ok"] and c["total_ok"] and c["every_candidate_fed_once"], c
    # Candidates are split over candidate x fsdp = 4 devices, 2 per process: each feeds half.
    assert checks[0]["fed"] == [0, 1, 2, 3] and checks[1]["fed"] == [4, 5, 6, 7]


def test_local_launcher_stops_the_others_on_failure_and_on_timeout():
    t0 = time.monotonic()
    # Process 1 fails at once; process 0 would sleep for 100 s, as a peer stuck at a collective.
    rc, _, err = _launch("local.py", [
        "--num-processes", "2", "--raw", "--", PY, "-c",
        "import sys, time; sys.exit(3) if {process_id} == 1 else time.sleep(100)"], timeout=60)
    assert rc == 3 and "exited with 3" in err
    rc, _, err = _launch("local.py", ["--num-processes", "2", "--timeout", "2", "--raw", "--", PY,
                                      "-c", "import time; time.sleep(100)"], timeout=60)
    assert rc == 124 and "timed out" in err
    assert time.monotonic() - t0 < 50


def test_local_dry_run_commands():
    rc, out, _ = _launch("local.py", ["--num-processes", "2", "--gpus-per-process", "4", "--port",
                                      "9999", "--python", "python", "--dry-run", "--",
                                      "--config", "configs/knowledge.py:demo", "--config.seed=3"])
    assert rc == 0
    assert out.splitlines() == [
        f"CUDA_VISIBLE_DEVICES={a} python -m seal_jax --config configs/knowledge.py:demo "
        f"--config.seed=3 --config.mesh.num_processes=2 --config.mesh.process_id={i} "
        f"--config.mesh.coordinator_address=127.0.0.1:9999"
        for i, a in enumerate(["0,1,2,3", "4,5,6,7"])]
    # One process: all local GPUs in one mesh, no process-group fields at all.
    rc, out, _ = _launch("local.py", ["--python", "python", "--dry-run", "--", "--config",
                                      "configs/knowledge.py"])
    assert out.strip() == "python -m seal_jax --config configs/knowledge.py"


_SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[07-08,10]", "SLURM_NTASKS": "3",
              "SLURM_TASKS_PER_NODE": "1(x3)", "SLURM_JOB_ID": "4242"}


def test_slurm_dry_run_prints_every_task_of_the_allocation():
    rc, out, err = _launch("slurm.py", ["--python", "python", "--dry-run", "--", "--config",
                                        "configs/knowledge.py:paper", "--config.mesh.axes={'fsdp': -1}"],
                           env=_SLURM_ENV)
    assert rc == 0, err
    axes = shlex.quote("--config.mesh.axes={'fsdp': -1}")
    assert out.splitlines() == ["# 3 tasks on 3 nodes; coordinator gpu07:16242"] + [
        f"{host}: python -m seal_jax --config configs/knowledge.py:paper {axes} "
        f"--config.mesh.num_processes=3 --config.mesh.process_id={i} "
        f"--config.mesh.coordinator_address=gpu07:16242"
        for i, host in enumerate(["gpu07", "gpu08", "gpu10"])]


def test_slurm_task_runs_its_command_with_the_allocation_fields():
    # What srun starts on each node: the launcher replaces itself with the task's command.
    env = {**_SLURM_ENV, "SLURM_PROCID": "2"}
    rc, out, err = _launch("slurm.py", ["--port", "7000", "--raw", "--", PY, "-c",
                                        "print('task {process_id} of {num_processes} -> {coordinator}')"],
                           env=env, timeout=60)
    assert rc == 0, err
    assert out.strip() == "task 2 of 3 -> gpu07:7000"
    rc, _, err = _launch("slurm.py", ["--dry-run", "--", "--config", "x.py"], env={}, timeout=60)
    assert rc != 0 and "SLURM_JOB_NODELIST is not set" in err


def test_slurm_host_list_parsing():
    sys.path.insert(0, str(REPO))
    from launch import slurm

    assert slurm.expand_nodelist("gpu[01-03,07],login1,a[9-11]x") == [
        "gpu01", "gpu02", "gpu03", "gpu07", "login1", "a9x", "a10x", "a11x"]
    assert slurm.expand_nodelist("node5") == ["node5"]
    assert slurm.expand_tasks_per_node("2(x3),1", 4) == [2, 2, 2, 1]
    alloc = slurm.Allocation({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "4",
                              "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3"})
    assert alloc.task_hosts() == ["n1", "n1", "n2", "n2"] and alloc.coordinator == "n1:12000"
    with pytest.raises(SystemExit, match="lists 1 nodes"):
        slurm.expand_tasks_per_node("4", 2)


def test_tpu_dry_run_prints_one_gcloud_command_for_all_workers():
    rc, out, err = _launch("tpu.py", ["--tpu", "pod1", "--zone", "us-east5-a", "--project", "proj",
                                      "--num-workers", "8", "--dry-run", "--", "--config",
                                      "configs/knowledge.py:paper", "--config.seed=2"])
    assert rc == 0, err
    argv = shlex.split(out)
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--project=proj",
                        "--zone=us-east5-a", "--worker=all"]
    assert argv[9] == ("--command=cd ~/seal_jax && python3 -m seal_jax --config "
                       "configs/knowledge.py:paper --config.seed=2 --config.mesh.num_processes=8")
    assert len(argv) == 10
