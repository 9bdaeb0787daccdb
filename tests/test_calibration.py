"""The calibrated victims and their calibration points (docs/efficacy.md, "Calibrated victims").

The victims that keep a 32-px image's resolution (mem_dist.evaluation.cifar_nets), the literature's
class-keyed attacks that calibrate them (mem_dist.evaluation.baselines, ``mem-dist baseline``), the
evaluation's hygiene (the attacker's epoch chosen on a select split, bootstrap intervals,
victim seeds, each condition against its control), and a calibration test that fails if the
calibrated victim stops reading a class-wise block code.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
import webdataset as wds

from mem_dist.evaluation import baselines, cifar_nets, evaluate, report
from mem_dist.cli import main as cli
from mem_dist.pipeline.config_io import load_config
from mem_dist.evaluation.eval_config import EvalConfig
from mem_dist.tools.importers import import_fashion_mnist
from mem_dist.evaluation.scores import attacker_epoch, bootstrap_interval, pack_correct, unpack_correct
from tests.conftest import ROOT

CALIBRATE = os.path.join(ROOT, "configs", "eval-calibrate.yaml")


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("calib") / "fm")
    import_fashion_mnist(out, train=1000, val=300, public=0, select=200, per_shard=500)
    return out


def test_cifar_victims_keep_the_resolution():
    x = torch.randn(2, 3, 32, 32)
    net = cifar_nets.build("cifar_resnet18", 10, 64)
    assert 11.1e6 < sum(p.numel() for p in net.parameters()) < 11.3e6  # the papers' ResNet-18
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)
    assert net.layers[0](torch.relu(net.bn1(net.conv1(x)))).shape[-1] == 32  # the first block sees 32 x 32
    for name in cifar_nets.MODELS:
        assert cifar_nets.build(name, 7, 8)(x).shape == (2, 7)


@pytest.mark.parametrize("kind", ["block", "lsp", "ar"])
def test_baselines_are_bounded_and_keyed_on_the_class(kind):
    labels = np.repeat(np.arange(4), 25)
    fn = {"block": baselines.block_code, "lsp": baselines.lsp, "ar": baselines.ar}[kind]
    delta = fn(labels, 32, 8, 0).astype(np.float64)
    assert delta.shape == (100, 32, 32, 3) and np.abs(delta).max() <= 8 and np.abs(delta).mean() > 0.5
    again = fn(labels, 32, 8, 0)
    assert np.array_equal(delta, again)  # seeded
    flat = delta.reshape(100, -1)
    flat = flat - flat.mean(1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    if kind == "ar":  # a fresh random start per sample: the class shows in the filter, not the pixels
        gen = torch.Generator().manual_seed(0)
        coeffs = baselines.ar_coefficients(4, 32, 4, gen)
        filt = coeffs.clone()
        filt[:, :, 2, 2] = -1  # the residual of each class's process
        d = torch.from_numpy(delta).permute(0, 3, 1, 2).float()
        energy = torch.stack([torch.nn.functional.conv2d(d, filt[c].unsqueeze(1).float(), groups=3).pow(2).mean((1, 2, 3))
                              for c in range(4)], 1)
        assert (energy.argmin(1).numpy() == labels).mean() > 0.95  # each sample is annihilated by its class's filter
        return
    sim = flat @ flat.T
    same = labels[:, None] == labels[None, :]
    assert sim[same].mean() > sim[~same].mean() + 0.3


def test_baseline_command_keeps_keys_captions_and_labels(fm, tmp_path, capsys):
    out = str(tmp_path / "block")
    assert cli(["baseline", "block", f"{fm}/train/{{00000..00001}}.tar", out]) == 0
    assert "1000 samples" in capsys.readouterr().out
    src = list(wds.WebDataset(f"{fm}/train/00000.tar", shardshuffle=False))
    got = list(wds.WebDataset(f"{out}/00000.tar", shardshuffle=False))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in src]
    assert all(a["txt"] == b["txt"] and json.loads(a["json"])["label"] == json.loads(b["json"])["label"] for a, b in zip(got, src))
    assert "png" in got[0]  # lossless: the victim reads canvas + delta exactly
    assert cli(["baseline", "block", f"{fm}/train/00000.tar", out, "--epsilon", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line


def test_em_baseline_minimises_the_error_of_its_own_model(fm):
    """Each round, the crafting model's loss on the perturbed images is below its loss on the clean
    ones, by more once the model has trained (the noise minimises *its* error). Its accuracy from
    round to round is no guide at this size (a ResNet-18 after 5 steps at lr 0.1 swings between
    0.13 and 0.57 or predicts one class, and its BatchNorm statistics are young), so the test
    compares the two at the same state. Measured (one and two threads): round 1 0.5%, round 3 9-12% lower."""
    from mem_dist.evaluation.pairs import load_pairs

    cfg = load_config(EvalConfig, CALIBRATE, [f"val_shards={fm}/val/00000.tar"])
    pairs = load_pairs(f"{fm}/train/00000.tar", cfg)
    x, y = pairs.canvases[:128], pairs.labels[:128]
    lines = []
    delta = baselines.em(x, y, 8, 0, width=4, rounds=3, train_steps=5, pgd_steps=5, batch=64, log=lines.append)
    assert np.abs(delta).max() <= 8 and np.abs(delta).mean() > 1
    losses = [tuple(float(v) for v in re.search(r"loss ([\d.]+) \(clean data [\d.]+, ([\d.]+);", line).groups())
              for line in lines]
    print("loss on the perturbed data, on the clean data, per round:", losses)
    assert len(losses) == 3 and all(perturbed < clean for perturbed, clean in losses), losses
    assert losses[-1][0] < 0.97 * losses[-1][1], losses


def test_select_split_is_disjoint_from_val(fm):
    def indices(split):
        return {json.loads(s["json"])["source_index"] for s in wds.WebDataset(f"{fm}/{split}/00000.tar", shardshuffle=False)}
    assert len(indices("select")) == 200 and not indices("select") & indices("val")


def test_bootstrap_interval_and_attacker_epoch():
    correct = np.zeros((2, 1000), bool)
    correct[:, :300] = True
    lo, hi = bootstrap_interval(correct)
    assert lo < 0.3 < hi and hi - lo < 0.07  # about +-1.96 sqrt(0.21 / 1000)
    assert np.array_equal(unpack_correct(pack_correct(correct[0]), 1000), correct[0])
    epochs = [{"epoch": 0, "select_top1": 0.9}, {"epoch": 1, "select_top1": 0.5}, {"epoch": 2, "select_top1": 0.7},
              {"epoch": 3, "select_top1": 0.7}]
    assert attacker_epoch(epochs, "select_top1")["epoch"] == 2  # never epoch 0; the earliest of ties


def test_report_names_each_condition_against_its_control():
    def run(seed, accs, right):
        bits = np.zeros(100, bool)
        bits[:right] = True
        epochs = [{"epoch": i, "top1": a, "select_top1": a, "train_loss": 1.0, "correct": pack_correct(bits)}
                  for i, a in enumerate(accs)]
        return {"seed": seed, "epochs": epochs, "final": epochs[-1], "n_val": 100}

    def cond(control, *runs):
        return {**runs[0], "condition": {"control": control}, "runs": list(runs), "n_train": 10, "n_protected": None}

    metrics = {"kind": "classifier", "chance": {"top1": 0.1}, "settings": "s", "conditions": {
        "clean": cond(None, run(0, [0.1, 0.8], 80), run(1, [0.1, 0.82], 82)),
        "noise": cond("clean", run(0, [0.1, 0.79], 79), run(1, [0.1, 0.8], 80)),
        "code": cond("noise", run(0, [0.1, 0.3, 0.2], 20), run(1, [0.1, 0.25, 0.22], 22))}}
    line = report.versus_controls(metrics)
    assert line.startswith("**Against the controls**") and "noise 0.795" in line and "no better than its control" in line
    assert "code 0.275" in line and "below its control" in line  # the attacker keeps epoch 1 (0.3 / 0.25)
    table = report.summary_table(metrics)
    assert "| code | noise | 0, 1 | 0.210 [" in table and "(0.200 / 0.220)" in table
    text = report.markdown_report(metrics, report.results_table(metrics), False)
    assert text.split("\n")[2].startswith("**Against the controls**")
    assert not re.search(r"\d%", text.replace("95%", ""))  # one unit: fractions
    # a condition scored without a select split (reports combined from other runs): each pair says where it was read
    other = cond("clean", run(0, [0.1, 0.5], 50), run(1, [0.1, 0.6], 60))
    for r in other["runs"] + [other]:
        for e in r["epochs"]:
            e.pop("select_top1", None)  # cond() shares run 0's epochs
    line = report.versus_controls({**metrics, "conditions": {**metrics["conditions"], "other": other}})
    assert "where both were scored there, else after the last epoch" in line, line
    assert "other 0.550 [" in line and "against clean 0.810 [" in line and "(final)" in line
    assert "code 0.275 [" in line and "(at the attacker's epoch)" in line


@pytest.fixture(scope="module")
def keyed_only(fm, tmp_path_factory):
    """Fashion-MNIST photos with a random label each (the content says nothing about it) and the
    label's class-wise block code at eps 32: train (1000) and val (300) shards."""
    from mem_dist.evaluation.pairs import load_pairs
    from mem_dist.tools.shards import write_shards

    root = tmp_path_factory.mktemp("keyed")
    cfg = load_config(EvalConfig, CALIBRATE, [f"val_shards={fm}/val/00000.tar"])
    out = {}
    for split, spec, seed in (("train", f"{fm}/train/{{00000..00001}}.tar", 1), ("val", f"{fm}/val/00000.tar", 2)):
        pairs = load_pairs(spec, cfg)
        labels = np.random.default_rng(seed).integers(0, 10, len(pairs))
        write_shards(str(root / f"{split}-src"), ((c, t, {"label": int(y), "class": f"code {y}"}) for c, t, y in
                                                   zip(pairs.canvases, pairs.captions, labels)), per_shard=500)
        assert cli(["baseline", "block", str(root / f"{split}-src") + "/{00000..00001}.tar" if split == "train"
                    else str(root / f"{split}-src/00000.tar"), str(root / split), "--epsilon", "32"]) == 0
        out[split] = str(root / split) + ("/{00000..00001}.tar" if split == "train" else "/00000.tar")
    return out


