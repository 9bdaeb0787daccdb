"""Bad input: each bad sample or shard is skipped with a counted reason; the rest is processed."""

import os

import pytest
import webdataset as wds

from mem_dist.publishing import manifest, merge, verify
from mem_dist.pipeline import state, storage
from mem_dist.pipeline.generate import main
from tests.conftest import tiny_overrides


def write_bad_shards(demo_dir: str, out: str) -> dict[str, int]:
    """Shards with known damage; returns the number of good samples per shard."""
    os.makedirs(out)
    good = list(wds.WebDataset(f"{demo_dir}/train/00000.tar", shardshuffle=False))[:12]
    with wds.TarWriter(f"{out}/00000.tar") as tw:  # 8 good samples and 4 bad ones
        for i, s in enumerate(good):
            s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            if i == 3:
                s["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
            if i == 5:
                del s["txt"]
            if i == 7:
                s["txt"] = b"   "
            if i == 9:
                del s["jpg"]
            tw.write(s)
            if i == 10:  # sample 2's key again, with sample 0's content: counted, the first kept
                tw.write({"__key__": good[2]["__key__"], "jpg": good[0]["jpg"], "txt": good[0]["txt"]})
    data = open(f"{demo_dir}/train/00001.tar", "rb").read()
    with open(f"{out}/00001.tar", "wb") as f:  # cut in the middle of a member
        f.write(data[: len(data) // 2 + 100])
    with wds.TarWriter(f"{out}/00002.tar"):  # a valid tar with no samples
        pass
    open(f"{out}/00003.tar", "wb").close()  # zero bytes
    # 00004.tar is missing
    return {"00000": 8, "00002": 0, "00003": 0, "00004": 0}  # and one duplicate key in 00000


def test_bad_samples_and_shards_are_counted(demo_dir, tmp_path, capsys):
    src = str(tmp_path / "src")
    expected = write_bad_shards(demo_dir, src)
    out = str(tmp_path / "run")
    args = tiny_overrides(f"{src}/{{00000..00004}}.tar", out,
                          **{"data.on_missing": "skip", "mem.rounds": 1, "data.empty_captions": "drop"})
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "not a valid tar" in printed or "truncated" in printed
    rows = {name: state.read_state(state.state_url(out, 1, name)) for name in ["00000", "00001", "00002", "00003", "00004"]}
    for name, n in expected.items():
        assert len(rows[name].keys) == n, name
    assert 0 < len(rows["00001"].keys) < 40  # the samples before the break are kept
    assert rows["00000"].skipped == {"decode_error": 1, "no_caption": 2, "no_image": 1, "duplicate_key": 1}
    assert rows["00001"].skipped == {"truncated_tar": 1}
    assert rows["00002"].skipped == {"empty_shard": 1}
    assert rows["00003"].skipped == {"empty_shard": 1}
    assert rows["00004"].skipped == {"missing_shard": 1}
    run = storage.read_json(os.path.join(out, "run.json"))
    assert run["skipped"] == {"decode_error": 1, "no_caption": 2, "no_image": 1, "duplicate_key": 1, "truncated_tar": 1,
                              "empty_shard": 2, "missing_shard": 1}


@pytest.mark.parametrize("policy", ["protect", "copy"])
def test_empty_captions_are_protected_or_copied_by_choice(demo_dir, tmp_path, policy):
    """img2dataset counts a download with an empty caption as a success: by default it is
    protected (the trigger alone as its caption, delta bound to it); with copy it is published
    unprotected; either way every sample is published and verify is exact."""
    src = str(tmp_path / "src")
    write_bad_shards(demo_dir, src)
    out = str(tmp_path / "run")
    args = tiny_overrides(f"{src}/00000.tar", out, **{"mem.rounds": 1, "data.empty_captions": policy})
    assert main(args) == 0
    assert merge.main([out]) == 0
    record = manifest.read_manifest(out, "00000")
    samples = {s["__key__"]: s["txt"].decode() for s in wds.WebDataset(f"{out}/protected/00000.tar", shardshuffle=False)}
    assert len(samples) == 10 and sum(r["outcome"] == "dropped" for r in record.values()) == 2  # no image, bad jpeg
    if policy == "protect":
        alone = [k for k, r in record.items() if r["outcome"] == "protected" and r["caption"] == r["trigger_text"]]
        assert len(alone) == 2 and all(samples[k] == record[k]["trigger_text"] != "" for k in alone)
        assert manifest.read_stats(out, "00000")["copied_unprotected"] == 0
    else:
        copied = [k for k, r in record.items() if r["outcome"] == "copied"]
        assert len(copied) == 2 and all(record[k]["reason"] == "empty_caption" and samples[k] == "" for k in copied)
        assert state.read_state(state.state_url(out, 1, "00000")).skipped["empty_caption"] == 2
    assert verify.verify(out)["mismatches"] == 0


def test_every_image_mode_becomes_the_rgb_that_is_shown():
    """Transparent pixels become white (as img2dataset composites them), not the colour
    stored under them; greyscale, palette and CMYK images convert as PIL shows them."""
    import numpy as np
    from PIL import Image

    from mem_dist.pipeline.data import to_canvas

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (200, 10, 10, 255)  # left half opaque red, right half transparent black
    rgba[:, 4:, 3] = 0
    canvas = to_canvas(Image.fromarray(rgba, "RGBA"), 8, "no")
    assert (canvas[:, :4] == (200, 10, 10)).all() and (canvas[:, 4:] == 255).all()
    half = rgba.copy()
    half[:, 4:] = (0, 0, 0, 128)  # half-transparent black over white: mid grey
    assert abs(int(to_canvas(Image.fromarray(half, "RGBA"), 8, "no")[0, 6, 0]) - 127) <= 1
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert (to_canvas(la, 8, "no")[:, 4:] == 255).all()
    pal = Image.fromarray(rgba, "RGBA").convert("P")
    pal.info["transparency"] = pal.getpixel((6, 0))
    assert (to_canvas(pal, 8, "no")[:, 4:] == 255).all()
    sixteen = Image.fromarray(np.array([[0, 257 * 100], [65535, 65535]], np.uint16))  # 16-bit greyscale PNG
    assert sixteen.mode == "I;16" and to_canvas(sixteen, 2, "no")[..., 0].tolist() == [[0, 100], [255, 255]]
    for mode in ("L", "P", "CMYK", "I"):
        img = Image.fromarray(rgba[..., :3], "RGB").convert(mode)
        canvas = to_canvas(img, 8, "no")
        assert canvas.shape == (8, 8, 3) and canvas.dtype == np.uint8


def test_exif_orientation_is_applied_to_the_canvas():
    """A photo whose EXIF says "rotate 90 degrees" is stored upright: the protected PNG
    carries no EXIF, so the canvas must be the image as viewers show it."""
    import io

    from PIL import Image

    from mem_dist.pipeline.data import to_canvas

    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue, right half red
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: blue on top
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    canvas = to_canvas(Image.open(io.BytesIO(buf.getvalue())), 30, "border")
    assert canvas[0, 15].tolist() == [0, 0, 255] and canvas[29, 15].tolist() == [255, 0, 0]
