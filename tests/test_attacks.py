"""Dataset-level attacks (mem_dist.evaluation.attacks): ridge removal of the caption-predictable
part of the images, recaptioning with class-name templates, their config checks and their
place in load_condition. No victim is trained."""

import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mem_dist.evaluation import attacks
from mem_dist.evaluation.attacks import RECAPTION_TEMPLATES, embed_captions, recaption, ridge_removal
from mem_dist.evaluation.eval_config import EvalConfig
from mem_dist.evaluation.evaluate import describe_settings
from mem_dist.evaluation.pairs import load_condition
from mem_dist.pipeline.config_io import ConfigError, load_config
from mem_dist.tools.importers import CAPTION_TEMPLATES
from tests.conftest import ROOT

TINY_RN32 = os.path.join(ROOT, "configs", "models", "tiny-rn32.json")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# --------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------


def _code_correlation(images_NHWC: np.ndarray, code_NHWC: np.ndarray) -> float:
    """Pearson correlation, over every sample and pixel, of the code with the centred images."""
    x = (images_NHWC.astype(np.float64) - images_NHWC.mean(0)).ravel()
    return float(np.corrcoef(x, code_NHWC.astype(np.float64).ravel())[0, 1])


@pytest.fixture(scope="module")
def coded():
    """800 images of 8x8: caption-independent content, plus a +-10 code per caption (8 captions,
    each a fixed random sign pattern), and the attacker's (random-init tiny RN) embeddings."""
    rng = np.random.default_rng(0)
    captions_U = [f"a photo of a {c.lower()} seen from the front" for c in CLASSES[:8]]
    which_N = rng.integers(0, len(captions_U), 800)
    captions = [captions_U[u] for u in which_N]
    content = np.clip(rng.normal(128, 25, (800, 8, 8, 3)), 0, 255)
    code_UHWC = 10.0 * rng.choice([-1.0, 1.0], (len(captions_U), 8, 8, 3))
    code = code_UHWC[which_N]
    images = np.clip(content + code, 0, 255).round().astype(np.uint8)
    features = embed_captions(captions, TINY_RN32, None, "cpu", seed=0)
    return {"content": content.round().astype(np.uint8), "code": code, "images": images, "features": features}


def test_embeddings_are_unit_float32_and_repeat(coded):
    f = coded["features"]
    assert f.dtype == np.float32 and f.shape[0] == 800
    assert np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5)
    again = embed_captions(["a photo of a trouser seen from the front"], TINY_RN32, None, "cpu", seed=0)
    assert np.allclose(again[0], f[np.flatnonzero(f @ again[0] > 0.99999)[0]], atol=1e-5)


def test_ridge_removes_a_caption_keyed_code(coded):
    before = _code_correlation(coded["images"], coded["code"])
    cleaned, explained, _ = ridge_removal(coded["images"], coded["features"], alpha=1.0)
    after = _code_correlation(cleaned, coded["code"])
    assert cleaned.dtype == np.uint8 and cleaned.shape == coded["images"].shape
    assert before > 0.3 and abs(after) < 0.1 * before, (before, after)
    assert 0.1 < explained < 0.3  # the code's share of the variance (100 / (100 + ~600)), no more
    # what is left is the content: the images moved toward it
    err = lambda imgs: np.abs(imgs.astype(float) - coded["content"]).mean()  # noqa: E731
    assert err(cleaned) < 0.5 * err(coded["images"])
    # and the dataset's mean image stays
    assert np.abs(cleaned.astype(float).mean(0) - coded["images"].astype(float).mean(0)).max() < 1.0


def test_ridge_highpass_removes_a_fine_grained_code(coded):
    before = _code_correlation(coded["images"], coded["code"])
    cleaned, explained, of_pixels = ridge_removal(coded["images"], coded["features"], alpha=1.0, blur=2)
    after = _code_correlation(cleaned, coded["code"])
    assert abs(after) < 0.25 * before, (before, after)
    assert 0 < of_pixels < explained  # the high pass holds less variance than the whole image


def test_ridge_leaves_caption_independent_images_nearly_unchanged(coded):
    content = coded["content"]
    cleaned, explained, _ = ridge_removal(content, coded["features"], alpha=1.0)
    spread = np.abs(content.astype(float) - content.mean(0)).mean()
    change = np.abs(cleaned.astype(float) - content).mean()
    assert explained < 0.02 and change < 0.1 * spread, (explained, change, spread)


def test_ridge_with_one_caption_changes_nothing():
    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    cleaned, explained, _ = ridge_removal(images, np.ones((5, 16), np.float32) / 4, alpha=1.0)
    assert np.array_equal(cleaned, images) and explained == 0


# --------------------------------------------------------------------------------------
# Recaptioning
# --------------------------------------------------------------------------------------


def test_recaption_templates_are_new_paraphrases():
    assert len(set(RECAPTION_TEMPLATES)) == 10 and all("{c}" in t for t in RECAPTION_TEMPLATES)
    assert not set(RECAPTION_TEMPLATES) & set(CAPTION_TEMPLATES)
    assert not set(RECAPTION_TEMPLATES) & set(EvalConfig.__dataclass_fields__["zero_shot_templates"].default)


