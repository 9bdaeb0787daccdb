"""Single-process generation end to end on demo shards and the tiny RN surrogate."""

import json
import os

import numpy as np
import pytest
import torch

from mem_dist.pipeline import rundir, state, storage, surrogate
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import load_config
from mem_dist.pipeline.data import expand_shards, load_shard
from mem_dist.pipeline.generate import main
from tests.conftest import TINY_RN, TINY_VIT, tiny_overrides


@pytest.fixture(scope="module")
def run_dir(demo_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "run")
    args = tiny_overrides(f"{demo_dir}/train/{{00000..00002}}.tar", out, **{
        "mem.rounds": 3, "mem.surrogate_steps": 8, "mem.pgd_steps": 4, "mem.lr": 1e-3})
    assert main(args) == 0
    return out, args


def test_state_has_one_valid_row_per_sample(run_dir, demo_dir, tokenizer):
    out, args = run_dir
    cfg = load_config(RunConfig, None, args)
    assert state.latest_round(out) == 3
    for url in expand_shards(cfg.data.shards):
        src = load_shard(url, cfg.data)
        st = state.read_state(state.state_url(out, 3, src.name))
        assert st.keys == src.keys and len(st.keys) == 40
        assert st.delta.shape == (40, 32, 32, 3) and st.delta.dtype == np.int8
        assert np.abs(st.delta.astype(int)).max() <= cfg.mem.epsilon
        canvas = src.canvases.astype(int) + st.delta
        assert canvas.min() >= 0 and canvas.max() <= 255
        assert np.abs(st.delta).sum() > 0
        for ids, words in zip(st.trigger_ids, st.trigger_text):
            assert len(ids) == 3 and tokenizer.encode(words) == list(ids)
        assert np.isfinite(st.loss).all()


def test_run_json_and_falling_loss(run_dir):
    out, args = run_dir
    run = storage.read_json(os.path.join(out, "run.json"))
    assert run["rounds_done"] == 3 and run["world_size"] == 1 and len(run["shards"]) == 3
    assert run["config_hash"] == load_config(RunConfig, None, args).config_hash()
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["round"] for m in metrics] == [1, 2, 3]
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0], losses
    assert metrics[-1]["loss"] < metrics[-1]["clean_loss"]  # the shortcut: protected pairs are easier than clean ones
    # old rounds are pruned to state.keep_rounds (2)
    assert storage.listdir(os.path.join(out, "state")) == ["round-002", "round-003"]


def test_rerun_is_a_no_op_and_other_config_is_refused(run_dir, capsys):
    out, args = run_dir
    before = os.path.getmtime(state.state_url(out, 3, "00000"))
    assert main(args) == 0
    assert os.path.getmtime(state.state_url(out, 3, "00000")) == before
    assert main(args + ["mem.epsilon=4"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err


def test_em_and_random_baselines(demo_dir, tmp_path, tokenizer):
    shards = f"{demo_dir}/train/00000.tar"
    assert main(tiny_overrides(shards, str(tmp_path / "em"), **{"mem.trigger_len": 0, "mem.rounds": 1})) == 0
    st = state.read_state(state.state_url(str(tmp_path / "em"), 1, "00000"))
    assert st.trigger_ids.shape == (40, 0) and set(st.trigger_text) == {""}
    assert main(tiny_overrides(shards, str(tmp_path / "rnd"), **{"method": "random", "mem.trigger_len": 0})) == 0
    st = state.read_state(state.state_url(str(tmp_path / "rnd"), 1, "00000"))
    assert np.abs(st.delta.astype(int)).max() == 8 and st.trigger_ids.shape == (40, 0)
    assert storage.read_json(os.path.join(tmp_path, "rnd", "run.json"))["rounds"] == 1  # one pass, not mem.rounds
    # random with k > 0: the same noise plus a random trigger per sample (the no-optimisation control)
    assert main(tiny_overrides(shards, str(tmp_path / "rndk"), **{"method": "random", "mem.trigger_len": 4})) == 0
    stk = state.read_state(state.state_url(str(tmp_path / "rndk"), 1, "00000"))
    assert np.array_equal(stk.delta, st.delta) and stk.trigger_ids.shape == (40, 4)
    assert len({tuple(t) for t in stk.trigger_ids}) == 40
    assert [tokenizer.encode(t) for t in stk.trigger_text] == stk.trigger_ids.tolist()
    # prefix: the same noise and ONE trigger for every sample (the fixed-prefix control)
    assert main(tiny_overrides(shards, str(tmp_path / "pre"), **{"method": "prefix", "mem.trigger_len": 4})) == 0
    stp = state.read_state(state.state_url(str(tmp_path / "pre"), 1, "00000"))
    assert np.array_equal(stp.delta, st.delta) and stp.trigger_ids.shape == (40, 4)
    assert len({tuple(t) for t in stp.trigger_ids}) == 1 and len(set(stp.trigger_text)) == 1


def test_ensemble_trains_every_member_and_resumes_exactly(demo_dir, tmp_path, capsys):
    """surrogate.ensemble: a member from a checkpoint and a random tiny ViT, each trained
    on the protected pairs, checkpointed with the round, and restored on resume."""
    torch.manual_seed(5)
    ckpt = str(tmp_path / "public.pt")
    surrogate.save(surrogate.create_surrogate(TINY_RN)[0].state_dict(), ckpt)
    out = str(tmp_path / "run")
    args = tiny_overrides(f"{demo_dir}/train/00000.tar", out, **{
        "surrogate.ensemble": f"[{{pretrained: {ckpt}}}, {{model: {TINY_VIT}}}]"})
    assert main(args) == 0
    ck = torch.load(rundir.checkpoint_url(out, 2), weights_only=True)
    assert len(ck["ensemble"]) == 2
    public, trained = torch.load(ckpt, weights_only=True), ck["ensemble"][0]["model"]
    assert trained.keys() == public.keys()
    changed = [k for k in public if public[k].is_floating_point() and not torch.equal(public[k], trained[k])]
    assert len(changed) > len(public) // 2, "the checkpoint member was not trained"
    m = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    assert np.isfinite(m["loss"]) and m["loss"] < m["clean_loss"]
    # resume the sample phase of round 2 from the checkpoint: every member restored exactly
    url = state.state_url(out, 2, "00000")
    before = storage.read_bytes(url)
    storage.remove(url)
    assert main(args) == 0
    assert storage.read_bytes(url) == before
    # a member that cannot be built is named by its key
    assert main(tiny_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "bad"),
                               **{"surrogate.ensemble": "[{pretrained: nowhere.pt}]"})) == 2
    assert "'surrogate.ensemble[0].pretrained'" in capsys.readouterr().err
    # a checkpoint of another model is one line naming the key, not a state-dict traceback
    assert main(tiny_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "bad1"),
                               **{"surrogate.pretrained": ckpt, "surrogate.model": TINY_VIT})) == 2
    assert f"config key 'surrogate.pretrained': {ckpt} does not load into model" in capsys.readouterr().err
    short = json.load(open(TINY_RN))
    short["text_cfg"]["context_length"] = 16
    other = tmp_path / "tiny-rn-short.json"
    other.write_text(json.dumps(short))
    assert main(tiny_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "bad2"),
                               **{"surrogate.ensemble": f"[{{model: {other}}}]"})) == 2
    assert "'surrogate.ensemble[0].model'" in capsys.readouterr().err


