"""The registry: `--method NAME` → the class in its own file here. A new method is one file and one line."""
from __future__ import annotations

import importlib

from continual.methods.base import Method

DEFAULT_METHOD = "teracon"            # --method when none is given
METHODS: dict[str, str] = {            # name → "module:Class", imported when asked for
    "teracon": "continual.methods.teracon:Teracon",
    "finetune": "continual.methods.finetune:FineTune",
    "lwf": "continual.methods.lwf:LwF",
    "ewc": "continual.methods.ewc:EWC",
    "sinmo": "continual.methods.sinmo:SinMo",
    "fineall": "continual.methods.fineall:FineAll",
    "mtl": "continual.methods.mtl:MTL",
    "peterrec": "continual.methods.peterrec:PeterRec",
    "piggyback": "continual.methods.piggyback:Piggyback",
    "conure": "continual.methods.conure:Conure",
    "hat": "continual.methods.hat:HAT",
    "ditto": "continual.methods.ditto:Ditto",
}


def method_class(name: str) -> type[Method]:
    """The class registered as `name` (a KeyError names the known ones)."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    module, attribute = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attribute)
