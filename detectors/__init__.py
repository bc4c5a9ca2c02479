"""gapwatch detectors: pure, streaming units that turn model output into findings.

This package imports nothing from ``proxy``; see ``detectors.base`` for the protocol.
"""
