"""Reduced versions of docs/efficacy.md's tables, so a regression in efficacy fails CI.

From scratch, on real photos (Fashion-MNIST, Debian's package): a CLIP victim trained on
MEM-5-protected shards must stay measurably below one trained on the clean shards in peak
zero-shot top-1, and come back to the clean one's level when the trigger is cut (the table:
δ alone carries nothing; measured at this size with the table's tiny-rn32 victim: clean 0.790,
MEM-5 0.710, trigger cut 0.800, chance 0.10). This
guards that the trigger reaches the victim's captions, not MEM's optimisation: a random
trigger lowers a from-scratch victim as much (docs/efficacy.md), which is why the
fine-tuning test below compares against a control.

Fine-tuning (demo scenes): victims fine-tuned from a "public checkpoint" that MEM's surrogate
started from (surrogate lr 1e-5, so it stays near it) must gain much less from MEM-5 data than
from clean data, and much less than from random noise with a random trigger: this is the
regime where the optimisation itself counts (docs/efficacy.md). Measured: the checkpoint's
R@10 0.180; gains clean +0.295, random3 +0.160, MEM-5 -0.005 (MEM-5's own control, noise + a
random trigger of the same length: see the test).

Several checkpoints: an ensemble of surrogates from checkpoints A and B must protect victims
fine-tuned from B, which a surrogate from A alone does not (numbers in the test's docstring)."""

import os

import pytest

from mem_dist.evaluation import evaluate
from mem_dist.publishing import merge
from mem_dist.cli import main as cli
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import load_config
from mem_dist.tools.demo import make_demo_data
from mem_dist.pipeline.generate import main as generate
from tests.conftest import ROOT, tiny_overrides

