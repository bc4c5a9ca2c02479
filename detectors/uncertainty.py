"""Token-logprob uncertainty: how sure was the model of what it wrote?

When the upstream returns token log-probabilities (the client asked for ``logprobs``, or the
policy makes the proxy ask and strip them), the pipeline passes them to
``ChannelState.feed_logprobs(items)`` as ``(token, logprob)`` pairs, in order and for text
already fed. Per response the detector keeps the mean and minimum token logprob and the share
of tokens below ``low_logprob``; it reports

- ``low_confidence_run`` (span): ``min_run_tokens`` or more consecutive low-probability tokens,
  the place where a model is most likely guessing a name or a number;
- ``low_confidence`` (response level, from ``finish_response``): more than ``max_low_share`` of
  at least ``min_tokens`` tokens were low-probability.

Spans come from accumulating token lengths: tokens concatenate to the channel text, so the
offset of a token is the total length of the tokens before it. The pipeline must therefore
pass each token's *decoded text* (for a token that is only part of a UTF-8 character, pass ""
and give the whole character to the token that completes it). ``response_stats(prepared)``
exposes the statistics for metrics even when nothing fired. Without logprobs the detector is
silent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from detectors.base import (
    Channel,
    ChannelState,
    Detector,
    DetectorConfig,
    Finding,
    RequestContext,
    Severity,
    StreamEnd,
)
from detectors.redaction import mask

NAME = "uncertainty"
_FLOOR = -100.0  # -inf and absurd values are clamped here so means stay finite
_RUN_TEXT_CHARS = 200  # evidence text kept per run (masked anyway)


class UncertaintyConfig(DetectorConfig):
    """Settings of the ``uncertainty`` detector (YAML key ``uncertainty``)."""

    detector_class: ClassVar[type[Detector]]

    low_logprob: float = -2.5  # ln p; -2.5 is p < 0.082
    min_run_tokens: int = 3
    max_low_share: float = 0.15
    min_tokens: int = 20


def response_confidence(mean_logprob: float) -> float:
    """A response's confidence from its tokens: the geometric mean of the token probabilities,
    ``exp(mean logprob)``. Why the geometric mean: the probability of the whole sequence
    shrinks with its length, so it cannot compare a short answer with a long one; the
    length-normalised form can, and it is what calibration (``gapwatch eval``) and the live
    confidence histogram both use."""
    return math.exp(max(_FLOOR, min(0.0, mean_logprob)))


@dataclass(frozen=True, slots=True)
class UncertaintyStats:
    """Per-response token statistics for metrics."""

    tokens: int
    mean_logprob: float
    min_logprob: float
    low_share: float
    low_runs: int

    @property
    def confidence(self) -> float:
        return response_confidence(self.mean_logprob)


@dataclass(slots=True)
class UncertaintyResponse:
    """Running totals for one response (``prepare`` makes one per response)."""

    tokens: int = 0
    total: float = 0.0
    minimum: float = 0.0
    low: int = 0
    runs: int = 0
    reported: bool = False


class UncertaintyDetector(Detector):
    name: ClassVar[str] = NAME
    wants_logprobs: ClassVar[bool] = True

    def __init__(self, config: UncertaintyConfig) -> None:
        super().__init__(config)
        self.cfg = config

    def prepare(self, ctx: RequestContext) -> UncertaintyResponse:
        return UncertaintyResponse()

    def open_channel(self, prepared: UncertaintyResponse, channel: Channel) -> ChannelState | None:
        if channel.kind != "text":
            return None
        return _UncertaintyChannel(self, prepared, channel)

    def response_stats(self, prepared: UncertaintyResponse) -> UncertaintyStats | None:
        """Mean/min logprob, low-token share and run count; None when no logprobs arrived."""
        if prepared.tokens == 0:
            return None
        return UncertaintyStats(
            tokens=prepared.tokens, mean_logprob=prepared.total / prepared.tokens,
            min_logprob=prepared.minimum, low_share=prepared.low / prepared.tokens, low_runs=prepared.runs,
        )

    def response_metrics(self, prepared: UncertaintyResponse) -> dict[str, float]:
        """The same as ``response_stats`` as a flat dict (empty without logprobs)."""
        s = self.response_stats(prepared)
        if s is None:
            return {}
        return {"tokens": s.tokens, "mean_logprob": s.mean_logprob, "min_logprob": s.min_logprob,
                "low_share": s.low_share, "low_runs": s.low_runs}

    def finish_response(self, prepared: UncertaintyResponse) -> list[Finding]:
        if prepared.reported:
            return []
        prepared.reported = True
        s = self.response_stats(prepared)
        if s is None or s.tokens < self.cfg.min_tokens or s.low_share <= self.cfg.max_low_share:
            return []
        return [Finding(
            detector=NAME, category="low_confidence", severity=Severity.low, score=s.low_share,
            message=f"{s.low_share:.0%} of {s.tokens} tokens had logprob < {self.cfg.low_logprob} "
                    f"(mean {s.mean_logprob:.2f}, min {s.min_logprob:.2f})",
            attrs={"tokens": s.tokens, "low_share": round(s.low_share, 4),
                   "mean_logprob": round(s.mean_logprob, 4), "min_logprob": round(s.min_logprob, 4)},
        )]


class _UncertaintyChannel(ChannelState):
    __slots__ = ("_channel", "_det", "_done", "_offset", "_prepared", "_run_end", "_run_n", "_run_start",
                 "_run_sum", "_run_text")

    def __init__(self, det: UncertaintyDetector, prepared: UncertaintyResponse, channel: Channel) -> None:
        self._det = det
        self._prepared = prepared
        self._channel = channel
        self._offset = 0  # absolute offset of the next token
        self._run_n = 0
        self._run_start = 0
        self._run_end = 0
        self._run_sum = 0.0
        self._run_text: list[str] = []
        self._done = False

    def feed(self, text: str) -> list[Finding]:
        return []

    def feed_logprobs(self, items: Sequence[tuple[str, float]]) -> list[Finding]:
        if self._done:
            return []
        cfg = self._det.cfg
        p = self._prepared
        out: list[Finding] = []
        for token, logprob in items:
            lp = float(logprob)
            if math.isnan(lp):
                self._offset += len(token)
                continue
            lp = max(_FLOOR, min(0.0, lp))
            p.minimum = lp if p.tokens == 0 else min(p.minimum, lp)
            p.tokens += 1
            p.total += lp
            if lp < cfg.low_logprob:
                p.low += 1
                if self._run_n == 0:
                    self._run_start = self._offset + (len(token) - len(token.lstrip()))
                    self._run_end = self._run_start
                    self._run_sum = 0.0
                    self._run_text = []
                self._run_n += 1
                self._run_sum += lp
                if token.strip():
                    self._run_end = self._offset + len(token.rstrip())
                if sum(map(len, self._run_text)) < _RUN_TEXT_CHARS:
                    self._run_text.append(token)
            elif token.strip():
                out += self._close_run()
            self._offset += len(token)
        return out

    def _close_run(self) -> list[Finding]:
        n = self._run_n
        self._run_n = 0
        if n < self._det.cfg.min_run_tokens or self._run_end <= self._run_start:
            return []
        self._prepared.runs += 1
        mean = self._run_sum / n
        return [Finding(
            detector=NAME, category="low_confidence_run", severity=Severity.low,
            score=min(1.0, -mean / 10.0),
            message=f"{n} consecutive tokens with logprob < {self._det.cfg.low_logprob} (mean {mean:.2f})",
            span=(self._run_start, self._run_end), channel=self._channel,
            evidence=mask("".join(self._run_text)), attrs={"tokens": n, "mean_logprob": round(mean, 4)},
        )]

    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._done:
            return []
        self._done = True
        return self._close_run()


UncertaintyConfig.detector_class = UncertaintyDetector

CONFIGS: dict[str, type[DetectorConfig]] = {NAME: UncertaintyConfig}
