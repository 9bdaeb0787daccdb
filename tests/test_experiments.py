"""The experiment scripts under experiments/ (not package options) still run and write what
docs/efficacy.md says they write."""

import io
import os
import subprocess

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mem_dist.publishing import merge
from mem_dist.pipeline import surrogate
from mem_dist.methods.uc import store as uc
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.data import load_shard
from mem_dist.pipeline.generate import main as generate
from mem_dist.tools.importers import import_fashion_mnist
from mem_dist.evaluation.pairs import read_labels
from tests.conftest import ROOT, TINY_RN, python_cmd
from tests.test_uc import assert_published_with_cluster_perturbations, uc_overrides


def test_adversarial_poison_writes_bounded_deltas_with_the_source_captions(demo_dir, tmp_path):
    torch.manual_seed(0)
    model, _, _ = surrogate.create_surrogate(TINY_RN)
    checkpoint = str(tmp_path / "surrogate.pt")
    surrogate.save(model.state_dict(), checkpoint)
    shard = f"{demo_dir}/train/00000.tar"
    out = str(tmp_path / "protected")
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "adversarial_poison.py"), "--shards", shard,
                                     "--model", TINY_RN, "--pretrained", checkpoint, "--out", out, "--steps", "3",
                                     "--eps", "4", "--k", "3"), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "cos to target" in done.stdout
    source = load_shard(shard, DataConfig(shards=shard, image_size=32))
    written = list(wds.WebDataset(f"{out}/00000.tar", shardshuffle=False))
    assert [s["__key__"] for s in written] == source.keys
    assert [s["txt"].decode() for s in written] == source.captions  # no trigger: only the pixels change
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(s["png"]))) for s in written]).astype(int)
    delta = pixels - source.canvases.astype(int)
    assert np.abs(delta).max() <= 4 and np.abs(delta).max() > 0


def test_group_code_gives_every_group_one_pattern_and_one_word(demo_dir, tmp_path):
    shard = f"{demo_dir}/train/00000.tar"
    out = str(tmp_path / "group")
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "group_code.py"), "--shards", shard, "--out", out,
                                     "--groups", "4", "--eps", "8", "--unique-words", "1"), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    source = load_shard(shard, DataConfig(shards=shard, image_size=32))
    written = list(wds.WebDataset(f"{out}/00000.tar", shardshuffle=False))
    assert [s["__key__"] for s in written] == source.keys
    captions = [s["txt"].decode() for s in written]
    assert all(c.endswith(" " + src) and len(c.split()) == len(src.split()) + 2 for c, src in zip(captions, source.captions))
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(s["png"]))) for s in written]).astype(int)
    delta = pixels - source.canvases.astype(int)
    assert np.abs(delta).max() == 8
    by_word: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        by_word.setdefault(c.split()[0], []).append(i)
    assert len(by_word) == 4
    for rows in by_word.values():  # one pattern per group, wherever no sample of it was clipped
        unclipped = ((source.canvases[rows] >= 8) & (source.canvases[rows] <= 247)).all(0)
        d = delta[rows][:, unclipped]
        assert d.size and (d == d[0]).all()


@pytest.fixture(scope="module")
def labelled_uc(tmp_path_factory) -> tuple[list[str], str]:
    """(the train shards' URLs, a finished UC run over them): 120 labelled photos, 10 clusters."""
    root = tmp_path_factory.mktemp("labelled")
    urls = import_fashion_mnist(str(root / "fm"), train=120, val=1, public=0, per_shard=60)["train"]
    src = str(root / "uc")
    assert generate(uc_overrides(str(root / "fm" / "train" / "{00000..00001}.tar"), src,
                                 **{"uc.clusters": 10, "uc.kmeans_samples": 120})) == 0
    return urls, src


def test_uc_oracle_gives_every_class_one_perturbation(labelled_uc, tmp_path):
    """experiments/uc_oracle.py on a finished UC run over labelled photos: after its merge every
    image carries the perturbation of the cluster its class was matched to, one per class."""
    urls, src = labelled_uc
    dst = str(tmp_path / "oracle")
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "uc_oracle.py"), src, dst), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "of the samples keep their cluster" in done.stdout
    assert merge.main([dst]) == 0
    pert = uc.read_perturbations(src).astype(int)
    assert np.array_equal(pert, uc.read_perturbations(dst).astype(int)) and len(np.unique(pert.reshape(10, -1), axis=0)) == 10
    cluster_of_class: dict[int, int] = {}
    for url in urls:
        source = load_shard(url, DataConfig(shards=url, image_size=32))
        labels, _ = read_labels(source.meta)
        keys, clusters, _, _ = uc.read_assignments(dst, source.name)
        assert keys == source.keys
        for label, cluster in zip(labels.tolist(), clusters.tolist()):
            assert cluster_of_class.setdefault(label, cluster) == cluster
        assert_published_with_cluster_perturbations(dst, source, clusters, pert)
    assert sorted(cluster_of_class) == list(range(10)) and len(set(cluster_of_class.values())) == 10
    # experiments/cluster_agreement.py: the oracle's clusters are the classes exactly
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "cluster_agreement.py"), dst, os.path.dirname(urls[0])),
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "120 samples, NMI 1.000, matched 1.000" in done.stdout


