"""Bad configs fail before any work: one line naming the problem, exit code 2."""

import os
import subprocess

import pytest

from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import ConfigError, build, load_config
from mem_dist.pipeline.generate import main
from tests.conftest import ROOT, python_cmd, tiny_overrides


def test_defaults_follow_the_paper(demo_dir):
    cfg = load_config(RunConfig, None, [f"data.shards={demo_dir}/train/00000.tar"])
    m = cfg.mem
    assert (m.rounds, m.surrogate_steps, m.pgd_steps, m.hotflip_rounds, m.trigger_len) == (20, 200, 8, 5, 3)
    assert (m.epsilon, m.step_size, m.batch_size, m.lr) == (8, 1, 128, 1e-4)
    assert cfg.surrogate.model == "RN50" and cfg.surrogate.pretrained is None


def test_overrides_and_yaml(tmp_path, demo_dir):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  shards: {demo_dir}/train/00000.tar\nmem:\n  rounds: 3\n")
    cfg = load_config(RunConfig, str(path), ["mem.rounds=5", "surrogate.pretrained=null", "output=s3://b/run"])
    assert cfg.mem.rounds == 5 and cfg.output == "s3://b/run" and cfg.surrogate.pretrained is None


@pytest.mark.parametrize("override, words", [
    ("mem.roundz=2", "unknown config key 'mem.roundz'"),
    ("mem.rounds=two", "config key 'mem.rounds' must be an integer"),
    ("mem.epsilon=0", "config key 'mem.epsilon' must be at least 1"),
    ("data.resize_mode=stretch", "config key 'data.resize_mode' must be one of"),
    ("mem=3", "config key 'mem' must be a section"),
    ("rounds", "override 'rounds' must look like key=value"),
    ("experimental.mem.trigger_vocab=99999", "config key 'experimental.mem.trigger_vocab': 99999 exceeds the"),
    ("surrogate.model=roberta-ViT-B-32", "config key 'surrogate.model': open_clip cannot build 'roberta-ViT-B-32'"),
    ("merge.jpeg_quality=0", "config key 'merge.jpeg_quality' must be between 1 and 100"),
])
def test_bad_config_is_one_line_exit_2(override, words, demo_dir, tmp_path, capsys):
    args = tiny_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "run")) + [override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "run")  # nothing was started


def test_a_key_given_twice_in_a_row_is_refused(demo_dir, tmp_path, capsys):
    """What bash makes of an unquoted data.shards=.../{00000..00001}.tar: overrides of one
    key in a row, of which the last alone would silently win. (A later override of a key
    that is not right after it still wins: scripts add to a base list that way.)"""
    args = tiny_overrides(f"{demo_dir}/train/{{00000..00001}}.tar", str(tmp_path / "run"))
    expanded = [a for a in args if not a.startswith("data.shards=")] + [
        f"data.shards={demo_dir}/train/00000.tar", f"data.shards={demo_dir}/train/00001.tar"]
    assert main(expanded) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mem-dist: error: config key 'data.shards' is given twice in a row on the command line "
                   "(if the value holds {a..b}, quote it so the shell does not expand it)")
    assert not os.path.exists(tmp_path / "run")
    assert load_config(RunConfig, None, ["data.shards=x.tar", "mem.rounds=2", "mem.lr=1e-5", "mem.rounds=3"]).mem.rounds == 3


