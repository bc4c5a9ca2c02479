"""The shared compliance check every detector passes (STYLE.md 13): the same findings whether
text arrives whole, one character at a time, or in random splits; concurrent responses never
interact. Detector test modules call ``assert_compliant`` with their own realistic texts."""

from __future__ import annotations

import random

from detectors.base import TEXT, Channel, Detector, Finding, RequestContext, StreamEnd


def run(detector: Detector, ctx: RequestContext, text: str, sizes: list[int] | None = None,
        channel: Channel = TEXT, end: StreamEnd | None = None) -> list[Finding]:
    """Feed ``text`` in pieces of the given sizes (whole when None); return all findings."""
    state = detector.start(ctx)
    findings: list[Finding] = []
    i = 0
    for n in sizes or [len(text)]:
        if i >= len(text):
            break
        findings += state.feed(channel, text[i : i + n])
        i += n
    if i < len(text):
        findings += state.feed(channel, text[i:])
    findings += state.finish(channel, end or StreamEnd(finish_reason="stop"))
    findings += state.finish_response()
    return findings


def key(findings: list[Finding]) -> list[tuple]:
    return sorted((f.detector, f.category, f.span, f.severity, f.channel.key) for f in findings)


def assert_compliant(detector: Detector, ctx: RequestContext, text: str, seed: int = 0,
                     channel: Channel = TEXT) -> list[Finding]:
    """Whole == char-by-char == random splits; interleaved responses == sequential ones."""
    whole = run(detector, ctx, text, channel=channel)
    expected = key(whole)
    assert key(run(detector, ctx, text, [1] * len(text), channel=channel)) == expected, "char-by-char differs"
    rng = random.Random(seed)
    for _ in range(5):
        sizes = [rng.randint(1, 17) for _ in range(len(text))]
        assert key(run(detector, ctx, text, sizes, channel=channel)) == expected, f"split {sizes[:10]} differs"
    # two responses interleaved on the same detector object must not interact
    a, b = detector.start(ctx), detector.start(ctx)
    fa: list[Finding] = []
    fb: list[Finding] = []
    for i in range(0, len(text), 3):
        fa += a.feed(channel, text[i : i + 3])
        fb += b.feed(channel, text[i : i + 3])
    fa += a.finish(channel, StreamEnd("stop")) + a.finish_response()
    fb += b.finish(channel, StreamEnd("stop")) + b.finish_response()
    assert key(fa) == expected and key(fb) == expected, "interleaved responses interact"
    for sizes in ([1] * len(text), [rng.randint(1, 9) for _ in range(len(text))]):
        assert_safe_points_hold(detector, ctx, text, sizes, channel)
    return whole


def assert_safe_points_hold(detector: Detector, ctx: RequestContext, text: str, sizes: list[int],
                            channel: Channel = TEXT) -> None:
    """Release by proof is sound: no finding reported after a ``safe_point`` was given starts
    before it, the point never passes the text fed, and it never moves back. A state that
    returns ``None`` (cannot say) is held to nothing here; the pipeline then keeps its
    ``lookback_chars`` window."""
    state = detector.start(ctx)
    cs = state.channel_state(channel)
    if cs is None:
        return
    unheld = detector.unheld_categories
    promised = 0  # the largest safe point given so far
    fed = 0
    i = 0
    for n in [*sizes, len(text)]:
        piece = text[i : i + n]
        if not piece:
            break
        i += len(piece)
        late = [f for f in cs.feed(piece) if f.span is not None and f.span[0] < promised
                and f.category not in unheld]
        assert not late, f"finding at {late[0].span} after safe point {promised} (fed {fed})"
        fed += len(piece)
        sp = cs.safe_point()
        if sp is None:
            continue
        assert sp <= fed, f"safe point {sp} beyond the {fed} characters fed"
        assert sp >= promised, f"safe point moved back from {promised} to {sp}"
        promised = sp
    late = [f for f in cs.finish(StreamEnd(finish_reason="stop"))
            if f.span is not None and f.span[0] < promised and f.category not in unheld]
    assert not late, f"finding at {late[0].span} at finish, after safe point {promised}"
