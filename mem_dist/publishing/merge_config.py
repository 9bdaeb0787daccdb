"""What merge publishes from: the run's config (run.json, with merge.* from the command line)
and the state round to publish (the final one, or with ``merge.allow_unfinished`` the newest
complete one).

A run is *finished* when run.json says ``rounds_done >= rounds`` (a run without those fields,
or without run.json: when the state of round ``rounds`` exists) and that round's state holds
every shard (UC: and its perturbations are written): the method says
(:meth:`mem_dist.methods.base.Method.source`). Merge refuses an unfinished run with one
line (exit 2): a merge started while generate runs, or after it was killed between rounds,
would otherwise publish an earlier round as if it were the final one.
"""

from __future__ import annotations

import dataclasses

from mem_dist.methods import get_method
from mem_dist.methods.base import Source
from mem_dist.pipeline import storage
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import ConfigError, build, load_config, parse_overrides, read_yaml, to_dict

MERGE_KEYS = ("merge.", "progress")


def recorded_config(output: str) -> RunConfig | None:
    """The config generate recorded in ``{output}/run.json`` (with ``output`` set to where the
    run folder is now), or None if there is none."""
    url = storage.join(output, "run.json")
    if not storage.exists(url):
        return None
    return dataclasses.replace(build(RunConfig, storage.read_json(url)["config"], ""), output=output)


def resolve_config(output: str | None, config: str | None, overrides: list[str], log=print) -> RunConfig:
    """The config to merge with: the run's own (run.json) with ``merge.*`` and ``progress`` from
    ``overrides`` (and, with ``config``, from that file).

    Args:
        output: the run folder (``mem-dist merge OUTPUT``), or None with ``config``.
        config: a YAML config whose ``output`` names the run folder, or None.
        overrides: ``key=value``; with ``output`` only merge.* / progress; with ``config`` other
            keys must agree with the run's.

    Raises:
        ConfigError: neither or both of output and config, a generation key that differs
            from the run's, or no run.json with ``output``.
    """
    pairs = parse_overrides(overrides)
    if output is not None and config is not None:
        raise ConfigError("give the run folder (mem-dist merge OUTPUT [merge.key=value ...]) or --config C, not both")
    if output is None and config is None and not any(k == "output" for k, _ in pairs):
        raise ConfigError("which run? give its folder: mem-dist merge OUTPUT [merge.key=value ...] (or --config C)")
    if output is not None:
        other = [k for k, _ in pairs if not k.startswith(MERGE_KEYS)]
        if other:
            raise ConfigError(f"config key '{other[0]}': with a run folder only merge.* and progress may be given "
                              f"(the rest is the run's, from {storage.join(output, 'run.json')})")
        run = recorded_config(output)
        if run is None:
            raise ConfigError(f"{storage.join(output, 'run.json')} not found: is {output} a mem-dist run folder? (or use --config)")
        return load_config(RunConfig, None, overrides, base=to_dict(run))
    # The run is named by the output override or the file's output key; its run.json supplies
    # every key the file does not give (data.shards, say), so a merge-only config is enough.
    target = dict(pairs).get("output") or (read_yaml(config).get("output") if config else None)
    run = recorded_config(target) if target else None
    given = load_config(RunConfig, config, overrides, base=to_dict(run) if run is not None else None)
    if run is None:
        return given
    mine, theirs = to_dict(given), to_dict(run)
    for key, _ in pairs:
        if key.startswith(MERGE_KEYS) or key == "output":
            continue
        if _dotted(mine, key) != _dotted(theirs, key):
            raise ConfigError(f"config key '{key}' differs from the run in {given.output} ({_dotted(theirs, key)!r} in its "
                              f"run.json); merge uses the run's generation settings, only merge.* may differ")
    if given.config_hash() != run.config_hash():
        log(f"mem-dist merge: generation settings are the run's (run.json, config hash {run.config_hash()}); "
            f"{config}'s differ and are not used")
    return dataclasses.replace(run, merge=given.merge, progress=given.progress)


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def publish_source(cfg: RunConfig, urls: list[str]) -> Source:
    """The round to publish, checked by the run's method (:meth:`mem_dist.methods.base.Method.source`).

    Raises:
        ConfigError: no state; the run is unfinished and ``merge.allow_unfinished`` is off; or,
            with it on, nothing complete to publish.
    """
    method = get_method(cfg.method)
    return method.source(method.job(cfg), urls, cfg.merge.allow_unfinished)
