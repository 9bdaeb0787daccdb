"""Unlearnable Clusters (method uc) at small size: clusters, bounded perturbations, the
published pixels, the same bytes from one process and from two, resume, a torchvision surrogate,
clusters from the captions."""

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mem_dist.publishing import merge, verify
from mem_dist.methods.uc import features, perturbations, store
from mem_dist.methods.uc import run as uc_run
from mem_dist.pipeline import state
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import ConfigError, load_config
from mem_dist.pipeline.data import load_shard
from mem_dist.pipeline.generate import main as generate
from tests.conftest import ROOT, tiny_overrides
from tests.test_distributed import free_port

SHARDS = "{00000..00002}.tar"


def uc_overrides(shards: str, output: str, **extra) -> list[str]:
    base = {"method": "uc", "uc.clusters": 3, "uc.epochs": 2, "experimental.uc.generator_width": 8, "experimental.uc.generator_blocks": 1,
            "uc.batch_size": 24, "uc.kmeans_samples": 90, "uc.train_samples": 60}
    base.update(extra)
    return tiny_overrides(shards, output, **base)


@pytest.fixture(scope="module")
def run(demo_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("uc") / "run")
    assert generate(uc_overrides(f"{demo_dir}/train/{SHARDS}", out)) == 0
    assert merge.main([out]) == 0
    return out


def test_clusters_and_perturbations(run, demo_dir):
    cfg = load_config(RunConfig, None, uc_overrides(f"{demo_dir}/train/{SHARDS}", run))
    assert cfg.uc.epsilon == 16  # UC's default
    pert = store.read_perturbations(run)
    assert pert.shape == (3, 32, 32, 3) and pert.dtype == np.int8 and np.abs(pert.astype(int)).max() <= 16
    assert np.abs(pert.astype(int)).max() > 0
    seen = set()
    for name in ("00000", "00001", "00002"):
        keys, clusters, distances, _ = store.read_assignments(run, name)
        src = load_shard(f"{demo_dir}/train/{name}.tar", cfg.data)
        assert keys == src.keys and ((clusters >= 0) & (clusters < 3)).all() and (distances >= 0).all()
        seen |= set(clusters.tolist())
        published = assert_published_with_cluster_perturbations(run, src, clusters, pert)
        assert [published[key]["txt"].decode() for key in keys] == src.captions  # no trigger
    assert seen == {0, 1, 2}
    assert verify.verify(run)["mismatches"] == 0


def assert_published_with_cluster_perturbations(run: str, source, clusters: np.ndarray, pert: np.ndarray) -> dict:
    """Each published image of ``source``'s shard is its canvas plus its cluster's perturbation,
    clipped; returns the published samples by key."""
    published = {s["__key__"]: s for s in wds.WebDataset(f"{run}/protected/{source.name}.tar", shardshuffle=False)}
    for i, key in enumerate(source.keys):
        pixels = np.asarray(Image.open(io.BytesIO(published[key]["png"]))).astype(int)
        assert np.array_equal(pixels, np.clip(source.canvases[i].astype(int) + pert[clusters[i]].astype(int), 0, 255))
    return published


def launch(args: list[str], processes: int) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if processes == 1:
        cmd = [sys.executable, os.path.join(ROOT, "mem_dist", "generate.py"), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), os.path.join(ROOT, "mem_dist", "generate.py"), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def state_bytes(output: str) -> dict[str, bytes]:
    files = {f"round-001/{n}": open(f"{output}/state/round-001/{n}", "rb").read() for n in sorted(os.listdir(f"{output}/state/round-001"))}
    files.update({f"uc/{n}": open(f"{output}/state/uc/{n}", "rb").read() for n in ("centroids.npy", "perturbations.npy")})
    return files


