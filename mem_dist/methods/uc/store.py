"""UC's state on storage: each shard's cluster assignment (``state/round-001/{shard}.parquet``:
key, cluster, distance), and under ``state/uc/`` the centroids, targets and perturbations
(written last: the run's completion marker); the per-sample state merge and verify apply,
composed from them; the seeded per-shard shares of samples. No torch here: merge reads this."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mem_dist.pipeline import state, storage
from mem_dist.pipeline.config import seed_of
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.pipeline.data import Shard

ASSIGN_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("distance", pa.float32())])



def uc_dir(output: str) -> str:
    return storage.join(output, "state", "uc")



def perturbations_url(output: str) -> str:
    return storage.join(uc_dir(output), "perturbations.npy")



def write_assignments(output: str, name: str, keys: list[str], clusters: np.ndarray, distances: np.ndarray,
                      skipped: dict[str, int]) -> None:
    table = pa.table({"key": pa.array(keys, pa.string()), "cluster": pa.array(clusters.astype(np.int32), pa.int32()),
                      "distance": pa.array(distances.astype(np.float32), pa.float32())}, schema=ASSIGN_SCHEMA)
    table = table.replace_schema_metadata({"mem_dist.skipped": json.dumps(skipped, sort_keys=True)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(state.state_url(output, 1, name), buf.getvalue())



def read_assignments(output: str, name: str) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """(keys, clusters int [N], distances [N], skip counts) of a shard."""
    with storage.open_file(state.state_url(output, 1, name), "rb") as f:
        table = pq.read_table(f)
    skipped = json.loads((table.schema.metadata or {}).get(b"mem_dist.skipped", b"{}"))
    return (table.column("key").to_pylist(), table.column("cluster").to_numpy().astype(np.int64),
            table.column("distance").to_numpy(), skipped)



def shard_state(output: str, shard: Shard, perturbations_pHWC: np.ndarray) -> state.ShardState:
    """A UC shard's state as merge and verify read MEM's, for the keys that were assigned:
    delta = clip(canvas + the perturbation of its cluster, 0, 255) - canvas; no trigger."""
    keys, clusters, distances, skipped = read_assignments(output, shard.name)
    row = {k: i for i, k in enumerate(shard.keys)}
    if any(k not in row for k in keys):
        raise RuntimeError(f"the cluster assignment of shard {shard.name} names keys the source shard lacks; "
                           f"was the source changed during the run?")
    canvas = shard.canvases[[row[k] for k in keys]].astype(np.int16) if keys else np.zeros((0,) + shard.canvases.shape[1:], np.int16)
    delta = (np.clip(canvas + perturbations_pHWC[clusters], 0, 255) - canvas).astype(np.int8)
    n = len(keys)
    return state.ShardState(keys, delta, np.zeros((n, 0), np.int64), [""] * n, distances.astype(np.float32),
                            np.full(n, np.nan, np.float32), skipped)



def read_perturbations(output: str) -> np.ndarray:
    url = perturbations_url(output)
    if not storage.exists(url):
        raise ConfigError(f"no UC perturbations under {uc_dir(output)}; finish generate first")
    return read_npy(url)



def write_npy(url: str, array: np.ndarray) -> None:
    """One .npy object, written atomically."""
    buf = io.BytesIO()
    np.save(buf, array)
    storage.write_bytes_atomic(url, buf.getvalue())



def read_npy(url: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(url)))



def share(name: str, n: int, quota: int, seed: int, purpose: str) -> np.ndarray:
    """A shard's seeded subset of ``quota`` rows (sorted): the same on any rank and any world size."""
    rng = np.random.default_rng(seed_of(seed, "uc", purpose, name))
    return np.sort(rng.permutation(n)[:quota])



def quota(total: int, n_shards: int) -> int:
    return max(1, -(-total // n_shards))

