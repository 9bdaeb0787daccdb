"""Tools around the pipeline: benchmarks (bench, bench_generate, bench_scale), demo data,
importers of labelled photos, and the one shard writer they share (shards)."""
