"""Caption-keyed codes: δ as a function of a caption's text embedding and a secret key.

    caption --frozen text tower, float64--> e (unit norm, E values)
            --round(e * 2^20)-------------> e_q (int64)
            --W (±1, seeded by the key; or ---> z = W @ e_q (int64, exact)    W: [g*g*3, E]
                 trained: weights, |w| <= 2^15)
            --sign------------------------> s in {-1, +1}^(g x g x 3)  (mirror: left half
                                            projected, right half its mirror image;
                                            luminance: one sign for the 3 channels)
            --nearest upsample, * epsilon-> δ (int8, the canvas's H x W x 3)

Captions with close embeddings get mostly the same code (the sign of a random projection
keeps the angle between embeddings: SimHash), so a victim whose text tower learns what the
captions say can learn the code from it: the shortcut is keyed to what a CLIP victim is
trained to predict. A code of g x g blocks is low-frequency and survives crops and flips
(docs/efficacy.md's calibration: what a victim learns first).

Exactness. Everything after the embedding is integer arithmetic, so the same e_q gives the
same bytes on any machine. The embedding is computed in float64 on one CPU thread, in batches of one
fixed shape (:func:`embed`), so a caption's embedding does not depend on the shard it is in,
its position or the thread count (tests/test_keyed.py); across machines its rounding (~1e-16
relative) can change e_q only where a value lies within 1e-16 of a rounding midpoint of
2^-20 (about 1 in 10^10 values), and that changes z by 1, which flips a sign only when
|z| <= 1 (about 1 in 10^6 of the codes' cells): verify recomputes every code and names
any sample whose published bytes differ.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

QUANTUM_BITS = 20  # e is rounded to 2^-20 before the (exact, integer) projection
CHUNK = 64  # captions per text-tower forward
_encoders: dict = {}  # (model, pretrained, seed) -> (clip, tokenizer): one text tower per process


def projection(key: bytes, cells: int, dim: int) -> np.ndarray:
    """The secret ±1 projection [cells, dim] (int64) drawn from the key."""
    seed = int.from_bytes(hashlib.sha256(b"mem-dist keyed projection" + key).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, 2, size=(cells, dim), dtype=np.int64) * 2 - 1


def text_encoder(job):
    """The surrogate's (clip, tokenizer), built once per process; without ``surrogate.pretrained``
    its random init is seeded by the run's seed (the same tower at merge and verify)."""
    from mem_dist.pipeline.config import seed_of
    from mem_dist.pipeline.surrogate import create_surrogate

    k = (job.surrogate.model, job.surrogate.pretrained, job.seed)
    if k not in _encoders:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(job.seed, "keyed text tower"))
            clip, tokenizer, _ = create_surrogate(*k[:2], device="cpu")
        _encoders[k] = (clip, tokenizer)
    return _encoders[k]


@torch.no_grad()
def embed(clip, tokenizer, captions: list[str]) -> np.ndarray:
    """Unit-norm text embeddings [N, E] (float64) of captions by ``clip``'s text tower.

    Each caption's embedding depends on that caption alone: open_clip's own (full-context)
    text forward in float64 on the CPU, on one thread, in batches of exactly :data:`CHUNK`
    (the last one padded with empty captions), so every matrix product has the same shape
    and the same reduction order whatever the shard, its order or the machine's thread count.
    """
    if getattr(clip, "_length_aware", False):
        del clip.encode_text  # mem-dist's length-aware shortcut: exact only up to rounding
        clip._length_aware = False
    model = clip.double().cpu().eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for s in range(0, len(captions), CHUNK):
            batch = list(captions[s:s + CHUNK])
            e = model.encode_text(tokenizer(batch + [""] * (CHUNK - len(batch))))[:len(batch)]
            out.append(torch.nn.functional.normalize(e.double(), dim=-1).numpy())
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float64)


def quantize(e_NE: np.ndarray) -> np.ndarray:
    """e rounded to 2^-QUANTUM_BITS, as int64."""
    return np.round(e_NE * (1 << QUANTUM_BITS)).astype(np.int64)


def signs(key: bytes, e_q_NE: np.ndarray, grid: int, mirror: bool = False, luminance: bool = False,
          weights: np.ndarray | None = None) -> np.ndarray:
    """The code [N, g, g, 3] in {-1, +1} (int8): sign of the key's projection of e_q (0 -> +1),
    or of ``weights`` [g*g*3, E] (int64, the trained generator's: :mod:`.train`) in its place.
    ``mirror``: only the left ceil(g/2) columns are projected and the right ones mirror them,
    so the code is the same after a horizontal flip (a classifier's usual augmentation).
    ``luminance``: one sign per cell for all three channels, so a grayscale copy keeps it."""
    half = (grid + 1) // 2 if mirror else grid
    channels = 1 if luminance else 3
    w = projection(key, grid * half * channels, e_q_NE.shape[1]) if weights is None else weights
    z = e_q_NE @ w.T  # int64: |z| <= E * 2^20 * max|w| (< 2^46 for E <= 1024, |w| <= 2^15), exact
    code = np.where(z >= 0, 1, -1).astype(np.int8).reshape(-1, grid, half, channels)
    if luminance:
        code = np.repeat(code, 3, axis=3)
    if mirror:
        code = code[:, :, np.minimum(np.arange(grid), grid - 1 - np.arange(grid))]
    return code


def upsample(code_NggC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest upsampling of a g x g code to H x W (block edges at floor(i * g / H))."""
    g = code_NggC.shape[1]
    rows = (np.arange(height) * g) // height
    cols = (np.arange(width) * g) // width
    return code_NggC[:, rows][:, :, cols]


def delta(key: bytes, e_q_NE: np.ndarray, grid: int, epsilon: int, height: int, width: int,
          mirror: bool = False, luminance: bool = False, weights: np.ndarray | None = None) -> np.ndarray:
    """δ [N, H, W, 3] (int8, units of 1/255): ±epsilon on the code's blocks; ``mirror``: pixel
    column W-1-c is column c (exact also where g does not divide W)."""
    d = upsample(signs(key, e_q_NE, grid, mirror, luminance, weights), height, width)
    if mirror:
        d = d[:, :, np.minimum(np.arange(width), width - 1 - np.arange(width))]
    return (d * epsilon).astype(np.int8)


def apply(canvases_NHWC: np.ndarray, delta_NHWC: np.ndarray) -> np.ndarray:
    """The stored δ: canvas + δ clipped to [0, 255], minus the canvas (int8)."""
    return ((canvases_NHWC.astype(np.int16) + delta_NHWC).clip(0, 255) - canvases_NHWC).astype(np.int8)
