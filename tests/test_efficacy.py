"""A reduced demo: a victim trained on MEM-protected shards must stay well below one trained
on the clean shards, so a regression in efficacy fails CI. Measured (victim from its own
init, not the surrogate's): clean 0.85, MEM-3 0.425, chance 0.05; random noise or a lost
delta/trigger would leave the protected victim at the clean one's level."""

import os

from mem_dist import evaluate, merge
from mem_dist.config import RunConfig, load_config
from mem_dist.demo import make_demo_data
from mem_dist.generate import main as generate
from tests.conftest import ROOT

RN32 = os.path.join(ROOT, "configs", "models", "tiny-rn32.json")


def test_protected_victim_is_far_below_clean_victim(tmp_path):
    data = str(tmp_path / "data")
    make_demo_data(data, train=800, val=200, size=32, per_shard=400, seed=1)
    shards = f"{data}/train/{{00000..00001}}.tar"
    args = [f"data.shards={shards}", f"output={tmp_path}/mem3", "data.image_size=32", f"surrogate.model={RN32}",
            "mem.rounds=4", "mem.surrogate_steps=25", "mem.pgd_steps=4", "mem.hotflip_rounds=1",
            "mem.hotflip_candidates=4", "mem.lr=5e-4", "progress=false", "device=cpu"]
    assert generate(args) == 0
    merge.merge(load_config(RunConfig, None, args))
    cfg = load_config(evaluate.EvalConfig, os.path.join(ROOT, "configs", "eval-demo.yaml"), [
        f"output={tmp_path}/eval", f"val_shards={data}/val/00000.tar", "victim.epochs=8", "victim.warmup_steps=20",
        f"conditions={{clean: '{shards}', mem3: '{tmp_path}/mem3/protected/{{00000..00001}}.tar'}}"])
    result = evaluate.run(cfg)
    clean = result["conditions"]["clean"]["final"]["i2t"]["r10"]
    mem3 = result["conditions"]["mem3"]["final"]["i2t"]["r10"]
    chance = result["chance"]["r10"]
    print(f"i2t R@10: clean victim {clean:.3f}, MEM-3 victim {mem3:.3f}, chance {chance:.3f}")
    assert clean > 10 * chance, (clean, chance)  # the victim learns the clean data
    assert mem3 < 0.7 * clean, (mem3, clean)  # and much less from the protected data