def test_em_clusters_replaces_the_perturbations_and_keeps_the_clusters(labelled_uc, tmp_path):
    """experiments/em_clusters.py: a copy of the run whose p perturbations are error-minimising
    noise within epsilon (other than UC's), the clusters unchanged; its merge carries them."""
    urls, src = labelled_uc
    dst = str(tmp_path / "em")
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "em_clusters.py"), src, dst, "--iterations", "2",
                                     "--train-steps", "1", "--pgd-steps", "1", "--batch", "16"),
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "iteration 2/2" in done.stdout
    assert merge.main([dst]) == 0
    pert, before = uc.read_perturbations(dst).astype(int), uc.read_perturbations(src).astype(int)
    assert pert.shape == before.shape and np.abs(pert).max() <= 16 and not np.array_equal(pert, before)
    for url in urls:
        source = load_shard(url, DataConfig(shards=url, image_size=32))
        keys, clusters, _, _ = uc.read_assignments(dst, source.name)
        assert keys == source.keys and np.array_equal(clusters, uc.read_assignments(src, source.name)[1])
        assert_published_with_cluster_perturbations(dst, source, clusters, pert)


def test_uc_positive_makes_every_perturbation_non_negative(labelled_uc, tmp_path):
    """experiments/uc_positive.py: a copy of the run whose perturbations are |delta| of the
    run's own, the clusters unchanged; its merge carries them."""
    urls, src = labelled_uc
    dst = str(tmp_path / "positive")
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "uc_positive.py"), src, dst), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    before = uc.read_perturbations(src).astype(int)
    assert (before < 0).any() and f"{int((before < 0).sum())} of {before.size} perturbation values were negative" in done.stdout
    assert merge.main([dst]) == 0
    pert = uc.read_perturbations(dst).astype(int)
    assert np.array_equal(pert, np.abs(before))
    for url in urls:
        source = load_shard(url, DataConfig(shards=url, image_size=32))
        keys, clusters, _, _ = uc.read_assignments(dst, source.name)
        assert keys == source.keys and np.array_equal(clusters, uc.read_assignments(src, source.name)[1])
        assert_published_with_cluster_perturbations(dst, source, clusters, pert)


def test_caption_noise_names_another_class_for_a_share_of_the_samples(tmp_path):
    """experiments/caption_noise.py: the same keys, image bytes and labels; for about the given
    share of the samples the caption names a class other than the label, the rest unchanged."""
    import json
    import re

    import pyarrow.parquet as pq

    from mem_dist.tools.importers import FASHION_MNIST_CLASSES

    import_fashion_mnist(str(tmp_path / "fm"), train=400, val=1, public=0, per_shard=200)
    src, out = str(tmp_path / "fm" / "train"), str(tmp_path / "noisy")
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "caption_noise.py"), src, out, "0.3"),
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    changed = 0
    for name in ("00000", "00001"):
        before = list(wds.WebDataset(f"{src}/{name}.tar", shardshuffle=False))
        after = list(wds.WebDataset(f"{out}/{name}.tar", shardshuffle=False))
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        assert all(a["jpg"] == b["jpg"] for a, b in zip(after, before))
        assert pq.read_table(f"{out}/{name}.parquet").column("caption").to_pylist() == [s["txt"].decode() for s in after]
        for a, b in zip(after, before):
            meta, caption = json.loads(a["json"]), a["txt"].decode()
            assert meta["label"] == json.loads(b["json"])["label"] and meta["caption"] == caption
            named = [c for c in FASHION_MNIST_CLASSES if f" {c}" in f" {caption}" and not (c == "shirt" and "t-shirt" in caption)]
            assert len(named) == 1, caption
            if caption != b["txt"].decode():
                changed += 1
                same = [re.sub(r"\ban\b", "a", t) for t in (caption.replace(named[0], meta["class"]), b["txt"].decode())]
                assert named[0] != meta["class"] and same[0] == same[1], (caption, b["txt"])
    assert 0.2 < changed / 400 < 0.4
    assert f"{changed} captions name another class" in done.stdout


def test_combine_reports_joins_seeds_and_sets_controls(tmp_path):
    """experiments/combine_reports.py: runs made one (condition, seed) at a time become one report,
    each condition's seeds side by side and its control named."""
    import json

    from mem_dist.evaluation.scores import pack_correct

    def write(d, name, seed, acc):
        bits = np.arange(100) < acc * 100
        epochs = [{"epoch": 1, "top1": acc, "select_top1": acc, "train_loss": 0.5, "correct": pack_correct(bits)}]
        hist = {"epochs": epochs, "final": epochs[0], "n_val": 100, "n_train": 10, "n_protected": None,
                "condition": {"shards": "x", "control": None}}
        os.makedirs(d)
        json.dump({"kind": "classifier", "chance": {"top1": 0.1, "median_rank": 50.0}, "settings": f"s; victim seed {seed}",
                   "conditions": {name: {**hist, "runs": [{"seed": seed, **hist}]}}}, open(f"{d}/metrics.json", "w"))

    for name, acc in (("clean", 0.8), ("code", 0.3)):
        for seed in (0, 1):
            write(tmp_path / f"{name}-s{seed}", name, seed, acc + 0.02 * seed)
    out = tmp_path / "all"
    subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "combine_reports.py"), str(out), "--control", "code=clean",
                              *sorted(str(p) for p in tmp_path.glob("*-s*"))), check=True, cwd=ROOT, capture_output=True)
    text = open(out / "report.md").read()
    assert "code 0.310" in text and "against clean 0.810" in text and "| code | clean | 0, 1 |" in text