def test_recaption_changes_every_caption_and_keeps_the_class():
    from mem_dist.tools.importers import fill_template

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    classes = dict(enumerate(CLASSES))
    captions = ["zqx " + fill_template(CAPTION_TEMPLATES[rng.integers(10)], classes[int(k)]) for k in labels]
    new = recaption(captions, labels, classes, seed=3, name="keyed")
    assert len(new) == len(captions) and all(a != b for a, b in zip(new, captions))
    assert all(classes[int(k)] in c for k, c in zip(labels, new))
    made_by_importer = {fill_template(t, name) for t in CAPTION_TEMPLATES for name in CLASSES}
    assert not set(new) & made_by_importer
    assert len({c.replace(classes[int(k)], "{c}").replace("an {c}", "a {c}") for k, c in zip(labels, new)}) == 10
    assert new == recaption(captions, labels, classes, seed=3, name="keyed")  # seeded
    assert new != recaption(captions, labels, classes, seed=4, name="keyed")


def test_recaption_without_a_class_names_the_condition():
    with pytest.raises(ConfigError, match=r"'conditions\.keyed'.*json 'class'"):
        recaption(["a", "b"], np.array([0, -1]), {0: "Bag"}, seed=0, name="keyed")
    with pytest.raises(ConfigError, match=r"'conditions\.plain'"):
        recaption(["a", "b"], None, {}, seed=0, name="plain")


# --------------------------------------------------------------------------------------
# Config and load_condition
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("defence.removal=lasso", "removal"), ("defence.recaption=llm", "recaption"),
    ("defence.removal_alpha=0", "defence.removal_alpha"), ("defence.removal_alpha=-1", "defence.removal_alpha"),
    ("defence.removal_blur=0", "defence.removal_blur"),
])
def test_bad_attack_values_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(EvalConfig, None, ["conditions.c=x.tar", "val_shards=x.tar", override])


def test_missing_attacker_encoder_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="defence.removal_model.*not found"):
        load_config(EvalConfig, None, ["conditions.c=x.tar", "val_shards=x.tar", "defence.removal=ridge", f"defence.removal_model={tmp_path}/none.json"])
    with pytest.raises(ConfigError, match="defence.removal_pretrained.*not found"):
        load_config(EvalConfig, None, ["conditions.c=x.tar", "val_shards=x.tar", "defence.removal=ridge", f"defence.removal_pretrained={tmp_path}/none.pt"])
    with pytest.raises(ConfigError, match="'defence.removal_model'.*unknown open_clip model"):
        embed_captions(["a"], "no-such-model", None)


def _write_shard(path, n: int, with_class: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as tw:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            label = i % 3
            meta = {"label": label, **({"class": CLASSES[label]} if with_class else {})}
            tw.write({"__key__": f"{i:05d}", "png": buf.getvalue(), "txt": f"zqx a photo of a {CLASSES[label]}.",
                      "json": json.dumps(meta).encode()})


def test_load_condition_applies_both_attacks_and_the_report_names_them(tmp_path):
    _write_shard(tmp_path / "train.tar", 24)
    _write_shard(tmp_path / "bare.tar", 6, with_class=False)
    cfg = load_config(EvalConfig, None, [
        f"conditions.keyed={tmp_path}/train.tar", f"conditions.bare={tmp_path}/bare.tar", f"val_shards={tmp_path}/train.tar",
        "image_size=16", "device=cpu", "defence.removal=ridge", f"defence.removal_model={TINY_RN32}",
        "defence.recaption=templates", f"output={tmp_path}/out"])
    plain = load_condition(cfg.conditions["keyed"], load_config(EvalConfig, None, [
        f"conditions.keyed={tmp_path}/train.tar", f"val_shards={tmp_path}/train.tar", "image_size=16"]))
    lines = []
    pairs = load_condition(cfg.conditions["keyed"], cfg, lines.append)
    assert pairs.keys == plain.keys and pairs.canvases.dtype == np.uint8
    assert not np.array_equal(pairs.canvases, plain.canvases)
    assert all(a != b and CLASSES[int(k)] in a for a, b, k in zip(pairs.captions, plain.captions, pairs.labels))
    assert any("'keyed': ridge removal explained" in line and "% of the training images' pixel variance" in line
               for line in lines), lines
    assert "dataset attacks: ridge removal" in describe_settings(cfg) and "class-name templates" in describe_settings(cfg)
    with pytest.raises(ConfigError, match=r"'conditions\.bare'.*json 'class'"):
        load_condition(cfg.conditions["bare"], cfg, lines.append)


def test_no_attack_returns_the_pairs_untouched(tmp_path):
    _write_shard(tmp_path / "train.tar", 4)
    cfg = load_config(EvalConfig, None, [f"conditions.c={tmp_path}/train.tar", f"val_shards={tmp_path}/train.tar", "image_size=16"])
    pairs = load_condition(cfg.conditions["c"], cfg)
    assert attacks.attack_pairs(pairs, cfg, "c") is pairs