def test_two_ranks_give_the_same_clusters_and_bytes_as_one(run, demo_dir, tmp_path):
    """Shards split over two processes (shard i on rank i % 2), gradients summed in fixed point:
    the same centroids, assignments and perturbations as one process, byte for byte (and the
    same float weights in the last checkpoint); with uc.augment=published, so the seeded crops
    and flips are the same on any rank too, and the augmentation reaches the optimisation (the
    perturbations differ from the unaugmented run's)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # the generator (its output is never 0): the random tiny surrogate's features barely differ,
    # so directly optimised perturbations get gradients below the fixed-point resolution and stay 0
    launch(uc_overrides(f"{demo_dir}/train/{SHARDS}", one, **{"uc.augment": "published"}), 1)
    launch(uc_overrides(f"{demo_dir}/train/{SHARDS}", two, **{"uc.augment": "published"}), 2)
    a, b = state_bytes(one), state_bytes(two)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert np.abs(np.load(io.BytesIO(a["uc/perturbations.npy"])).astype(int)).max() > 0
    weights = [torch.load(f"{out}/checkpoints/uc-epoch-002.pt", weights_only=True)["perturbations"] for out in (one, two)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    plain = state_bytes(run)
    assert a["uc/centroids.npy"] == plain["uc/centroids.npy"]  # the same clusters as without augmentation,
    assert a["uc/perturbations.npy"] != plain["uc/perturbations.npy"]  # other perturbations


def test_the_augmentation_moves_the_image_or_the_perturbed_image():
    """uc.augment: "images" crops and flips the canvases and adds the perturbation after, at its
    place (the authors' loader); "published" crops and flips canvas + perturbation together, as
    a victim's loader does; "none" neither. Seen through a surrogate that returns its input, with
    uc.optimise's crop (experimental.uc.crop_padding 4, experimental.uc.flip), seeded by (epoch, step, shard) alone."""
    cfg = load_config(RunConfig, None, uc_overrides("x.tar", "out", **{"uc.augment": "published"}))
    assert uc_run.seeded_crop(load_config(RunConfig, None, uc_overrides("x.tar", "out")), 1, 0, "00000") is None

    def seen(mode: str, canvas: torch.Tensor, delta: torch.Tensor, step: int = 0) -> torch.Tensor:
        inputs = []

        def net(pix):
            inputs.append(pix.detach().clone())
            return pix.flatten(1)

        perturbations.pull_loss(net, canvas, delta, None, torch.zeros(1, 3 * 32 * 32), mode, uc_run.seeded_crop(cfg, 1, step, "00000"))
        return inputs[0]

    B = 64
    halves = torch.zeros(B, 3, 32, 32)
    halves[..., :16] = 200.0  # a bright left half
    mark = torch.zeros(1, 3, 32, 32)
    mark[0, :, 10, 20] = 16.0  # one marked pixel of the perturbation
    blank, no_delta = torch.zeros(B, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    assert torch.equal(seen("none", halves, mark), (halves + mark).clamp(0, 255))
    moved = seen("images", halves, no_delta)  # images: the canvases move, some mirrored (bright right half)
    mirrored = moved[..., 16:].mean((1, 2, 3)) > moved[..., :16].mean((1, 2, 3))
    assert 0 < int(mirrored.sum()) < B and not torch.equal(moved, halves)
    assert torch.equal(seen("images", blank, mark), mark.expand(B, -1, -1, -1))  # and the perturbation stays put
    out = seen("published", blank, mark)  # published: the perturbation moves with the image
    where = (out[:, 0] == 16).nonzero()  # (image, row, column): one mark per image
    assert len(where) == B and where[:, 0].tolist() == list(range(B))
    dy, column = where[:, 1] - 10, where[:, 2]
    direct, flipped = (column - 20).abs() <= 4, (column - 11).abs() <= 4  # 11 = 31 - 20
    assert int(dy.abs().max()) == 4 and (direct | flipped).all() and direct.any() and flipped.any()
    assert torch.equal(out, seen("published", blank, mark)) and not torch.equal(out, seen("published", blank, mark, step=1))
    with pytest.raises(ValueError, match="needs the"):
        perturbations.pull_loss(lambda px: px.flatten(1), blank, mark, None, torch.zeros(1, 3 * 32 * 32), "published")


def test_an_interrupted_run_resumes_to_the_same_bytes(run, demo_dir, tmp_path):
    """Killed after epoch 1 (its checkpoint written, nothing after): the same command finishes
    with exactly the perturbations of the uninterrupted run."""
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("protected", "manifest"))
    os.remove(f"{copy}/state/uc/perturbations.npy")
    os.remove(f"{copy}/checkpoints/uc-epoch-002.pt")
    assert generate(uc_overrides(f"{demo_dir}/train/{SHARDS}", copy)) == 0
    assert open(f"{copy}/state/uc/perturbations.npy", "rb").read() == open(f"{run}/state/uc/perturbations.npy", "rb").read()
    assert generate(uc_overrides(f"{demo_dir}/train/{SHARDS}", copy, **{"uc.clusters": 4})) == 2  # another config: refused


def test_a_torchvision_classifier_is_the_uc_surrogate(demo_dir, tmp_path, capsys):
    import torchvision

    ckpt = str(tmp_path / "resnet18.pt")
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), ckpt)
    out = str(tmp_path / "tv")
    args = uc_overrides(f"{demo_dir}/train/00000.tar", out, **{"surrogate.model": "torchvision:resnet18",
                                                                "surrogate.pretrained": ckpt, "experimental.uc.train_on": "cluster"})
    assert generate(args) == 0
    assert store.read_perturbations(out).shape == (3, 32, 32, 3)
    bad = uc_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "bad"), **{"surrogate.model": "torchvision:resnet18",
                                                                              "surrogate.pretrained": str(tmp_path / "nope.pt")})
    assert generate(bad) == 2 and "surrogate.pretrained" in capsys.readouterr().err
    captions = uc_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "captions"), **{
        "surrogate.model": "torchvision:resnet18", "surrogate.pretrained": ckpt, "uc.cluster_on": "caption"})
    assert generate(captions) == 2 and "uc.cluster_on" in capsys.readouterr().err  # no text tower
    assert not os.path.exists(tmp_path / "captions" / "run.json")  # refused before anything was written
    with pytest.raises(ConfigError, match="uc.clusters"):
        load_config(RunConfig, None, uc_overrides(f"{demo_dir}/train/00000.tar", out, **{"uc.clusters": 1}))


