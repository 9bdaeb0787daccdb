"""The protection methods, by the name the config's ``method`` key gives: one line each.

A method is one object implementing :class:`mem_dist.methods.base.Method`; the pipeline
(generate, merge, verify) looks it up here and never names one. Entries are "module:attribute",
imported when first asked for, so reading a config stays free of torch.
"""

from __future__ import annotations

import importlib

METHODS = {
    "mem": "mem_dist.methods.mem.method:Mem",
    "random": "mem_dist.methods.controls:RandomNoise",
    "prefix": "mem_dist.methods.controls:Prefix",
    "uc": "mem_dist.methods.uc.method:UC",
    "keyed": "mem_dist.methods.keyed.method:Keyed",
}

_made: dict = {}


def get_method(name: str):
    """The registered method ``name`` (a :class:`mem_dist.methods.base.Method`); KeyError if none."""
    if name not in _made:
        module, attr = METHODS[name].split(":")
        _made[name] = getattr(importlib.import_module(module), attr)()
    return _made[name]
