"""Faults during training: SIGKILL at random moments (some aimed at checkpoint writes), a worker lost under
`torchrun --max-restarts`, and two torchrun "nodes" on this machine.

benchmarks/kill_resume.py runs the kill procedure with ten kills; this file with three.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kill_resume import kill_and_resume, losses, train_cmd  # noqa: E402

STEPS = 12  # of the torchrun runs

def test_random_sigkills_leave_whole_checkpoints_and_resume_exactly(tmp_path):
    summary = kill_and_resume(tmp_path, kills=3, seed=1)
    assert summary["corrupt_or_stray"] == 0 and summary["stray_at_end"] == [], summary
    assert summary["final_exit"] == 0 and summary["steps_logged"], summary
    assert summary["max_loss_difference"] <= 1e-6 and summary["weights_equal"], summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, run_id: str, port: int, *, nnodes: int = 1, nproc: int = 2, restarts: int = 0) -> list[str]:
    cmd = train_cmd(out, steps=STEPS)
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
        "--max-restarts", str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", run_id, "--monitor-interval", "0.1", *cmd[1:],
    ]


def _worker_pid(run_id: str, rank: int, restart: int) -> int | None:
    """The pid of torchrun's worker with this run id, rank and restart count (read from /proc/PID/environ)."""
    wanted = {f"TORCHELASTIC_RUN_ID={run_id}", f"RANK={rank}", f"TORCHELASTIC_RESTART_COUNT={restart}"}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if {w.encode() for w in wanted} <= env:
            return int(entry.name)
    return None


def _same_weights(a: Path, b: Path) -> bool:
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    return all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7) for k in sa if sa[k].is_floating_point())


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """An uninterrupted run of two processes on one node: the reference."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("finding torchrun's workers needs /proc")
    out = tmp_path_factory.mktemp("ddp") / "full"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_torchrun(out, "full", _free_port()), check=True, env=env, capture_output=True, timeout=600)
    return out


def test_a_lost_worker_restarts_the_group_which_resumes_and_finishes_as_uninterrupted(two_process_run, tmp_path):
    out, run_id = tmp_path / "killed", f"killed-{os.getpid()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_torchrun(out, run_id, _free_port(), restarts=1), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        if len(losses(out / "log.csv")) >= 4 and (out / "last.pt").is_file():  # mid-run, past a checkpoint
            victim = _worker_pid(run_id, rank=1, restart=0)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.02)
    killed_at = len(losses(out / "log.csv"))
    _, err = proc.communicate(timeout=600)
    assert victim is not None and killed_at < STEPS, "the run ended before a worker could be killed"
    assert proc.returncode == 0, err[-2000:]
    full, resumed = losses(two_process_run / "log.csv"), losses(out / "log.csv")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert max(abs(full[s] - resumed[s]) for s in full) <= 1e-6
    assert _same_weights(two_process_run / "last.pt", out / "last.pt")
    assert not list(out.glob(".*.tmp"))


def test_two_nodes_of_one_process_train_as_one_node_of_two(two_process_run, tmp_path):
    out, port = tmp_path / "nodes", _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(_torchrun(out, "nodes", port, nnodes=2, nproc=1), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [e[-1500:] for e in errors]
    full, two_nodes = losses(two_process_run / "log.csv"), losses(out / "log.csv")
    assert sorted(two_nodes) == list(range(1, STEPS + 1))
    assert max(abs(full[s] - two_nodes[s]) for s in full) <= 1e-6
    assert _same_weights(two_process_run / "last.pt", out / "last.pt")