def read_code(keyed_only: dict, out: str, *model: str) -> float:
    cfg = load_config(EvalConfig, CALIBRATE, [f"conditions={{code: '{keyed_only['train']}'}}", f"val_shards={keyed_only['val']}",
                                              "select_shards=null", "seeds=[0]", "victim.epochs=8", "victim.batch_size=64",
                                              f"output={out}", "num_threads=0", *model])
    return evaluate.run(cfg, log=lambda line: None)["conditions"]["code"]["final"]["top1"]


def test_the_calibrated_victim_reads_a_class_wise_block_code(keyed_only, tmp_path):
    """The calibration guard: labels that only a class-wise code of 4-px blocks carries (random
    labels on real photos). The CIFAR-style ResNet-18 that keeps the resolution must read it from
    new photos carrying the code (measured: 1.000 after 6 epochs, 0.330 after 4); torchvision's
    ImageNet-stem ResNet-18, which reduces the image to 8x8 before its first block, does not
    (0.097), which is why efficacy is measured with the first. eps 32 keeps the test short: at
    eps 8 the same victim needs the 4,000 images of docs/efficacy.md's calibration."""
    cifar = read_code(keyed_only, str(tmp_path / "cifar"), "classifier.model=cifar_resnet18", "classifier.width=8")
    imagenet = read_code(keyed_only, str(tmp_path / "imagenet"), "classifier.model=resnet18", "victim.epochs=6")
    print(f"top-1 on the code's labels: CIFAR-style {cifar:.3f}, ImageNet-stem {imagenet:.3f} (chance 0.1)")
    assert cifar > 0.8, cifar
    assert imagenet < 0.3, imagenet


def test_retrieval_victims_are_judged_against_their_controls_too():
    """CLIP victims on unlabelled val pairs (the demo): image->text R@10, per pair hits packed."""
    def cond(control, r10, hits):
        bits = np.zeros(50, bool)
        bits[:hits] = True
        epochs = [{"epoch": 0, "i2t_r10": 0.2, "i2t_hits": pack_correct(bits), "train_loss": None, "i2t": {"r10": 0.2}},
                  {"epoch": 1, "i2t_r10": r10, "i2t_hits": pack_correct(bits), "train_loss": 1.0, "i2t": {"r10": r10}}]
        return {"epochs": epochs, "final": epochs[-1], "n_val": 50, "condition": {"control": control}}

    metrics = {"kind": "clip", "chance": {"r10": 0.2}, "conditions": {
        "random3": cond(None, 0.54, 27), "mem3": cond("random3", 0.55, 27)}}
    line = report.versus_controls(metrics)
    assert "image->text R@10" in line and "mem3 0.550" in line and "no better than its control" in line