def test_clusters_from_the_captions(demo_dir, tmp_path):
    """uc.cluster_on=caption: k-means on the CLIP surrogate's text embedding of the captions
    (each sample goes to the centroid nearest its caption's embedding), and each cluster's
    target is the mean image feature of its sampled members (state/uc/targets.npy); merge and
    verify as usual."""
    out = str(tmp_path / "run")
    args = uc_overrides(f"{demo_dir}/train/{SHARDS}", out, **{"uc.cluster_on": "caption", "uc.epochs": 1})
    assert generate(args) == 0 and merge.main([out]) == 0
    cfg = load_config(RunConfig, None, args)
    net = features.FeatureNet(cfg, torch.device("cpu"))
    centroids, targets = (np.load(f"{out}/state/uc/{f}.npy") for f in ("centroids", "targets"))
    members: dict[int, list[np.ndarray]] = {}
    for name in ("00000", "00001", "00002"):
        keys, clusters, _, _ = store.read_assignments(out, name)
        src = load_shard(f"{demo_dir}/train/{name}.tar", cfg.data)
        assert keys == src.keys
        text = net.captions(src.captions).numpy()
        assert centroids.shape[1] == text.shape[1]
        assert np.array_equal(clusters, ((text[:, None] - centroids[None]) ** 2).sum(-1).argmin(1))
        rows = store.share(name, len(src), store.quota(90, 3), cfg.seed, "kmeans")  # the k-means sample
        for c, f in zip(clusters[rows], features.embed(net, src.canvases[rows], torch.device("cpu")).numpy()):
            members.setdefault(int(c), []).append(f)
    assert sorted(members) == [0, 1, 2]
    assert targets.shape == (3, net(torch.zeros(1, 3, 32, 32)).shape[1])
    for c, feats in members.items():
        assert np.allclose(targets[c], np.mean(feats, 0), atol=1e-5)
    assert verify.verify(out)["mismatches"] == 0


def test_merge_waits_for_the_perturbations(run, tmp_path, capsys):
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("protected", "manifest"))
    os.remove(f"{copy}/state/uc/perturbations.npy")
    assert merge.main([copy]) == 2 and "finish generate first" in capsys.readouterr().err
    assert state.completed(copy, 1) == {"00000", "00001", "00002"}


def test_perturbations_that_round_to_zero_are_reported(demo_dir, tmp_path, capsys):
    """Direct perturbations that never leave +-0.5/255 publish the source images: a warning says so."""
    out = str(tmp_path / "run")
    assert generate(uc_overrides(f"{demo_dir}/train/{SHARDS}", out, **{"experimental.uc.perturbation": "direct", "experimental.uc.lr": 1e-6,
                                                                      "uc.epochs": 1})) == 0
    assert not store.read_perturbations(out).any()
    assert "round to 0" in capsys.readouterr().err


def test_a_grid_gives_smooth_perturbations(demo_dir, tmp_path, capsys):
    """experimental.uc.grid=8: each stored perturbation is, up to rounding, an 8x8 grid upsampled bilinearly
    to the 32 px canvas: the least-squares fit in that 64-dimensional space leaves an RMS residual
    of at most the rounding's 0.5 (the true grid leaves at most 0.5 at every pixel; per-pixel
    noise of +-16 would leave about 9); a grid the generator cannot make is one line."""
    out = str(tmp_path / "run")
    assert generate(uc_overrides(f"{demo_dir}/train/00000.tar", out, **{"experimental.uc.grid": 8, "uc.epochs": 1})) == 0
    pert = store.read_perturbations(out).astype(np.float64)  # [p, H, W, C]
    assert pert.shape == (3, 32, 32, 3) and np.abs(pert).max() > 0
    up = torch.nn.functional.interpolate(torch.eye(8, dtype=torch.float64)[None], size=32, mode="linear",
                                         align_corners=False)[0].t().numpy()  # [32, 8]: one grid column -> the canvas
    fit = np.linalg.pinv(up)
    grid = np.einsum("gh,phwc,vw->pgvc", fit, pert, fit)
    assert np.sqrt(((np.einsum("hg,pgvc,wv->phwc", up, grid, up) - pert) ** 2).mean()) <= 0.5
    assert generate(uc_overrides(f"{demo_dir}/train/00000.tar", str(tmp_path / "bad"), **{"experimental.uc.grid": 4})) == 2
    assert "config key 'experimental.uc.grid'" in capsys.readouterr().err