TINY_COCA = {  # CoCa: a class token appended to the text, context 76 + 1, a multimodal decoder
    "embed_dim": 64, "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
}


@pytest.mark.parametrize("family", ["tiny-coca", "MobileCLIP-S1"])
def test_other_open_clip_families_generate(family, tmp_path, tokenizer):
    """Surrogates whose towers differ from CLIP's: CoCa (text tower with a class token,
    HotFlip goes through it) and MobileCLIP (timm FastViT at 256 px, whose CPU backward
    once corrupted the heap on channels-last input). A subprocess, so an abort is a failure."""
    import subprocess
    import sys

    from mem_dist.tools.demo import make_demo_data

    n = 8 if family == "tiny-coca" else 2  # MobileCLIP-S1 runs at 256 px: 2 samples carry the check
    make_demo_data(str(tmp_path / "data"), train=n, val=0, size=32, per_shard=n, seed=1)
    model = family
    if family == "tiny-coca":
        model = str(tmp_path / "tiny-coca.json")
        with open(model, "w") as f:
            json.dump(TINY_COCA, f)
    out = str(tmp_path / "run")
    # HotFlip (a third of the time) where the text tower is the point: CoCa's; MobileCLIP's is CLIP's own
    hotflip = 1 if family == "tiny-coca" else 0
    args = tiny_overrides(str(tmp_path / "data/train/00000.tar"), out, **{
        "surrogate.model": model, "mem.rounds": 1, "mem.surrogate_steps": 1, "mem.pgd_steps": 1, "mem.batch_size": n,
        "mem.hotflip_rounds": hotflip})
    proc = subprocess.run([sys.executable, "mem_dist/generate.py", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    st = state.read_state(state.state_url(out, 1, "00000"))
    assert len(st.keys) == n and np.isfinite(st.loss).all() and np.abs(st.delta).sum() > 0
    assert [tokenizer.encode(t) for t in st.trigger_text] == st.trigger_ids.tolist()


def test_bench_generate_prints_a_table_and_writes_nothing(demo_dir, tmp_path, capsys):
    from mem_dist.tools import bench

    out = str(tmp_path / "run")
    assert bench.main(["generate", "--steps", "2", *tiny_overrides(f"{demo_dir}/train/{{00000..00002}}.tar", out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("surrogate step", "sample batch"))]
    assert [r.split()[0] + " " + r.split()[1] for r in rows] == ["surrogate step", "sample batch:", "sample batch:"]
    for r in rows:
        seconds, rate, memory, tflop, tflops = map(float, r.split()[-6:-1])
        assert seconds > 0 and rate > 0 and memory > 0 and tflop > 0
        # TFLOP/s = TFLOP / s, within what the printed roundings (3, 3 and 2 decimals) allow
        assert (tflop - 5e-4) / (seconds + 5e-4) - 5e-3 <= tflops <= (tflop + 5e-4) / (seconds - 5e-4) + 5e-3, r
        assert float(r.split()[-1].rstrip("%")) > 0  # of the CPU's measured matmul rate
    assert "device peak" in lines[0] and "measured: fp32 2048x2048 matmul" in lines[0]
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimate for the config"))
    assert "120 samples if every one of the 3 shards" in lines[estimate] and "on one process" in lines[estimate]
    floor = next(line for line in lines if line.startswith("floor: the run's"))
    assert 0 < float(floor.split("(")[1].split("%")[0]) < 100  # the tiny model is far from the peak rate
    assert [line.split()[0] for line in lines if line.split()[0].endswith(",000")] == ["1,000,000", "400,000,000"]
    assert not os.path.exists(out)  # nothing written
    assert bench.main(["generate", *tiny_overrides(f"{demo_dir}/train/00000.tar", out, **{"method": "random"})]) == 2
    assert "config key 'method'" in capsys.readouterr().err
