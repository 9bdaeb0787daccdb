"""``mem-dist bench generate``: what one process of a config's generation costs here.

Measured on the config's first shard with the real engine (nothing is written), after an
untimed warm-up: ``--steps`` surrogate steps (timed together), a sample batch with HotFlip
+ PGD and a sample batch with PGD alone (each timed ``--steps`` times, the median). For
each: seconds per batch, samples/s, peak memory (GPU memory on CUDA, the process's peak
RSS on the CPU), the FLOPs of one batch (counted by torch's FlopCounterMode in a separate,
untimed run) and the FLOP/s achieved, against the device's peak: a known GPU's dense
datasheet peak for the precision used, on the CPU the rate measured here of one large fp32
matrix product (what the best-tuned kernel reaches on these cores). Then the run's time
estimated for the config's samples and for 1M and 400M samples on 1, 8 and 64 GPUs: the
surrogate phase takes the same time on any number of processes (DDP), the sample phase is
split among them. Last, the run's floor: its FLOPs at that peak, the time these matrix
products and convolutions would take at the device's best rate with nothing else costing
anything (how far the estimate is from it says how much of the time is other work).

    mem-dist bench generate --config configs/paper.yaml [--steps 3] [key=value ...]
"""

from __future__ import annotations

import dataclasses
import resource
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mem_dist.pipeline import distributed
from mem_dist.methods.mem import rounds as mem
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import ConfigError

# Dense peak FLOP/s by device name and precision (vendor datasheets, SXM parts; fp32 without TF32).
PEAKS = {"H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
         "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}}


def device_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s at ``precision``, where it comes from): a known GPU's datasheet figure, on
    the CPU the measured rate of a 2048 x 2048 fp32 matrix product (best of 5, with torch's
    threads as set); (None, "") on an unknown GPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((p[precision] for key, p in PEAKS.items() if key in name), None), "dense, datasheet"
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b  # warm-up
    best = min(_timed(device, lambda: a @ b)[0] for _ in range(5))
    return 2 * 2048 ** 3 / best, f"measured: fp32 2048x2048 matmul, {torch.get_num_threads()} threads"


def _peak_memory(device: torch.device) -> float:
    """GiB: CUDA's peak allocation since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _median_timed(device: torch.device, fn, n: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``n`` runs of ``fn()``: one run alone is at the mercy of
    a shared machine."""
    runs = [_timed(device, fn) for _ in range(max(n, 1))]
    return float(np.median([s for s, _ in runs])), max(m for _, m in runs)


