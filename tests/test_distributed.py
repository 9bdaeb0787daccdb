"""Several processes, object storage, resume: real accelerate launches against moto's S3 server."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, TINY_RN, moto_s3, tiny_overrides

SHARDS = "s3://src/train/{00000..00002}.tar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(demo_dir):
    """moto's S3 server on 127.0.0.1 with the demo train shards in bucket 'src'."""
    with (server := moto_s3()) as fs:
        for bucket in ("src", "out"):
            fs.mkdir(bucket)
        for name in os.listdir(f"{demo_dir}/train"):
            fs.put_file(f"{demo_dir}/train/{name}", f"src/train/{name}")
        yield fs, server.env


def launch(overrides: list[str], env: dict, processes: int = 2, machines: tuple[int, int] | None = None,
           port: int | None = None) -> subprocess.Popen:
    """``accelerate launch`` with N CPU processes, the way launch/cpu-multiprocess.sh does it;
    ``machines`` = (machine rank, machines): one node of a multi-node launch (rendezvous on
    127.0.0.1:``port``), as launch/slurm-multinode.sbatch starts one per node."""
    nodes = ["--num_machines", "1"] if machines is None else [
        "--num_machines", str(machines[1]), "--machine_rank", str(machines[0]), "--main_process_ip", "127.0.0.1",
        "--same_network"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), *nodes,
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port or free_port()), os.path.join(ROOT, "mem_dist", "generate.py"), *overrides]
    full_env = dict(os.environ, **env, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def children(pid: int) -> list[int]:
    """Descendant process ids of ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        todo += kids
    return found


def final_state(fs, prefix: str, rounds: int) -> dict[str, bytes]:
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.ls(f"{prefix}/state/round-{rounds:03d}")}


ARGS = {"mem.rounds": 2, "mem.surrogate_steps": 4, "mem.pgd_steps": 2, "data.cache_shards": 1}


@pytest.fixture(scope="module")
def reference(s3):
    """An uninterrupted 2-process run, shards and state on S3."""
    fs, env = s3
    out = finish(launch(tiny_overrides(SHARDS, "s3://out/ref", **ARGS), env))
    return out, final_state(fs, "out/ref", 2)


def test_two_processes_on_s3_cover_every_key_once(s3, reference, demo_dir):
    fs, _ = s3
    log, finals = reference
    assert "round 2/2" in log
    assert sorted(finals) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    keys = []
    for name in finals:
        with fs.open(f"out/ref/state/round-002/{name}") as f:
            import pyarrow.parquet as pq

            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    from mem_dist.pipeline.data import iter_samples
    import collections

    source = [s["__key__"] for n in ("00000", "00001", "00002") for s in iter_samples(f"{demo_dir}/train/{n}.tar", collections.Counter())]
    assert sorted(keys) == sorted(source) and len(set(keys)) == len(keys) == 120
    run = __import__("json").loads(fs.cat_file("out/ref/run.json"))
    assert run["world_size"] == 2 and run["rounds_done"] == 2


def kill_one_rank_when(fs, prefix: str, args: list[str], env: dict, kill_when: str) -> None:
    """Launch (or resume) the run and SIGKILL one rank once ``{prefix}/{kill_when}`` exists."""
    proc = launch(args, env)
    deadline = time.time() + 180
    while not fs.exists(f"{prefix}/{kill_when}"):
        assert proc.poll() is None and time.time() < deadline, f"the run ended before the kill point {kill_when}"
        time.sleep(0.05)
    ranks = [p for p in children(proc.pid) if "generate.py" in open(f"/proc/{p}/cmdline").read()]
    assert ranks, "no rank process found"
    os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; the launcher takes the others down
    proc.communicate(timeout=120)
    assert proc.returncode != 0


def test_sigkill_twice_and_resume_is_byte_identical(s3, reference):
    """Killed once mid round 1 (after its first state object), resumed and killed again in round 2
    (after its surrogate checkpoint), then resumed to the end: the uninterrupted run's bytes."""
    fs, env = s3
    prefix = "out/killed"
    args = tiny_overrides(SHARDS, f"s3://{prefix}", **ARGS)
    kill_one_rank_when(fs, prefix, args, env, "state/round-001")
    assert fs.cat_file(f"{prefix}/run.json")  # the run is recorded, unfinished
    kill_one_rank_when(fs, prefix, args, env, "checkpoints/round-002.pt")
    log = finish(launch(args, env))
    assert "resuming" in log
    assert final_state(fs, prefix, 2) == reference[1]


def test_two_machines_give_the_state_of_one_machine_with_two_processes(s3, reference):
    """Multi-node without a cluster: two accelerate launches with --num_machines 2 and
    --machine_rank 0 | 1 on 127.0.0.1, one CPU process each, end with exactly the state of
    the two-process single-machine run."""
    fs, env = s3
    args, port = tiny_overrides(SHARDS, "s3://out/two-nodes", **ARGS), free_port()
    nodes = [launch(args, env, processes=2, machines=(rank, 2), port=port) for rank in (0, 1)]
    logs = [finish(node) for node in nodes]
    assert "round 2/2" in logs[0]  # rank 0 (machine 0) reports the rounds
    assert final_state(fs, "out/two-nodes", 2) == reference[1]
    assert __import__("json").loads(fs.cat_file("out/two-nodes/run.json"))["world_size"] == 2


def test_two_processes_keep_every_ensemble_member_in_step(s3):
    """Each member is its own DDP model; the run checks every member's checksum across ranks."""
    fs, env = s3
    log = finish(launch(tiny_overrides(SHARDS, "s3://out/ens", **{
        **ARGS, "mem.rounds": 1, "surrogate.ensemble": f"[{{model: {TINY_RN}}}]"}), env))
    assert "round 1/1" in log
    ck = torch.load(io.BytesIO(fs.cat_file("out/ens/checkpoints/round-001.pt")), weights_only=True)
    assert len(ck["ensemble"]) == 1


def test_resume_accepts_another_world_size_and_memory_knobs_only(s3, reference, capsys):
    """One process may continue a two-process run (tests/test_elastic.py checks the bytes), with
    another data.cache_shards; a key that decides the state is still refused."""
    from mem_dist.pipeline.generate import main

    fs, _ = s3
    assert main(tiny_overrides(SHARDS, "s3://out/ref", **{**ARGS, "data.cache_shards": 4})) == 0
    assert "nothing to do" in capsys.readouterr().out
    run = __import__("json").loads(fs.cat_file("out/ref/run.json"))
    assert run["world_sizes"] == [2, 1] and run["surrogate_ranks"] == 2
    assert main(tiny_overrides(SHARDS, "s3://out/ref", **{**ARGS, "mem.epsilon": 4})) == 2
    assert "different configuration" in capsys.readouterr().err


def test_a_lone_process_of_several_stops(demo_dir, tmp_path):
    """WORLD_SIZE says 2 but there is no process group (accelerate launch --cpu does this)."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "mem_dist", "generate.py"),
                          *tiny_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "run"))],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no process group" in res.stderr, res.stderr[-2000:]
