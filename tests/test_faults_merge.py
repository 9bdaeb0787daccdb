"""Merge under faults: each test injects one, and ends with every source sample either
published correctly (verify passes) or counted under a named reason, nothing published twice,
and nothing published that the config says not to.

Real parts only: webdataset shards, generate's own state, merge and generate as processes
killed with SIGKILL, local files and moto's S3 server on 127.0.0.1.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from mem_dist.pipeline import generate, storage
from mem_dist.publishing import manifest, merge, publish, verify
from mem_dist.publishing.verify import protected_samples
from tests.conftest import ROOT, moto_s3, tiny_overrides
from tests.test_distributed import children

NAMES = ("00000", "00001")  # 80 samples each
EXTRA = ("original_caption", "TEXT", "similarity")  # source fields img2dataset does not write


def add_source_fields(folder: str) -> None:
    """Give every sample of the shards in ``folder`` the fields a LAION-style producer keeps:
    ``original_caption`` and ``TEXT`` (both the caption) and ``similarity``, in json and parquet."""
    for name in NAMES:
        tar = f"{folder}/{name}.tar"
        samples = list(wds.WebDataset(tar, shardshuffle=False))
        with wds.TarWriter(tar) as tw:
            for s in samples:
                meta = json.loads(s["json"])
                meta.update(original_caption=s["txt"].decode(), TEXT=s["txt"].decode(), similarity=0.31)
                tw.write({"__key__": s["__key__"], "jpg": s["jpg"], "txt": s["txt"], "json": json.dumps(meta, indent=4)})
        table = pq.read_table(f"{folder}/{name}.parquet")
        captions = table.column("caption")
        table = table.append_column("original_caption", captions).append_column("TEXT", captions)
        table = table.append_column("similarity", pa.array([0.31] * len(table)))
        pq.write_table(table, f"{folder}/{name}.parquet")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    from mem_dist.tools.demo import make_demo_data

    out = str(tmp_path_factory.mktemp("src"))
    make_demo_data(out, train=160, val=10, size=32, per_shard=80, seed=3)
    add_source_fields(f"{out}/train")
    return f"{out}/train"


@pytest.fixture(scope="module")
def finished_run(src, tmp_path_factory) -> str:
    """A finished MEM run (2 rounds, tiny surrogate) over both shards; tests merge copies of it."""
    out = str(tmp_path_factory.mktemp("run") / "run")
    assert generate.main(tiny_overrides(f"{src}/{{00000..00001}}.tar", out)) == 0
    return out


def copy_of(run: str, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    return out


def public_files(folder: str) -> list[str]:
    """Everything a reader listing the public folder sees (hidden names included)."""
    return sorted(storage.listdir(folder))


def account(out: str, public: str | None = None) -> dict:
    """Every source sample of the run either published once (verify passes for it) or counted
    under a named reason in the private manifest; returns {outcome or reason: count} and checks
    that the public folder holds exactly the finished shards' files, nothing else."""
    run = storage.read_json(f"{out}/run.json")
    public = public or f"{out}/protected"
    report = verify.verify(out)
    assert report["mismatches"] == 0, report
    counts: dict[str, int] = {}
    expected = []
    for url in run["shards"]:
        name = storage.basename(url)[: -len(".tar")]
        stats = manifest.read_stats(out, name)
        assert stats is not None, f"{name}: neither published nor counted"
        if stats.get("missing"):
            counts["missing_shard"] = counts.get("missing_shard", 0) + 1
            continue
        expected += [f"{name}{s}" for s in (".parquet", ".tar", "_stats.json")]
        record = manifest.read_manifest(out, name)
        keys = [s["__key__"] for s in protected_samples(f"{public}/{name}.tar")]
        assert len(keys) == len(set(keys)), f"{name}: a sample published twice"
        published = {k for k, r in record.items() if r["outcome"] in ("protected", "copied")}
        assert set(keys) == published
        for r in record.values():
            what = r["outcome"] if r["outcome"] != "dropped" else r["reason"]
            assert what, r
            counts[what] = counts.get(what, 0) + 1
        assert len(record) == stats["source_samples"]
    assert public_files(public) == sorted(expected)
    return counts


def json_of(public: str, name: str) -> list[dict]:
    return [json.loads(s["json"]) for s in protected_samples(f"{public}/{name}.tar")]


def parquet_columns(public: str, name: str) -> list[str]:
    with storage.open_file(f"{public}/{name}.parquet", "rb") as f:
        return pq.read_table(f).column_names


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mem-dist: error: "), err
    return err[0]


