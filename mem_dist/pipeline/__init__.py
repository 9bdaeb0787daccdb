"""The generation pipeline: config -> source shards -> rounds on every rank -> per-shard state.

config / config_io (the typed run config), storage (fsspec), data + canvas (source shards),
state + rundir (what a run keeps), distributed (Accelerate), surrogate + towers (the CLIP
surrogate), text (captions and triggers), engine (the rounds) and generate (the entry point).
"""
