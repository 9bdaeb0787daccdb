"""Faults on the read / state / untrusted-input / launcher side (issue 40, part B), each with
real parts: webdataset shards, moto's S3 server on 127.0.0.1 behind an fsspec filesystem that
fails on cue (protocol ``flakys3``), real state objects, a real ``accelerate launch``. Each
test ends with every sample in the state as an uninterrupted run has it, or counted under a
named reason."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import s3fs
import torch
import webdataset as wds
from PIL import Image

from mem_dist.pipeline import data, state, storage, surrogate
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.pipeline.generate import main
from tests.conftest import ROOT, TINY_RN, moto_s3, tiny_overrides
from tests.test_distributed import launch

ARGS = {"mem.rounds": 2, "mem.surrogate_steps": 3, "mem.pgd_steps": 1}


class FlakyS3(s3fs.S3FileSystem):
    """s3fs against the same endpoint, failing the way a network does when told to:
    ``faults[(op, path part)] = n`` fails the next n reads of a tar (part-way through its
    body) or PUTs of an object whose path contains the part (-1: every one)."""

    protocol = ("flakys3",)
    faults: dict[tuple[str, str], int] = {}
    hits: list[tuple[str, str]] = []

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("use_listings_cache", False)
        super().__init__(*args, **kwargs)

    @classmethod
    def _take(cls, op: str, path: str) -> bool:
        for (o, part), n in cls.faults.items():
            if o == op and part in path and n != 0:
                cls.faults[(o, part)] = n - 1 if n > 0 else n
                cls.hits.append((op, path))
                return True
        return False

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        return _Cut(f) if "r" in mode and path.endswith(".tar") and self._take("read", path) else f

    async def _pipe_file(self, path, data, *args, **kwargs):
        if self._take("write", path):
            raise ConnectionResetError(104, "Connection reset by peer (injected)")
        return await super()._pipe_file(path, data, *args, **kwargs)


class _Cut:
    """A file whose reads fail after 20 KB, as a dropped connection does."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def read(self, n=-1):
        if self.pos > 20_000:
            raise ConnectionResetError(104, "Connection reset by peer (injected)")
        b = self.f.read(n)
        self.pos += len(b)
        return b

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture(scope="module")
def s3(demo_dir):
    """moto's S3 server on 127.0.0.1 (the demo train shards in bucket 'src'), reached as flakys3://."""
    import fsspec

    with moto_s3() as fs:
        fsspec.register_implementation("flakys3", FlakyS3, clobber=True)
        for bucket in ("src", "out"):
            fs.mkdir(bucket)
        for name in os.listdir(f"{demo_dir}/train"):
            fs.put_file(f"{demo_dir}/train/{name}", f"src/train/{name}")
        yield fs


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(data, "READ_BACKOFF_S", 0.01)
    monkeypatch.setattr(storage, "WRITE_BACKOFF_S", 0.01)
    FlakyS3.faults, FlakyS3.hits = {}, []


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory):
    """An uninterrupted run (local files) and its final state."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    assert main(tiny_overrides(f"{demo_dir}/train/{{00000..00002}}.tar", out, **ARGS)) == 0
    return out, final(out)


def final(out: str, round_: int = 2) -> dict:
    return {n: state.read_state(state.state_url(out, round_, n)) for n in ("00000", "00001", "00002")}


def same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys == b[name].keys, name
        assert np.array_equal(a[name].delta, b[name].delta) and np.array_equal(a[name].trigger_ids, b[name].trigger_ids), name
        assert a[name].skipped == b[name].skipped, name


def test_s3_faults_mid_read_and_mid_write_lose_nothing(s3, reference, capsys):
    """A read that keeps failing part-way through a whole tar stops the run with one line and
    commits nothing of that shard (never "truncated_tar"); the same command again, with a read
    and a PUT that each fail once, is retried and ends with the uninterrupted run's state."""
    out = "flakys3://out/faults"
    args = tiny_overrides("flakys3://src/train/{00000..00002}.tar", out, **ARGS)
    FlakyS3.faults = {("read", "00001.tar"): -1}
    assert main(args) == 1
    err = capsys.readouterr()
    line = [ln for ln in err.err.splitlines() if ln.startswith("mem-dist: error:")]
    assert len(line) == 1 and "00001.tar" in line[0] and "storage fault" in line[0], err.err[-2000:]
    assert "reading it again" in err.out and "truncated" not in err.out + err.err
    assert not s3.exists("out/faults/state/round-001/00001.parquet")
    FlakyS3.faults = {("read", "00001.tar"): 1, ("write", "state/round-002/00000"): 1}
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reading it again" in printed and "sending it again" in printed
    assert {op for op, _ in FlakyS3.hits} == {"read", "write"}
    got = {n: state.read_state(f"{out}/state/round-002/{n}.parquet") for n in ("00000", "00001", "00002")}
    same_state(got, reference[1])
    assert all(st.skipped == {} for st in got.values())


def copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_zero_length_and_corrupt_final_state_are_named_and_redone(reference, demo_dir, tmp_path, capsys):
    """The final round's state truncated to 0 bytes, and another replaced by garbage: a plain
    reader names the object in one line; generate names each, removes it and redoes it."""
    out = copy_run(reference[0], str(tmp_path / "run"))
    zero, bad = state.state_url(out, 2, "00000"), state.state_url(out, 2, "00001")
    open(zero, "wb").close()
    with open(bad, "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 4000)  # its footer is whole, its pages are not
    f2 = state.state_url(out, 2, "00002")
    with open(f2, "r+b") as f:
        f.seek(-12, 2)
        f.write(b"garbage!PAR1")  # footer length and magic ruined
    with pytest.raises(state.StateError, match=f"state object {zero} is unreadable"):
        state.read_state(zero)
    args = tiny_overrides(f"{demo_dir}/train/{{00000..00002}}.tar", out, **ARGS)
    assert main(args) == 0
    printed = capsys.readouterr().out
    for url in (zero, bad, f2):  # the final round's objects are read whole: a damaged page is found too
        assert f"state object {url} is unreadable" in printed and "removed, and redone by this run" in printed
    assert "nothing to do" not in printed
    same_state(final(out), reference[1])


def test_unreadable_input_of_an_unfinished_round_goes_back_a_round(reference, demo_dir, tmp_path, capsys):
    """Round 2 killed before shard 00002 and its round-1 state zero bytes: the run goes back,
    redoes 00002's round 1 from checkpoint 1, recomputes round 2's surrogate, and ends as the
    uninterrupted run."""
    out = copy_run(reference[0], str(tmp_path / "run"))
    os.remove(state.state_url(out, 2, "00002"))
    open(state.state_url(out, 1, "00002"), "wb").close()
    assert main(tiny_overrides(f"{demo_dir}/train/{{00000..00002}}.tar", out, **ARGS)) == 0
    printed = capsys.readouterr().out
    assert "round-001/00002.parquet is unreadable (zero bytes)" in printed and "round 2's surrogate checkpoint" in printed
    same_state(final(out), reference[1])
    same_state({"00002": final(out, 1)["00002"]}, {"00002": state.read_state(state.state_url(reference[0], 1, "00002"))})


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost none (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"


def test_duplicate_member_bomb_and_eps_are_counted_the_rest_kept(demo_dir, tmp_path, capsys):
    """One shard: a sample with its .jpg twice, a 400-MP PNG header (over Pillow's own hard
    limit), a 48x48 PNG over data.max_pixels=2000, an EPS file named .jpg. Each is skipped
    under its reason, nothing else is lost, and no decoder but the allowed ones is tried."""
    good = list(wds.WebDataset(f"{demo_dir}/train/00000.tar", shardshuffle=False))[:10]
    src = tmp_path / "src"
    src.mkdir()
    big = io.BytesIO()
    Image.new("RGB", (48, 48), (9, 9, 9)).save(big, "PNG")
    members = []  # (name, bytes) in tar order
    for i, s in enumerate(good):
        key = s["__key__"]
        image = {3: png_header_only(20_000, 20_000), 5: big.getvalue(), 7: EPS}.get(i, s["jpg"])
        members += [(f"{key}.jpg", image), (f"{key}.txt", s["txt"])]
        if i == 1:
            members.append((f"{key}.jpg", good[0]["jpg"]))  # a second .jpg for the same sample
    import tarfile

    with tarfile.open(src / "00000.tar", "w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    out = str(tmp_path / "run")
    args = tiny_overrides(f"{src}/00000.tar", out, **{"mem.rounds": 1, "data.max_pixels": 2000})
    assert main(args) == 0
    st = state.read_state(state.state_url(out, 1, "00000"))
    keys = [s["__key__"] for s in good]
    assert st.keys == [k for i, k in enumerate(keys) if i not in (1, 3, 5, 7)]
    assert st.skipped == {"duplicate_key": 1, "image_too_large": 2, "unsupported_format": 1}
    assert len(st.keys) + sum(st.skipped.values()) == len(good)
    assert "truncated" not in capsys.readouterr().out
    assert data.sniff_format(EPS) == "EPS" and data.allowed_formats(("jpg", "png", "jpeg", "webp")) == ("JPEG", "PNG", "WEBP")
    assert main(tiny_overrides(f"{src}/00000.tar", out, **{"data.image_keys": "[jpg, eps]"})) == 2
    assert "config key 'data.image_keys' names 'eps', not an image format" in capsys.readouterr().err


def test_checkpoints_never_unpickle_code(tmp_path):
    """surrogate.pretrained that pickles a call: refused in one line, and the call never runs."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="weights_only"):
        surrogate.create_surrogate(TINY_RN, str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()
    package = os.path.join(ROOT, "mem_dist")
    for name in os.listdir(package):
        if name.endswith(".py"):
            text = open(os.path.join(package, name)).read()
            for line in text.splitlines():
                assert "torch.load(" not in line or "weights_only=True" in line, (name, line)


def fake_bin(folder, name: str, body: str) -> None:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_slurm_script_passes_arguments_through_unchanged(tmp_path):
    """The sbatch script with a fake srun / scontrol / python / accelerate on PATH: braces,
    '[url, exif]', spaces and $(...) reach generate.py as typed, and nothing runs."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "argv.jsonl"
    record = f'"{sys.executable}" -c \'import json,sys; print(json.dumps(sys.argv[1:]))\' "$(basename "$0")" "$@" >> "{log}"\n'
    fake_bin(bin_, "scontrol", 'echo node-a; echo node-b\n')
    # srun records its argv, then runs the node command as each node would (no shell in between)
    fake_bin(bin_, "srun", record + 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 "$@"\n')
    fake_bin(bin_, "accelerate", record)
    fake_bin(bin_, "python", record)
    user = ["--config", "configs/laion.yaml", "data.shards=s3://b/laion/{00000..09999}.tar", "merge.drop_fields=[url, exif]",
            "output=s3://b/$(touch pwned)", "note=a b  c"]
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2")
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm-multinode.sbatch"), *user], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    accel = [c for c in calls if c[0] == "accelerate"]
    assert len(accel) == 1 and accel[0][-len(user):] == user and accel[0][-len(user) - 1] == "mem_dist/generate.py"
    assert accel[0][accel[0].index("--machine_rank") + 1] == "1" and accel[0][accel[0].index("--num_machines") + 1] == "2"
    assert accel[0][accel[0].index("--main_process_ip") + 1] == "node-a"
    check = [c for c in calls if "--check" in c]
    assert check and check[0][-len(user):] == user  # the one-process check before the launch
    assert not (tmp_path / "pwned").exists()


def test_accelerate_launch_prints_a_bad_key_once_from_rank_0_last(demo_dir, tmp_path):
    """Two ranks under accelerate launch, a misspelt key: the one line appears once, as the
    root cause at the end of accelerate's failure summary (accelerate exits 1); --check and
    mem-dist generate give it alone and exit 2."""
    args = tiny_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "run"), **{"mem.roundz": 2})
    proc = launch(args, {}, processes=2)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1
    assert out.count("unknown config key 'mem.roundz'") == 1, out
    tail = out.strip().splitlines()[-3:]
    assert any("mem-dist: error: unknown config key 'mem.roundz'" in ln for ln in tail), tail
    one = subprocess.run([sys.executable, os.path.join(ROOT, "mem_dist", "generate.py"), "--check",
                          *tiny_overrides(f"{demo_dir}/train/{{00000..00009}}.tar", str(tmp_path / "run"))],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert one.returncode == 2 and one.stderr.count("mem-dist: error:") == 1 and "shard not found" in one.stderr
    script = subprocess.run(["bash", os.path.join(ROOT, "launch", "cpu-multiprocess.sh"), "2", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"))
    assert script.returncode == 2 and script.stderr.strip().splitlines() == [
        line for line in out.splitlines() if "mem-dist: error:" in line][0].split("traceback : ")[1:], script.stderr
