"""The one registry: YAML key == ``Finding.detector`` == metric label == span attribute.

Each family module exposes ``CONFIGS`` (name -> config class). Unknown names fail at start-up
with the list of valid ones.
"""

from __future__ import annotations

import importlib
from functools import cache

from detectors.base import DetectorConfig

FAMILY_MODULES = (
    "detectors.custom",
    "detectors.prompt_leak",
    "detectors.canary",
    "detectors.cross_tenant",
    "detectors.grounding",
    "detectors.uncertainty",
    "detectors.transparency",
    "detectors.schema",
    "detectors.injection",
    "detectors.pii",
    "detectors.secrets",
)


@cache
def configs() -> dict[str, type[DetectorConfig]]:
    out: dict[str, type[DetectorConfig]] = {}
    for modname in FAMILY_MODULES:
        mod = importlib.import_module(modname)
        for name, cls in mod.CONFIGS.items():
            if name in out:
                raise RuntimeError(f"detector name {name!r} registered twice ({modname})")
            out[name] = cls
    return out


def names() -> list[str]:
    return sorted(configs())
