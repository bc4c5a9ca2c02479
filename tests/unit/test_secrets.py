"""secrets detector: documented provider formats, the entropy heuristic and its guards, long
credentials reported in pieces, streaming agreement and hold-back, config."""

from __future__ import annotations

import base64
import itertools
import json
import random

import pytest
from pydantic import ValidationError

from detectors.base import TEXT, Message, RequestContext, Severity, StreamEnd
from detectors.secrets import CONFIGS, SecretsConfig, SecretsDetector
from tests.unit.compliance import assert_compliant, run

DET = SecretsConfig().build()
CTX = RequestContext()
RNG = random.Random(11)
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def tok(n: int, alphabet: str = ALNUM) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(n))


def found(text: str, detector: SecretsDetector = DET, ctx: RequestContext = CTX) -> list[tuple[str, str]]:
    return [(f.category, text[f.span[0] : f.span[1]]) for f in run(detector, ctx, text) if f.span]


def _jwt() -> str:
    def enc(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    sig = base64.urlsafe_b64encode(RNG.randbytes(32)).decode().rstrip("=")
    return f"{enc({'alg': 'RS256', 'typ': 'JWT', 'kid': tok(20)})}.{enc({'sub': '42', 'name': 'Jane'})}.{sig}"


AWS_ID = "AKIA" + tok(16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
AWS_SECRET = tok(40, ALNUM + "/+")
GH = "ghp_" + tok(36)
GH_PAT = "github_pat_" + tok(22) + "_" + tok(59)
GITLAB = "glpat-" + tok(20)
SLACK = "xoxb-" + "123456789012-1234567890123-" + tok(24)
HOOK = "https://hooks.slack.com/services/T0ABC1234/B0DEF5678/" + tok(24)
STRIPE_LIVE = "sk_live_" + tok(24)
STRIPE_TEST = "sk_test_" + tok(24)
OPENAI_LEGACY = "sk-" + tok(20) + "T3BlbkFJ" + tok(20)
OPENAI_PROJ = "sk-proj-" + tok(74, ALNUM + "_-") + "T3BlbkFJ" + tok(74, ALNUM + "_-")
ANTHROPIC = "sk-ant-api03-" + tok(93, ALNUM + "_-") + "AA"
GOOGLE = "AIza" + tok(35, ALNUM + "_-")
AZURE_KEY = base64.b64encode(RNG.randbytes(64)).decode()
JWT = _jwt()
NPM = "npm_" + tok(36)
HF = "hf_" + tok(34, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
PEM_BODY = base64.b64encode(RNG.randbytes(1190)).decode()
PEM = ("-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(PEM_BODY[i : i + 64] for i in range(0, len(PEM_BODY), 64))
       + "\n-----END RSA PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("text", "category", "value", "severity"),
    [
        (f"aws_access_key_id = {AWS_ID}", "aws_access_key", AWS_ID, Severity.critical),
        (f'export AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"', "aws_secret_key", AWS_SECRET, Severity.critical),
        (f"token: {GH}", "github_token", GH, Severity.critical),
        (f"GITHUB_TOKEN={GH_PAT}\n", "github_token", GH_PAT, Severity.critical),
        (f"Use {GITLAB} for the registry.", "gitlab_token", GITLAB, Severity.critical),
        (f"SLACK_BOT_TOKEN={SLACK}", "slack_token", SLACK, Severity.critical),
        (f"Post to {HOOK} when done.", "slack_webhook", HOOK, Severity.critical),
        (f"stripe.api_key = '{STRIPE_LIVE}'", "stripe_key", STRIPE_LIVE, Severity.critical),
        (f"test mode: {STRIPE_TEST}", "stripe_key", STRIPE_TEST, Severity.medium),
        (f"OPENAI_API_KEY={OPENAI_LEGACY}", "openai_key", OPENAI_LEGACY, Severity.critical),
        (f"key = {ANTHROPIC}", "anthropic_key", ANTHROPIC, Severity.critical),
        (f"https://maps.googleapis.com/maps/api/js?key={GOOGLE}&v=3", "google_api_key", GOOGLE, Severity.critical),
        (f"DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={AZURE_KEY};EndpointSuffix=core.windows.net",
         "azure_storage_key", AZURE_KEY, Severity.critical),
        ("DATABASE_URL=postgres://app_user:Zq8!rT2m9xLp@db.internal:5432/prod", "database_url", "Zq8!rT2m9xLp",
         Severity.critical),
        ("mongodb+srv://svc:Vh3kP9wQ2z@cluster0.ab1cd.mongodb.net/app", "database_url", "Vh3kP9wQ2z",
         Severity.critical),
        ("redis://:s3cr3tR3dis@cache:6379/0", "database_url", "s3cr3tR3dis", Severity.critical),
        ("git clone https://deploy:Gh7xQ2pLm9@git.example.com/repo.git", "url_credentials", "Gh7xQ2pLm9",
         Severity.high),
        (f"npm config set //registry.npmjs.org/:_authToken={NPM}", "npm_token", NPM, Severity.critical),
        (f"HF_TOKEN={HF}", "huggingface_token", HF, Severity.critical),
        ("api_key = 'q8Zr4LmT2vXy9KpW3sNb7HcD'", "high_entropy", "q8Zr4LmT2vXy9KpW3sNb7HcD", Severity.high),
        ("use 7hQ2xK9pLm4vR8tZ3wY6nB1c as the value", "high_entropy", "7hQ2xK9pLm4vR8tZ3wY6nB1c", Severity.medium),
    ],
)
def test_fires_on_documented_formats(text: str, category: str, value: str, severity: Severity) -> None:
    fs = [f for f in run(DET, CTX, text) if f.span and text[f.span[0] : f.span[1]] == value]
    assert [(f.category, f.severity) for f in fs] == [(category, severity)]
    f = fs[0]
    assert f.replacement == f"[REDACTED:{category}]"
    assert value not in f.evidence and f.evidence


def test_aws_secret_next_to_its_key_id() -> None:
    text = f"id {AWS_ID}\nsecret {AWS_SECRET}\n"
    assert found(text) == [("aws_access_key", AWS_ID), ("aws_secret_key", AWS_SECRET)]


@pytest.mark.parametrize(
    "text",
    [
        "Fixed in commit 9fceb02d0ae598e95dc970b74767f19372d61af8 (9fceb02).",
        "sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "md5 d41d8cd98f00b204e9800998ecf8427e, etag 5d41402abc4b2a76b9719d911017c592",
        "request 123e4567-e89b-12d3-a456-426614174000 and 3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "integrity=\"sha384-oqVuAfXRKap7fdgcCY5uykM6+R9GqQ8K/uxy9rx7HNQlGYl1kPzQho1wx4JwY8wC\"",
        "![logo](data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk)",
        "The encoded text SGVsbG8gd29ybGQsIHRoaXMgaXMgYSB0ZXN0IG1lc3NhZ2U= decodes to a greeting.",
        "See /usr/local/lib/python3.11/site-packages/requests/adapters.py for details.",
        "class AbstractSingletonProxyFactoryBean extends XMLHttpRequestEventTarget2",
        "ENABLE_FEATURE_FLAG_FOR_TESTING_2024=true and my-kubernetes-deployment-v2",
        "Tracking 1Z999AA10123456784, IBAN GB82WEST12345698765432, release v2.14.3-rc.1",
        "Set OPENAI_API_KEY=sk-XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX first.",
        "AWS docs use AKIAIOSFODNN7EXAMPLE and wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY.",
        "Replace sk_live_xxxxxxxxxxxxxxxxxxxxxxxx and ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.",
        "Use sk-proj-your-api-key-here and postgres://user:password@localhost:5432/db.",
        "connect to postgres://db.internal:5432/app and https://example.com/a/b?x=1",
        "Timestamp 2024-01-15T10:30:00.123456Z and epoch 1705314600123.",
        "eyJub3QiOiJhIGp3dCJ9.eyJzdWIiOiIxIn0 has no alg in its header.",
        "The price is $1,299.99 (order #4532015112830366).",
    ],
)
def test_near_misses_do_not_fire(text: str) -> None:
    assert found(text) == []


def test_pem_block_is_covered_piece_by_piece() -> None:
    text = f"Here is the key:\n{PEM}\nKeep it safe."
    fs = run(DET, CTX, text)
    assert {f.category for f in fs} == {"private_key"}
    spans = sorted(f.span for f in fs if f.span)
    assert spans[0][0] == text.index("-----BEGIN") and spans[-1][1] == text.index("-----END") + len(
        "-----END RSA PRIVATE KEY-----")
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), "pieces are contiguous"
    assert all(e - s <= DET.lookback_chars for s, e in spans)
    pieces = sorted(fs, key=lambda f: f.span or (0, 0))
    assert [f.attrs["piece"] for f in pieces] == list(range(len(pieces)))
    assert pieces[0].evidence and all(f.evidence == "" for f in pieces[1:])
    assert PEM_BODY[:8] not in "".join(f.evidence for f in fs)


def test_pem_in_json_string_and_truncated_pem() -> None:
    escaped = json.dumps({"key": PEM})
    fs = run(DET, CTX, escaped)
    spans = sorted(f.span for f in fs if f.span)
    assert escaped[spans[0][0] :].startswith("-----BEGIN") and escaped[: spans[-1][1]].endswith("KEY-----")
    truncated = "-----BEGIN PRIVATE KEY-----\n" + PEM_BODY[:200] + "\n\nThe rest was cut off, sorry."
    covered = "".join(truncated[f.span[0] : f.span[1]] for f in run(DET, CTX, truncated) if f.span)
    assert PEM_BODY[:200] in covered and "rest was cut" not in covered


def test_jwt_and_long_openai_key_are_runs() -> None:
    text = f"Authorization: Bearer {JWT}. Next, {OPENAI_PROJ} is the key."
    fs = run(DET, CTX, text)
    for category, value in (("jwt", JWT), ("openai_key", OPENAI_PROJ)):
        spans = sorted(f.span for f in fs if f.category == category and f.span)
        assert spans[0][0] == text.index(value) and spans[-1][1] == text.index(value) + len(value)
    assert {f.category for f in fs} == {"jwt", "openai_key"}


def test_entropy_threshold_and_switches() -> None:
    text = "use 7hQ2xK9pLm4vR8tZ3wY6nB1c as the value"
    assert found(text, SecretsConfig(entropy_threshold=6.0).build()) == []
    assert found(text, SecretsConfig(entropy=False).build()) == []
    assert found(text, SecretsConfig(entropy_min_length_chars=30).build()) == []
    assert found(f"token {GH}", SecretsConfig(exclude_categories=("github_token",)).build()) == []
    sev = SecretsConfig(severity={"github_token": "high"}).build()
    assert run(sev, CTX, f"token {GH}")[0].severity is Severity.high


def test_ignore_if_in_request() -> None:
    ctx = RequestContext(messages=(Message("user", f"Is {GH} a valid token format?", 0),))
    assert found(f"Yes, {GH} looks valid.", DET, ctx) == [("github_token", GH)]  # default: still flagged
    quiet = SecretsConfig(ignore_if_in_request=True).build()
    assert found(f"Yes, {GH} looks valid.", quiet, ctx) == []
    assert found(f"Yes, {GH} and {GITLAB}.", quiet, ctx) == [("gitlab_token", GITLAB)]
    ctx_pem = RequestContext(messages=(Message("user", PEM, 0),))
    assert found(f"Your key:\n{PEM}\n", quiet, ctx_pem) == []


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        SecretsConfig(entropy_threshold=9)
    with pytest.raises(ValidationError):
        SecretsConfig(entropy_min_length_chars=4)
    with pytest.raises(ValidationError):
        SecretsConfig(action="block")  # type: ignore[call-arg]
    assert CONFIGS["secrets"] is SecretsConfig
    assert DET.lookback_chars == 135


REALISTIC = [
    f"Sure! Here's the config:\n```env\nAWS_ACCESS_KEY_ID={AWS_ID}\nAWS_SECRET_ACCESS_KEY={AWS_SECRET}\n"
    f"GITHUB_TOKEN={GH}\nDATABASE_URL=postgres://app:Zq8rT2m9xLp@db:5432/prod\n```\n"
    "Commit 9fceb02d0ae598e95dc970b74767f19372d61af8.",
    f'{{"headers": {{"Authorization": "Bearer {JWT}"}}, "stripe": "{STRIPE_LIVE}", '
    '"id": "123e4567-e89b-12d3-a456-426614174000"}',
    f"Key material:\n{PEM}\nand the webhook {HOOK} plus {OPENAI_PROJ}.",
    f"Schlüssel für Zürich 🔑: «{GH}» — токен {SLACK}, 密钥 {STRIPE_LIVE}.",
    f"{ANTHROPIC} {GOOGLE} AccountKey={AZURE_KEY}; api_key='q8Zr4LmT2vXy9KpW3sNb7HcD' "
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk",
]


@pytest.mark.parametrize("text", REALISTIC)
def test_compliant_whole_char_by_char_random_splits(text: str) -> None:
    assert assert_compliant(DET, CTX, text)


def test_key_split_across_chunks_is_never_partly_released() -> None:
    text = f"one {GH} two {PEM} three {JWT} four"
    for trial in range(30):
        rng = random.Random(trial)
        state = DET.start(CTX)
        fed, i = 0, 0
        covered: list[tuple[int, int]] = []
        while i < len(text):
            n = rng.randint(1, 40) if trial else 1
            for f in state.feed(TEXT, text[i : i + n]):
                assert f.span and f.span[0] >= fed - DET.lookback_chars, (trial, f.span, fed)
                covered.append(f.span)
            fed += len(text[i : i + n])
            i += n
        covered += [f.span for f in state.finish(TEXT, StreamEnd("stop")) if f.span]
        for value in (GH, PEM, JWT):
            start = text.index(value)
            inside = sorted(s for s in covered if start <= s[0] < start + len(value))
            assert inside[0][0] == start and max(e for _, e in inside) == start + len(value)


def test_evaluation_targets_hold_on_a_subset() -> None:
    from tests.eval.leakage_eval import TARGET, evaluate, load

    scores = evaluate(load()[1::2], secrets_detector=DET)
    sc = scores["provider_keys"]
    assert sc.labels >= 300
    assert sc.precision >= TARGET and sc.recall >= TARGET, sc