def test_kill9_mid_shard_then_rerun(finished_run, tmp_path):
    """merge killed with SIGKILL while it writes the second shard: the public folder shows the
    finished shard and nothing else (no temp, no half tar); the re-run publishes the rest once."""
    for attempt in range(4):  # the kill must land inside shard 00001's write; retried if it came late
        out = copy_of(finished_run, tmp_path / str(attempt))
        staged = f"{out}/tmp/merge/00001.tar.partial"
        proc = subprocess.Popen([sys.executable, "-m", "mem_dist.publishing.merge", out, "progress=false"], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not (
                os.path.exists(staged) and os.path.exists(f"{out}/manifest/00000_stats.json")):
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # mid-shard: the tar still being built (not one of its files moved into place yet)
        if proc.returncode == -signal.SIGKILL and os.path.exists(staged) and manifest.read_stats(out, "00001") is None:
            break
    else:
        pytest.fail("the kill never landed mid-shard")
    # the half-written tar is where no reader looks; the public folder holds the finished shard only
    assert public_files(f"{out}/protected") == ["00000.parquet", "00000.tar", "00000_stats.json"]
    summary = merge.merge(merge.resolve_config(out, None, []))
    assert (summary["shards"], summary["already_done"]) == (1, 1)
    assert os.listdir(f"{out}/tmp/merge") == []  # swept, and the new one moved into place
    assert account(out) == {"protected": 160}


def test_a_killed_merge_worker_ends_the_merge_with_one_line(finished_run, tmp_path):
    """merge.processes=2 and one worker process SIGKILLed (as the OOM killer would): merge ends
    with one line and exit 1 instead of waiting forever for that worker's shard; the re-run
    publishes every shard."""
    out = copy_of(finished_run, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "mem_dist.publishing.merge", out, "progress=false", "merge.processes=2"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, workers = time.time() + 120, []
    while not workers and proc.poll() is None and time.time() < deadline:
        workers = [p for p in children(proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        time.sleep(0.01)
    assert workers, "no merge worker seen"
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("mem-dist: error: a merge worker process died") and "run merge again" in lines[0]
    assert merge.main([out, "progress=false"]) == 0
    assert account(out) == {"protected": 160}


def test_killed_before_the_marker_redoes_only_that_shard(finished_run, tmp_path):
    """A merge that died after moving a shard's files but before writing its marker (taken away
    here): the re-run redoes that shard only and leaves the finished ones as they were."""
    out = copy_of(finished_run, tmp_path)
    assert merge.merge(merge.resolve_config(out, None, []))["shards"] == 2
    before = {n: os.stat(f"{out}/protected/{n}.tar").st_mtime_ns for n in NAMES}
    os.remove(f"{out}/manifest/00001_stats.json")
    summary = merge.merge(merge.resolve_config(out, None, []))
    assert (summary["shards"], summary["redone"], summary["already_done"]) == (1, 0, 1)
    assert os.stat(f"{out}/protected/00000.tar").st_mtime_ns == before["00000"]
    assert os.stat(f"{out}/protected/00001.tar").st_mtime_ns != before["00001"]
    assert account(out) == {"protected": 160}


def test_merge_rerun_with_changed_settings_redoes_the_shards(finished_run, tmp_path, capsys):
    """A merge, then the same run merged with merge.drop_fields=[url] (and then to moto's S3):
    each shard is redone because its marker says it was made otherwise, the urls are gone, and
    an unchanged re-run writes nothing. merge.mode=overwrite redoes everything."""
    out = copy_of(finished_run, tmp_path)
    assert merge.main([out]) == 0
    assert all("url" in m for m in json_of(f"{out}/protected", "00000"))
    capsys.readouterr()
    assert merge.main([out, "merge.drop_fields=[url]"]) == 0
    printed = capsys.readouterr().out
    assert "2 shards written (2 again: drop_fields [] -> ['url'])" in printed and "still carry a 'url'" not in printed
    for name in NAMES:
        assert not any("url" in m for m in json_of(f"{out}/protected", name))
        assert "url" not in parquet_columns(f"{out}/protected", name)
        assert manifest.read_stats(out, name)["made_from"]["drop_fields"] == ["url"]
    assert merge.main([out, "merge.drop_fields=[url]"]) == 0
    assert "0 shards written, 2 already done" in capsys.readouterr().out
    assert merge.main([out, "merge.drop_fields=[url]", "merge.mode=overwrite"]) == 0
    assert "2 shards written (2 again: merge.mode=overwrite)" in capsys.readouterr().out
    assert account(out) == {"protected": 160}

    # another destination (moto's S3): redone there, and merge names the folder the old copies stay in
    public = "s3://public/shards"
    with moto_s3() as fs:
        fs.mkdir("public")
        assert merge.main([out, "merge.drop_fields=[url]", f"merge.publish_to={public}"]) == 0
        printed = capsys.readouterr().out
        assert "2 shards written (2 again: publish_to" in printed and f"published to {out}/protected stay there" in printed
        assert not any("url" in m for m in json_of(public, "00001"))
        shutil.rmtree(f"{out}/protected")
        assert account(out, public) == {"protected": 160}


def generate_in_child(args: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    return generate.main(args)


def test_merge_during_an_unfinished_generate(src, tmp_path, capsys):
    """merge while generate (3 rounds) is in round 2, then after generate is killed: refused with
    one line; merge.allow_unfinished=true publishes the newest complete round and the manifest
    says so; once generate is resumed to the end, merge redoes every shard from round 3.

    generate runs in a forked process (its imports already made: a fresh interpreter spends
    about 10 s importing accelerate and torch on this machine); it is paused (SIGSTOP) while the
    merges run, so that it cannot prune the round they read, then killed with SIGKILL."""
    out = str(tmp_path / "run")
    args = tiny_overrides(f"{src}/00000.tar", out, **{"mem.rounds": 3})
    proc = multiprocessing.get_context("fork").Process(target=generate_in_child, args=(args,))
    proc.start()
    run_json, deadline = f"{out}/run.json", time.time() + 300
    while proc.is_alive() and time.time() < deadline and not (
            os.path.exists(run_json) and storage.read_json(run_json)["rounds_done"] >= 1):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        done = storage.read_json(run_json)["rounds_done"]
        assert proc.is_alive() and 1 <= done < 3
        assert merge.main([out]) == 2
        assert f"unfinished: {done} of 3 rounds done" in one_line_error(capsys)
        assert public_files(f"{out}/protected") == [] and not os.path.exists(f"{out}/manifest")
        assert merge.main([out, "merge.allow_unfinished=true"]) == 0
        assert "the run is unfinished" in capsys.readouterr().out
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
    made = manifest.read_stats(out, "00000")["made_from"]
    assert made["unfinished"] is True and made["round"] in (done, done + 1) and made["rounds"] == 3
    assert verify.verify(out)["unfinished_rounds"] == [made["round"]]
    assert account(out) == {"protected": 80}
    assert merge.main([out]) == 2  # the dead run is still unfinished
    assert "unfinished" in one_line_error(capsys)

    assert generate.main(args) == 0  # resumed to the end
    capsys.readouterr()
    assert merge.main([out]) == 0
    assert "1 shards written (1 again: " in capsys.readouterr().out  # round 1 -> 3 (or: unfinished True -> None)
    assert "unfinished" not in manifest.read_stats(out, "00000")["made_from"]
    assert verify.verify(out)["unfinished_rounds"] == []
    assert account(out) == {"protected": 80}


def test_missing_shard_is_recorded_not_published(src, tmp_path, capsys):
    """data.on_missing=skip with shard 00002 missing: merge publishes nothing under its name,
    records and counts it privately, and re-checks it on every run (it may appear later)."""
    out = str(tmp_path / "run")
    args = tiny_overrides(f"{src}/{{00000..00002}}.tar", out, **{"method": "random", "mem.rounds": 1,
                                                                   "data.on_missing": "skip"})
    assert generate.main(args) == 0
    summary = merge.merge(merge.resolve_config(out, None, []))
    assert summary["skipped"] == {"missing_shard": 1} and summary["samples"] == 160
    assert manifest.read_stats(out, "00002")["missing"] is True
    assert not [f for f in public_files(f"{out}/protected") if f.startswith("00002")]
    assert account(out) == {"protected": 160, "missing_shard": 1}
    assert verify.verify(out)["missing_sources"] == 1
    summary = merge.merge(merge.resolve_config(out, None, []))
    assert (summary["shards"], summary["already_done"], summary["skipped"]) == (1, 2, {"missing_shard": 1})


def test_source_caption_fields_are_not_published(finished_run, tmp_path, capsys):
    """The source json and parquet carry original_caption, TEXT (the caption itself) and
    similarity: none is published by default; merge.keep_fields publishes one on request; asking
    for a field that holds the source caption fails the merge with one line and publishes nothing."""
    out = copy_of(finished_run, tmp_path / "a")
    capsys.readouterr()
    assert merge.main([out]) == 0
    assert "publishes them): TEXT, original_caption, scene, similarity" in capsys.readouterr().out
    for name in NAMES:
        assert not any(set(EXTRA) & set(m) for m in json_of(f"{out}/protected", name))
        assert not set(EXTRA) & set(parquet_columns(f"{out}/protected", name))
    assert merge.main([out, "merge.keep_fields=[similarity]"]) == 0
    assert all(m["similarity"] == 0.31 and "TEXT" not in m for m in json_of(f"{out}/protected", "00001"))
    assert "similarity" in parquet_columns(f"{out}/protected", "00001")
    assert account(out) == {"protected": 160}

    capsys.readouterr()
    fresh = copy_of(finished_run, tmp_path / "b")
    assert merge.main([fresh, "merge.keep_fields=[original_caption]"]) == 2
    line = one_line_error(capsys)
    assert "shard 00000: json field 'original_caption' of sample" in line and "holds its source caption" in line
    assert public_files(f"{fresh}/protected") == [] and os.listdir(f"{fresh}/tmp/merge") == []
    assert manifest.read_stats(fresh, "00000") is None
    # the failed re-run of the first copy left its earlier publication and markers as they were
    assert merge.main([out, "merge.keep_fields=[TEXT]"]) == 2
    assert "json field 'TEXT'" in one_line_error(capsys)
    assert account(out) == {"protected": 160}


def test_publish_to_another_device_stages_in_a_hidden_folder(finished_run, tmp_path):
    """A local publish_to on another device than the run folder (a rename cannot cross it):
    the files are built in a hidden folder inside the destination, never under a listed name."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(str(tmp_path)).st_dev:
        pytest.skip("no second local device")
    copy = copy_of(finished_run, tmp_path)
    public = f"{shm}/mem-dist-test-{os.getpid()}"
    try:
        assert merge.main([copy, f"merge.publish_to={public}"]) == 0
        assert sorted(os.listdir(public)) == [publish.STAGING, *sorted(
            f"{n}{s}" for n in NAMES for s in (".parquet", ".tar", "_stats.json"))]
        assert os.listdir(f"{public}/{publish.STAGING}") == [] and "mem" not in publish.STAGING
        assert verify.verify(copy)["mismatches"] == 0
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_the_allowlist_and_the_caption_check():
    """Which source fields are published, and a parquet cell holding its row's protected source
    caption stops the shard (the json is checked the same way, tests/test_faults_merge.py)."""
    assert publish.published("url") and publish.published("sha512") and not publish.published("TEXT")
    assert publish.published("TEXT", keep=("TEXT",)) and not publish.published("url", drop=("url",))
    assert publish.leaked_field({"a": 1, "b": ["x", {"c": " a cat "}]}, "a cat") == "b"
    assert publish.leaked_field({"caption": ""}, "") is None
    source = pa.table({"key": ["k1", "k2"], "caption": ["a cat", "a dog"], "status": ["success"] * 2,
                       "alt": ["a cat", "a dog"]})
    written = [publish.Written.of("k1", "w1 w2 a cat", b"img", 8, 8), publish.Written.of("k2", "w3 a dog", b"img", 8, 8)]
    table = publish.shard_parquet(source, written, {}, captions={"k1": "a cat", "k2": "a dog"})
    assert table.column_names == ["key", "caption", "status"]  # "alt" is not img2dataset's
    with pytest.raises(publish.CaptionLeak, match="parquet column 'alt' of sample k1"):
        publish.shard_parquet(source, written, {}, keep_fields=("alt",), captions={"k1": "a cat", "k2": "a dog"})
    # a sample not published reads as img2dataset would write its failure
    source = source.append_column("error_message", pa.array([None, None], pa.string()))
    rows = publish.shard_parquet(source, [], {"k1": "image_too_large", "k2": "no_state"}).to_pylist()
    assert [(r["status"], r["error_message"]) for r in rows] == [("failed_to_resize", "image area too large"),
                                                                  ("failed_to_resize", "Image decoding error")]
    # a marker matches only what would be published now, field by field
    now = {"format": manifest.MARKER_FORMAT, "round": 3, "rounds": 3, "drop_fields": []}
    assert manifest.changed({"made_from": dict(now)}, now) is None
    assert manifest.changed({"made_from": dict(now, round=2)}, now) == "round 2 -> 3"
    assert manifest.changed({"made_from": dict(now, unfinished=True)}, now) == "unfinished True -> None"
    assert manifest.changed({"round": 3}, now).startswith("format None")  # a marker of a merge before made_from
    assert manifest.changed(None, now) == "no marker" and manifest.changed({"missing": True}, now) == "missing at the source"
