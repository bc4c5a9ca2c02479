"""Shared state behind one small interface: canary and cross-tenant fingerprint registries.

Per-process memory is the default. Detectors read these synchronously through the objects put
in ``RequestContext.shared`` (prepared before the response starts); writes happen in the
request path before the upstream call and are in-memory (a Redis backend replicates them
off the critical path).
"""

from __future__ import annotations

from detectors.canary import MemoryCanaryRegistry
from detectors.cross_tenant import MemoryFingerprintIndex
from proxy.config import Config


class SharedState:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.canaries = MemoryCanaryRegistry()
        self.fingerprints = MemoryFingerprintIndex()