RN32 = os.path.join(ROOT, "configs", "models", "tiny-rn32.json")
EVAL_DEMO = os.path.join(ROOT, "configs", "eval-demo.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("efficacy") / "data")
    make_demo_data(data, train=800, val=200, size=32, per_shard=400, seed=1)
    return data, f"{data}/train/{{00000..00001}}.tar"


def protect(shards: str, output: str, *extra: str) -> str:
    """generate + merge with the reduced demo settings; returns the protected shard spec."""
    args = [f"data.shards={shards}", f"output={output}", "data.image_size=32", f"surrogate.model={RN32}",
            "mem.rounds=4", "mem.surrogate_steps=25", "mem.pgd_steps=4", "mem.hotflip_rounds=1",
            "experimental.mem.hotflip_candidates=4", "mem.lr=5e-4", "progress=false", "device=cpu", *extra]
    assert generate(args) == 0
    merge.merge(load_config(RunConfig, None, args))
    return f"{output}/protected/{{00000..00001}}.tar"


def r10(result: dict, name: str) -> float:
    return result["conditions"][name]["final"]["i2t"]["r10"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fmnist"))
    assert cli(["import", "fashion-mnist", out, "--train", "1000", "--public", "0", "--val", "200", "--size", "32",
                "--per-shard", "500"]) == 0
    return out, f"{out}/train/{{00000..00001}}.tar"


def test_real_photos_protected_victim_is_below_clean_until_the_trigger_is_cut(photos, tmp_path):
    """Also what a CLIP victim on labelled val shards reports: zero-shot top-1 per epoch, in
    metrics.json, the report and accuracy.png."""
    data, shards = photos
    args = tiny_overrides(shards, f"{tmp_path}/mem5", **{"mem.trigger_len": 5})
    assert generate(args) == 0
    merge.merge(load_config(RunConfig, None, args))
    mem5 = f"{tmp_path}/mem5/protected/{{00000..00001}}.tar"

    def victims(out: str, *extra: str) -> dict:
        return evaluate.run(load_config(evaluate.EvalConfig, None, [
            f"conditions={{clean: '{shards}', mem5: '{mem5}'}}", f"val_shards={data}/val/00000.tar", "image_size=32",
            f"output={out}", "device=cpu", f"victim.model={RN32}", "victim.epochs=10", "victim.batch_size=64",
            "victim.lr=2e-3", "victim.warmup_steps=5", *extra]))

    result = victims(f"{tmp_path}/eval")
    assert result["chance"]["top1"] == pytest.approx(0.1)
    assert all(0 <= e["zero_shot_top1"] <= 1 for c in result["conditions"].values() for e in c["epochs"])
    text = open(f"{tmp_path}/eval/report.md").read()
    assert "peak zero-shot top-1 (epoch)" in text and os.path.getsize(f"{tmp_path}/eval/accuracy.png") > 0
    clean, protected = top1(result, "clean"), top1(result, "mem5")
    cut = top1(victims(f"{tmp_path}/cut", "conditions={mem5: '" + mem5 + "'}", "defence.text=drop_prefix",
                       "defence.prefix_words=5"), "mem5")
    print(f"peak zero-shot top-1: clean {clean:.3f}, MEM-5 {protected:.3f}, MEM-5 with the trigger cut {cut:.3f}")
    assert clean > 0.6, clean  # the victim learns the photos' classes (chance 0.1)
    assert protected < clean - 0.04, (protected, clean)  # the trigger costs it measurably
    assert cut > clean - 0.04, (cut, clean)  # and nothing is left when it is cut: δ alone protects nothing


def top1(result: dict, name: str) -> float:
    """A condition's peak zero-shot top-1 over the epochs (what an attacker who stops at the best epoch keeps)."""
    return max(e["zero_shot_top1"] for e in result["conditions"][name]["epochs"])


@pytest.fixture(scope="module")
def public_checkpoint(tmp_path_factory):
    """seed -> a "public checkpoint": a victim trained on other, colour-free scenes, its
    weights saved (each built once per module)."""
    root, made = tmp_path_factory.mktemp("public"), {}

    def get(seed: int) -> str:
        if seed not in made:
            public = str(root / f"public{seed}")
            make_demo_data(public, train=800, val=50, size=32, per_shard=400, seed=seed, named_colours=False)
            evaluate.run(load_config(evaluate.EvalConfig, EVAL_DEMO, [
                f"output={root}/pretrain{seed}", f"val_shards={public}/val/00000.tar", "victim.epochs=8",
                "victim.warmup_steps=20", "save_victims=true", f"seed={seed}",
                f"conditions={{public{seed}: '{public}/train/{{00000..00001}}.tar'}}"]))
            made[seed] = f"{root}/pretrain{seed}/victims/public{seed}.pt"
        return made[seed]

    return get


def fine_tune_gains(data: str, tmp_path, checkpoint: str, conditions: dict[str, str]) -> dict[str, float]:
    """R@10 gained by victims fine-tuned from ``checkpoint`` on each condition."""
    spec = ", ".join(f"{k}: '{v}'" for k, v in conditions.items())
    result = evaluate.run(load_config(evaluate.EvalConfig, EVAL_DEMO, [
        f"output={tmp_path}/eval", f"val_shards={data}/val/00000.tar", "victim.epochs=8", "victim.warmup_steps=20",
        f"victim.pretrained={checkpoint}", "victim.lr=1e-4", f"conditions={{{spec}}}"]))
    start = result["conditions"][next(iter(conditions))]["epochs"][0]["i2t"]["r10"]
    gain = {name: r10(result, name) - start for name in conditions}
    print(f"i2t R@10 of {os.path.basename(checkpoint)}: {start:.3f}; gains from fine-tuning: {gain}")
    return gain


MEM5 = ("mem.lr=1e-5", "mem.trigger_len=5")


@pytest.fixture(scope="module")
def mem5_from_a(demo, public_checkpoint, tmp_path_factory) -> str:
    """MEM-5 shards from a surrogate started from checkpoint A (both fine-tuning tests read them)."""
    return protect(demo[1], str(tmp_path_factory.mktemp("mem5") / "a"), f"surrogate.pretrained={public_checkpoint(2)}", *MEM5)


def test_fine_tuned_victim_gains_little_from_protected_data(demo, public_checkpoint, mem5_from_a, tmp_path):
    data, shards = demo
    random5 = protect(shards, f"{tmp_path}/random5", "method=random", "mem.trigger_len=5")  # MEM-5's control
    gain = fine_tune_gains(data, tmp_path, public_checkpoint(2), {"clean": shards, "random5": random5, "mem5": mem5_from_a})
    assert gain["clean"] > 0.2, gain  # fine-tuning on clean data teaches the victim a lot
    assert gain["mem5"] < 0.5 * gain["clean"], gain  # MEM-5 data much less
    assert gain["mem5"] < 0.5 * gain["random5"], gain  # and much less than its control: noise + a random 5-word trigger


def test_an_ensemble_protects_every_checkpoint_in_it(demo, public_checkpoint, mem5_from_a, tmp_path):
    """surrogate.ensemble: surrogates from checkpoints A and B (MEM-5); victims fine-tuned from
    B gain much less than from clean data and than from data protected by a surrogate from A
    alone (which does not protect B's victims). Measured: B's R@10 0.190; gains clean +0.200,
    MEM-5 from A +0.195, MEM-5 from A + B +0.050 (victims from A: +0.295, -0.005, +0.005)."""
    data, shards = demo
    a, b = public_checkpoint(2), public_checkpoint(3)
    both = protect(shards, f"{tmp_path}/ab", f"surrogate.pretrained={a}", f"surrogate.ensemble=[{{pretrained: {b}}}]", *MEM5)
    gain = fine_tune_gains(data, tmp_path, b, {"clean": shards, "mem5-a": mem5_from_a, "mem5-ab": both})
    assert gain["clean"] > 0.15, gain
    assert gain["mem5-ab"] < 0.5 * gain["clean"], gain
    assert gain["mem5-ab"] < 0.5 * gain["mem5-a"], gain
