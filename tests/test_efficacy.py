"""Reduced demos of the two threats, so a regression in efficacy fails CI.

From scratch: a victim trained on MEM-protected shards must stay well below one trained on
the clean shards (measured, victim from its own init: clean 0.85, MEM-3 0.425, chance 0.05;
random noise or a lost delta/trigger would leave it at the clean one's level). This guards
that the trigger reaches the victim's captions, not MEM's optimisation: on the demo a single
fixed prefix on every caption (`mem.method=prefix`) lowers a from-scratch victim about as much
(docs/efficacy.md), which is why the fine-tuning test below compares against a control.

Fine-tuning: victims fine-tuned from a "public checkpoint" that MEM's surrogate started
from (surrogate lr 1e-5, so it stays near it) must gain much less from MEM-3 data than from
clean data, and much less than from random noise with a random trigger: this is the regime
where the optimisation itself counts (docs/efficacy.md). Measured: the checkpoint's R@10
0.180; gains clean +0.295, random3 +0.160, MEM-3 -0.005.

Several checkpoints: an ensemble of surrogates from checkpoints A and B must protect victims
fine-tuned from B, which a surrogate from A alone does not (numbers in the test's docstring)."""

import os

import pytest

from mem_dist import evaluate, merge
from mem_dist.config import RunConfig
from mem_dist.config_io import load_config
from mem_dist.demo import make_demo_data
from mem_dist.generate import main as generate
from tests.conftest import ROOT

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
            "mem.hotflip_candidates=4", "mem.lr=5e-4", "progress=false", "device=cpu", *extra]
    assert generate(args) == 0
    merge.merge(load_config(RunConfig, None, args))
    return f"{output}/protected/{{00000..00001}}.tar"


def r10(result: dict, name: str) -> float:
    return result["conditions"][name]["final"]["i2t"]["r10"]


def test_protected_victim_is_far_below_clean_victim(demo, tmp_path):
    data, shards = demo
    mem3 = protect(shards, f"{tmp_path}/mem3")
    cfg = load_config(evaluate.EvalConfig, EVAL_DEMO, [
        f"output={tmp_path}/eval", f"val_shards={data}/val/00000.tar", "victim.epochs=8", "victim.warmup_steps=20",
        f"conditions={{clean: '{shards}', mem3: '{mem3}'}}"])
    result = evaluate.run(cfg)
    clean, mem3, chance = r10(result, "clean"), r10(result, "mem3"), result["chance"]["r10"]
    print(f"i2t R@10: clean victim {clean:.3f}, MEM-3 victim {mem3:.3f}, chance {chance:.3f}")
    assert clean > 10 * chance, (clean, chance)  # the victim learns the clean data
    assert mem3 < 0.7 * clean, (mem3, clean)  # and much less from the protected data


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


def test_fine_tuned_victim_gains_little_from_protected_data(demo, public_checkpoint, tmp_path):
    data, shards = demo
    checkpoint = public_checkpoint(2)
    mem3 = protect(shards, f"{tmp_path}/mem3", f"surrogate.pretrained={checkpoint}", "mem.lr=1e-5")
    random3 = protect(shards, f"{tmp_path}/random3", "mem.method=random")
    gain = fine_tune_gains(data, tmp_path, checkpoint, {"clean": shards, "random3": random3, "mem3": mem3})
    assert gain["clean"] > 0.2, gain  # fine-tuning on clean data teaches the victim a lot
    assert gain["mem3"] < 0.5 * gain["clean"], gain  # MEM-3 data much less
    assert gain["mem3"] < 0.5 * gain["random3"], gain  # and much less than an unoptimised trigger + noise


def test_an_ensemble_protects_every_checkpoint_in_it(demo, public_checkpoint, tmp_path):
    """surrogate.ensemble: surrogates from checkpoints A and B (MEM-5); victims fine-tuned from
    B gain much less than from clean data and than from data protected by a surrogate from A
    alone (which does not protect B's victims). Measured: B's R@10 0.190; gains clean +0.200,
    MEM-5 from A +0.195, MEM-5 from A + B +0.050 (victims from A: +0.295, -0.005, +0.005)."""
    data, shards = demo
    a, b = public_checkpoint(2), public_checkpoint(3)
    mem5 = ("mem.lr=1e-5", "mem.trigger_len=5")
    only_a = protect(shards, f"{tmp_path}/a", f"surrogate.pretrained={a}", *mem5)
    both = protect(shards, f"{tmp_path}/ab", f"surrogate.pretrained={a}", f"surrogate.ensemble=[{{pretrained: {b}}}]", *mem5)
    gain = fine_tune_gains(data, tmp_path, b, {"clean": shards, "mem5-a": only_a, "mem5-ab": both})
    assert gain["clean"] > 0.15, gain
    assert gain["mem5-ab"] < 0.5 * gain["clean"], gain
    assert gain["mem5-ab"] < 0.5 * gain["mem5-a"], gain