def test_missing_shard_and_file(tmp_path, capsys):
    assert main(tiny_overrides(f"{tmp_path}/nope/{{00000..00001}}.tar", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err.strip()
    assert "shard not found" in err and "nope/00000.tar" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, str(tmp_path / "missing.yaml"))


def test_exit_code_from_the_command_line(tmp_path, demo_dir):
    """The real entry point, as users run it."""
    res = subprocess.run(python_cmd(os.path.join(ROOT, "mem_dist", "generate.py"), *tiny_overrides(
        f"{demo_dir}/train/00000.tar", str(tmp_path / "run")), "mem.bogus=1"), capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "mem-dist: error: unknown config key 'mem.bogus' (known in this section: " + \
        res.stderr.strip().split("(known in this section: ")[1]


def test_storage_without_credentials_is_one_line(tmp_path, demo_dir):
    """An s3:// output with no credentials anywhere: one line saying so, exit 2 (botocore
    refuses before any request is sent, so no server is needed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_ENDPOINT_URL_S3="http://127.0.0.1:9")
    res = subprocess.run(python_cmd(os.path.join(ROOT, "mem_dist", "generate.py"), *tiny_overrides(
        f"{demo_dir}/train/00000.tar", "s3://bucket/run")), capture_output=True, text=True, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("mem-dist: error: storage refused access (NoCredentialsError") and "set credentials" in err
    assert "Traceback" not in res.stderr


def test_every_shipped_config_validates():
    """The configs users start from load without an unknown key or a bad value."""
    import glob

    from mem_dist.evaluation.evaluate import EvalConfig

    shipped = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert len(shipped) >= 5
    for path in shipped:
        kind = EvalConfig if os.path.basename(path).startswith("eval-") else RunConfig
        assert load_config(kind, path) is not None, path
    from mem_dist.pipeline.surrogate import create_surrogate  # the model configs shipped beside them build

    models = sorted(glob.glob(os.path.join(ROOT, "configs", "models", "*.json")))
    assert len(models) >= 5
    for path in models:
        assert create_surrogate(path) is not None, path


# Hashes the code before issue 38 computed (one mem section with the method and the ablations):
# the configs, spelled the new way, must keep them, or existing run folders would not resume.
OLD_HASHES = {"configs/demo.yaml": "1eabcd276e49b240", "configs/uc-demo.yaml": "a82a620ed609d208",
              "configs/protect-captions.yaml": "28daa5eb57e7e67d"}


def test_moved_keys_keep_the_fingerprint_of_existing_runs():
    for path, old in OLD_HASHES.items():
        assert load_config(RunConfig, os.path.join(ROOT, path)).config_hash() == old, path
    uc_demo = os.path.join(ROOT, "configs", "uc-demo.yaml")
    new = load_config(RunConfig, uc_demo, ["experimental.uc.grid=8", "uc.augment=published"])
    old = load_config(RunConfig, uc_demo, ["mem.method=uc", "uc.grid=8", "uc.augment=published"])
    assert new == old and new.config_hash() == "e5b699220af3242b"
    # an old spelling on the command line still wins over the file's new one, as any later key
    later = load_config(RunConfig, uc_demo, ["mem.method=random", "mem.trigger_len=0", "mem.epsilon=4"])
    assert (later.method, later.mem.epsilon, later.uc.epsilon) == ("random", 4, 16)
    assert load_config(RunConfig, uc_demo, ["mem.epsilon=32"]).uc.epsilon == 32  # under method uc: UC's bound
    # the old spellings, in a YAML file as in a run.json: mem.method, mem.epsilon for UC, the ablations
    legacy = {"data": {"shards": "x.tar"}, "mem": {"method": "uc", "epsilon": 12, "hotflip_candidates": 4},
              "uc": {"grid": 8, "perturbation": "direct"}, "keyed": {"grid": 4, "luminance": True}}
    cfg = build(RunConfig, legacy, "")
    assert (cfg.method, cfg.uc.epsilon, cfg.experimental.mem.hotflip_candidates) == ("uc", 12, 4)
    assert (cfg.keyed.grid, cfg.experimental.keyed.luminance, cfg.experimental.keyed.mirror) == (4, True, False)
    assert (cfg.experimental.uc.grid, cfg.experimental.uc.perturbation, cfg.experimental.uc.lr) == (8, "direct", 0.5)
    with pytest.raises(ConfigError, match="config key 'method' must be one of mem, random, prefix, uc"):
        load_config(RunConfig, None, ["data.shards=x.tar", "method=nope"])


def test_an_old_style_run_folder_resumes_and_merges(demo_dir, tmp_path):
    """A run started before the keys moved (its run.json in the old layout: mem.method, the
    ablations under mem) is continued by the new spelling of the same config, then merged."""
    from mem_dist.publishing import merge, verify
    from mem_dist.pipeline import storage

    out = str(tmp_path / "old")
    shards = f"{demo_dir}/train/00000.tar"
    assert main(tiny_overrides(shards, out, **{"mem.method": "random", "mem.trigger_len": 2, "mem.trigger_vocab": 50})) == 0
    record = storage.read_json(f"{out}/run.json")
    config = record["config"]  # back to the layout the code before issue 38 wrote
    config["mem"].update(method=config.pop("method"), **config.pop("experimental")["mem"])
    storage.write_json(f"{out}/run.json", record)
    os.remove(f"{out}/state/round-001/00000.parquet")  # unfinished: the resume has work to do
    assert main(tiny_overrides(shards, out, **{"method": "random", "mem.trigger_len": 2,
                                                "experimental.mem.trigger_vocab": 50})) == 0
    assert main(tiny_overrides(shards, out, **{"method": "random", "mem.trigger_len": 3})) == 2  # another config: refused
    assert merge.main([out, "progress=false"]) == 0 and verify.verify(out)["mismatches"] == 0
    assert merge.method_name(merge.resolve_config(out, None, [])) == "random-trigger"