def _timed(device: torch.device, fn) -> tuple[float, float]:
    """(seconds, peak GiB) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, _peak_memory(device)


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@dataclasses.dataclass
class Phase:
    label: str
    seconds: float  # per batch
    samples: int  # per batch
    peak_gib: float
    flops: float  # per batch

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds


def bench_generate(cfg: RunConfig, steps: int = 3) -> tuple[list[Phase], dict]:
    """The phases (surrogate step, HotFlip + PGD batch, PGD batch) and the run's figures:
    {"device", "device_name", "peak" (FLOP/s or None), "peak_source", "samples", "shards",
    "run_s", "surrogate_run_s", "sample_run_s", "surrogate_s" (all rounds' surrogate phases),
    "sample_s_per_sample" (all rounds' sample phases, per sample), "run_flops" (the config's
    samples, all rounds)}."""
    if cfg.method != "mem":
        raise ConfigError("config key 'method': bench generate measures MEM (the random baselines cost only their I/O)")
    dist = distributed.init(cfg.device)
    if dist.world > 1:
        raise ConfigError("bench generate runs as one process (python -m mem_dist.bench ...), not under a launcher")
    run = mem.setup(dataclasses.replace(cfg, mem=dataclasses.replace(cfg.mem, surrogate_steps=1)), dist)
    shard = run.cache.get(run.stream[0])
    if len(shard) == 0:
        raise ConfigError(f"config key 'data.shards': the first shard ({run.stream[0]}) holds no usable samples")
    rows = np.arange(min(cfg.mem.batch_size, len(shard)))
    delta, trig = mem.start_state(run, shard, 1)
    hotflip = cfg.mem.trigger_len > 0 and cfg.mem.hotflip_rounds > 0

    def sample_batch(round_: int):
        return lambda: mem.process_batch(run, round_, shard, rows, delta[rows], trig[rows], 0)

    def surrogate_steps():
        run.batches = None  # the same first batches every time
        mem.surrogate_phase(run, 1, bar=False)

    surrogate_steps()  # warm-up: kernels, allocator, autotuning
    sample_batch(cfg.mem.hotflip_rounds + 1)()
    step_flops = _flops(surrogate_steps)
    run.cfg = dataclasses.replace(run.cfg, mem=dataclasses.replace(cfg.mem, surrogate_steps=steps))
    bs = min(cfg.mem.batch_size, len(shard))
    surrogate_s, surrogate_mem = _timed(dist.device, surrogate_steps)
    n_models = len(run.ensemble)
    phases = [Phase(f"surrogate step ({n_models} model{'s' * (n_models > 1)}: forward, backward, AdamW)",
                    surrogate_s / steps, bs, surrogate_mem, step_flops)]
    hf_s = 0.0
    if hotflip:
        hf_s, hf_mem = _median_timed(dist.device, sample_batch(1), steps)
        phases.append(Phase(f"sample batch: HotFlip ({cfg.experimental.mem.hotflip_candidates} candidates) + {cfg.mem.pgd_steps} PGD steps",
                            hf_s, len(rows), hf_mem, _flops(sample_batch(1))))
    pgd_s, pgd_mem = _median_timed(dist.device, sample_batch(cfg.mem.hotflip_rounds + 1), steps)
    phases.append(Phase(f"sample batch: {cfg.mem.pgd_steps} PGD steps", pgd_s, len(rows), pgd_mem,
                        _flops(sample_batch(cfg.mem.hotflip_rounds + 1))))
    hf_rounds = min(cfg.mem.hotflip_rounds, cfg.mem.rounds) if hotflip else 0
    per_sample = (hf_rounds * hf_s + (cfg.mem.rounds - hf_rounds) * pgd_s) / len(rows)
    surrogate_run = cfg.mem.rounds * cfg.mem.surrogate_steps * surrogate_s / steps
    n = len(shard) * len(run.urls)
    hf_flops = phases[1].flops if hotflip else 0.0
    run_flops = (cfg.mem.rounds * cfg.mem.surrogate_steps * step_flops
                 + n * (hf_rounds * hf_flops + (cfg.mem.rounds - hf_rounds) * phases[-1].flops) / len(rows))
    name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu"
    precision = cfg.surrogate.precision if dist.device.type == "cuda" else "fp32"
    peak, peak_source = device_peak(dist.device, precision)
    return phases, {"device": dist.device.type, "device_name": name, "peak": peak, "peak_source": peak_source,
                    "precision": precision, "samples": n, "shards": len(run.urls), "surrogate_s": surrogate_run,
                    "sample_s_per_sample": per_sample, "surrogate_run_s": surrogate_run, "sample_run_s": n * per_sample,
                    "run_s": surrogate_run + n * per_sample, "run_flops": run_flops}


def hours(seconds: float) -> str:
    if seconds >= 48 * 3600:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def estimate(est: dict, samples: int, processes: int) -> float:
    """Seconds for ``samples`` on ``processes`` processes like this one."""
    return est["surrogate_s"] + samples * est["sample_s_per_sample"] / processes


def print_generate(cfg: RunConfig, phases: list[Phase], est: dict) -> int:
    memory = "peak GPU GiB" if est["device"] == "cuda" else "peak RSS GiB"
    peak = est["peak"]
    print(f"mem-dist bench generate: {cfg.surrogate.model}, canvas {cfg.data.image_size} px, batch {cfg.mem.batch_size}, "
          f"{est['device_name']}, {est['precision']}, one process"
          + (f"; device peak {peak / 1e12:.3g} TFLOP/s {est['precision']} ({est['peak_source']})" if peak else ""))
    print(f"{'phase':<62} {'s/batch':>8} {'samples/s':>10} {memory:>13} {'TFLOP/batch':>12} {'TFLOP/s':>8} {'of peak':>8}")
    for p in phases:
        achieved = p.flops / p.seconds
        print(f"{p.label:<62} {p.seconds:>8.3f} {p.per_second:>10.1f} {p.peak_gib:>13.2f} {p.flops / 1e12:>12.3f} "
              f"{achieved / 1e12:>8.2f} {f'{achieved / peak:.1%}' if peak else '-':>8}")
    m = cfg.mem
    print(f"estimate for the config ({est['samples']:,} samples if every one of the {est['shards']} shards holds as many as "
          f"the first; T={m.rounds}, M={m.surrogate_steps}, HotFlip in {min(m.hotflip_rounds, m.rounds) if m.trigger_len else 0} rounds): "
          f"{hours(est['run_s'])} on one process (surrogate {hours(est['surrogate_run_s'])}, samples {hours(est['sample_run_s'])})")
    print(f"{'samples':>12} " + " ".join(f"{f'{n} process' + ('es' if n > 1 else ''):>14}" for n in (1, 8, 64)))
    for samples in (1_000_000, 400_000_000):
        print(f"{samples:>12,} " + " ".join(f"{hours(estimate(est, samples, n)):>14}" for n in (1, 8, 64)))
    if peak:
        print(f"floor: the run's {est['run_flops'] / 1e12:.1f} TFLOP at the device's peak take {hours(est['run_flops'] / peak)} "
              f"({est['run_flops'] / peak / est['run_s']:.1%} of the estimate; the rest is work that is not at the peak rate)")
    return 0
