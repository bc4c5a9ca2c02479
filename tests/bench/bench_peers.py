"""gapwatch ``pii`` + ``secrets`` side by side with two well-known peers (issue 5, "What it must
show", last bullet): Microsoft Presidio's predefined pattern recognizers and Yelp's
detect-secrets, in one run, on the same texts: speed in µs per KB, and precision / recall / F1
per comparable kind on the labelled evaluation set (``tests/data/leakage_eval``).

    make bench                                        (runs every bench_*.py, this one included)
    .venv/bin/python -m tests.bench.bench_peers       (this one alone)

The peers are bench-only dependencies: they live in their own venv, ``.venv/peers``
(``tests/bench/peers_requirements.txt`` plus gapwatch itself, editable), never in ``.venv``.
Run from any other interpreter, ``main()`` creates or updates that venv when needed (one-off,
about a minute; a failed install is reported and the bench skipped, not crashed) and re-runs
this module under ``.venv/peers/bin/python``.

How each tool is run (what "the same texts" means):

- gapwatch: ``pii`` with every kind enabled and ``secrets`` with its defaults, exactly as
  ``tests/eval/leakage_eval.py`` configures them; each text fed whole to a fresh state.
- Presidio: its ``AnalyzerEngine`` needs a spaCy language model, which cannot be downloaded
  here, so the predefined pattern recognizers whose entities match an evaluation kind are
  called directly (``analyze(text, entities, nlp_artifacts=None)``) and their results kept as
  the engine keeps them at its default ``score_threshold`` of 0 (every positive score, then
  ``EntityRecognizer.remove_duplicates``). Without NLP artifacts there is no context-word
  score boost, which changes scores, not which spans are returned at threshold 0. The e-mail
  recognizer validates domains with tldextract, whose default is to fetch the public suffix
  list over the network; the bench points it at the snapshot bundled in the package (what
  tldextract falls back to offline anyway), so nothing is fetched.
- detect-secrets: ``scan_line`` (its API for scanning strings) on each line of a text, inside
  ``default_settings()``: every plugin, the default filters. For an ad-hoc string the
  high-entropy plugins also report unquoted candidates below their entropy limit (the CLI
  prints those as ``False (3.2)``); only candidates above the limit are kept, as the CLI's
  verdict does. detect-secrets reports a secret's value and line, not its offsets: the span
  is every occurrence of the value in its line.

Scoring is that of ``tests/eval/leakage_eval.py``: a label is recalled when a finding of the
same kind overlaps it; a finding is a true positive when it overlaps a label of its kind;
``provider_keys`` pools every provider-specific category. ``any_secret`` pools every secret
label (provider formats and the generic ``high_entropy`` ones) against every secret finding,
whatever its category: "was the credential flagged at all", which is what redaction needs and
where detect-secrets' entropy plugins count. Findings of kinds outside a tool's mapping are
not scored. The gapwatch figures are checked against ``leakage_eval.evaluate`` in the same run.

Speed is CPU time of this process (``time.process_time``, best of a few rounds; the machine is
shared), per KB of UTF-8 text, on whole texts: prose and technical output from
``bench_leakage`` and the evaluation set joined into one text, plus the evaluation set text
by text (per-call overhead included, the way a proxy calls a detector per response).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv" / "peers"
REQUIREMENTS = Path(__file__).with_name("peers_requirements.txt")
_STAMP = PEERS_VENV / ".installed"
_INSTALL_LOG = PEERS_VENV.parent / "peers-install.log"
_HEADLINE_ENV = "GAPWATCH_PEERS_HEADLINE"

Found = list[tuple[str, int, int]]  # (evaluation kind, start, end)

# -- mappings onto the evaluation's kinds -------------------------------------------------------

# Presidio recognizer class -> the evaluation kind of the entity it returns. The national-id
# recognizers are country-specific ones (registered for es/it/de in Presidio's own registry)
# chosen because the set holds those schemes; Presidio has none for the French NIR.
PRESIDIO_RECOGNIZERS: dict[str, str] = {
    "EmailRecognizer": "email",  # EMAIL_ADDRESS
    "PhoneRecognizer": "phone",  # PHONE_NUMBER (its default regions US GB DE FR IL IN CA BR)
    "CreditCardRecognizer": "card",  # CREDIT_CARD
    "IbanRecognizer": "iban",  # IBAN_CODE
    "UsSsnRecognizer": "ssn",  # US_SSN
    "IpRecognizer": "ip",  # IP_ADDRESS
    "EsNifRecognizer": "national_id",  # ES_NIF (= DNI)
    "EsNieRecognizer": "national_id",  # ES_NIE
    "ItFiscalCodeRecognizer": "national_id",  # IT_FISCAL_CODE
    "InAadhaarRecognizer": "national_id",  # IN_AADHAAR
    "DeTaxIdRecognizer": "national_id",  # DE_TAX_ID (Steuer-ID)
}
PRESIDIO_KINDS = frozenset(PRESIDIO_RECOGNIZERS.values())

# detect-secrets secret type -> evaluation kind. Types with no category in the set are still
# provider findings ("other:<type>": they can only be false positives here).
DETECT_SECRETS_TYPES: dict[str, str] = {
    "AWS Access Key": "aws_access_key",  # or aws_secret_key, by value (see _ds_kind)
    "Azure Storage Account access key": "azure_storage_key",
    "Basic Auth Credentials": "database_url",  # the password of scheme://user:pass@host
    "GitHub Token": "github_token",
    "GitLab Token": "gitlab_token",
    "JSON Web Token": "jwt",
    "NPM tokens": "npm_token",
    "OpenAI Token": "openai_key",
    "Private Key": "private_key",
    "PyPI Token": "pypi_token",
    "SendGrid API Key": "sendgrid_key",
    "Slack Token": "slack_token",  # or slack_webhook, by value
    "Stripe Access Key": "stripe_key",
    "Public IP (ipv4)": "ip",
    "Base64 High Entropy String": "high_entropy",
    "Hex High Entropy String": "high_entropy",
    "Secret Keyword": "high_entropy",
}
DETECT_SECRETS_KINDS = frozenset({"ip", "provider_keys", "any_secret", "high_entropy"})

TABLE_KINDS = ("email", "phone", "card", "iban", "ssn", "national_id", "ip", "address",
               "provider_keys", "high_entropy", "any_secret")
TOOLS = ("gapwatch", "presidio", "detect-secrets")
# Which table rows each tool has an equivalent for (the rest print "n/a").
TOOL_KINDS: dict[str, frozenset[str]] = {
    "gapwatch": frozenset(TABLE_KINDS),
    "presidio": PRESIDIO_KINDS,
    "detect-secrets": DETECT_SECRETS_KINDS,
}
NO_EQUIVALENT = [
    "Presidio: no pattern recognizer for street addresses (only its spaCy NER, LOCATION) and none "
    "for credentials; no French NIR recognizer (national_id is 5 of the 6 schemes in the set).",
    "detect-secrets: no PII besides public IPv4 (Public IP plugin; no IPv6); no plugin for "
    "Anthropic, Google API, Hugging Face or DigitalOcean keys (only its entropy/keyword plugins "
    "can catch those); Basic Auth stands in for database URLs.",
    "gapwatch: no equivalent for detect-secrets' Artifactory, Cloudant, Discord, IBM, Mailchimp, "
    "SoftLayer, Square, Telegram and Twilio plugins (the set has none of those either).",
    "detect-secrets' ip row finds nothing by design: its default filter is_not_alphanumeric_string "
    "drops every candidate without a letter, which is every IPv4 address.",
    "Presidio flags private and loopback IPs, which the set holds as hard negatives (not personal "
    "data); at the engine's default threshold 0 every phone-number candidate (score 0.4, no context "
    "boost without spaCy) and weak SSN pattern (score 0.05) is kept.",
]


# -- venv handling (runs under the product's venv) --------------------------------------------


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _in_peers_venv() -> bool:
    return Path(sys.prefix).resolve() == PEERS_VENV.resolve()


def _wanted_stamp() -> str:
    """What the peers venv was built from: reinstall when the pins or gapwatch's own
    dependencies change."""
    h = hashlib.sha256()
    for p in (REQUIREMENTS, ROOT / "pyproject.toml"):
        h.update(p.read_bytes())
    return h.hexdigest()


def _ensure_peers_venv() -> Path | None:
    """Create or update ``.venv/peers``; the interpreter path, or None (reason printed)."""
    py = PEERS_VENV / "bin" / "python"
    wanted = _wanted_stamp()
    if py.exists() and _STAMP.exists() and _STAMP.read_text().strip() == wanted:
        return py
    print(f"bench_peers: installing Presidio and detect-secrets into {_rel(PEERS_VENV)} "
          f"(bench only; the product's .venv is not touched; one-off, about a minute; log in "
          f"{_rel(_INSTALL_LOG)})", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(PEERS_VENV)],
        [str(py), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(py), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS), "-e", str(ROOT)],
    ]
    _INSTALL_LOG.parent.mkdir(parents=True, exist_ok=True)
    with _INSTALL_LOG.open("w") as log:
        for cmd in steps:
            if cmd[0] == str(py) and not py.exists():
                break
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=900, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"bench_peers: skipped: `{' '.join(cmd)}` failed: {exc}")
                return None
            if proc.returncode != 0:
                tail = _INSTALL_LOG.read_text(errors="replace").strip().splitlines()[-8:]
                print(f"bench_peers: skipped: `{' '.join(cmd)}` exited {proc.returncode}; last lines of "
                      f"{_rel(_INSTALL_LOG)}:")
                for line in tail:
                    print("    " + line)
                return None
    if not py.exists():
        print(f"bench_peers: skipped: {py} missing after `python -m venv`")
        return None
    _STAMP.write_text(wanted + "\n")
    return py


def _run_in_peers_venv() -> dict[str, float] | None:
    py = _ensure_peers_venv()
    if py is None:
        return None
    with tempfile.TemporaryDirectory(prefix="gapwatch-peers-") as tmp:
        out = Path(tmp) / "headline.json"
        env = {**os.environ, _HEADLINE_ENV: str(out)}
        cmd = [str(py), "-m", "tests.bench.bench_peers"]
        print(f"bench_peers: running under the peers venv: {' '.join([_rel(py), *cmd[1:]])}",
              flush=True)
        sys.stdout.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError("bench_peers timed out after 600 s under .venv/peers") from None
        if proc.returncode != 0:
            raise RuntimeError(f"bench_peers exited {proc.returncode} under .venv/peers")
        return json.loads(out.read_text()) if out.exists() else None


# -- the tools (run under .venv/peers) --------------------------------------------------------


def _gapwatch() -> tuple[Any, Any]:
    from detectors.pii import KINDS, PiiConfig
    from detectors.secrets import SecretsConfig

    return PiiConfig(kinds=KINDS).build(), SecretsConfig().build()


def _gapwatch_findings(detector: Any, text: str) -> Found:
    """As ``leakage_eval.findings_for``, one detector at a time (so each can be timed)."""
    from detectors.base import TEXT, RequestContext, StreamEnd

    state = detector.start(RequestContext())
    fs = state.feed(TEXT, text) + state.finish(TEXT, StreamEnd("stop"))
    return [(f.category, f.span[0], f.span[1]) for f in fs if f.span]


def _presidio() -> list[Any]:
    import tldextract
    import tldextract.tldextract

    # The e-mail recognizer calls tldextract.extract(), which goes through this module-level
    # extractor; no URLs = the bundled public suffix snapshot, no network, no disk cache.
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())
    from presidio_analyzer import predefined_recognizers

    return [getattr(predefined_recognizers, name)() for name in PRESIDIO_RECOGNIZERS]


def _presidio_findings(recognizers: list[Any], text: str) -> Found:
    from presidio_analyzer import EntityRecognizer

    results = []
    for rec in recognizers:
        results += [r for r in rec.analyze(text, rec.supported_entities, None) if r.score > 0]
    results = EntityRecognizer.remove_duplicates(results)
    kind = {e: PRESIDIO_RECOGNIZERS[type(rec).__name__] for rec in recognizers for e in rec.supported_entities}
    return [(kind[r.entity_type], r.start, r.end) for r in results]


class _DetectSecrets:
    """detect-secrets' string scan with its default settings held open for the whole run."""

    def __init__(self) -> None:
        from detect_secrets.core.scan import scan_line
        from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin
        from detect_secrets.settings import default_settings, get_plugins

        self._ctx = default_settings()
        self._ctx.__enter__()
        self.scan_line = scan_line
        self.plugins = list(get_plugins())
        self.entropy = {p.secret_type: p for p in self.plugins if isinstance(p, HighEntropyStringsPlugin)}

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)

    def findings(self, text: str) -> Found:
        out: Found = []
        pos = 0
        for line in text.split("\n"):
            if line.strip():
                for secret in self.scan_line(line):
                    value = secret.secret_value or ""
                    plugin = self.entropy.get(secret.type)
                    if plugin is not None and plugin.calculate_shannon_entropy(value) <= plugin.entropy_limit:
                        continue  # the CLI's "False (x.y)": below the plugin's limit
                    kind = _ds_kind(secret.type, value)
                    out += [(kind, pos + s, pos + s + len(value)) for s in _occurrences(line, value)] or [
                        (kind, pos, pos + len(line))]
            pos += len(line) + 1
        return out


def _ds_kind(secret_type: str, value: str) -> str:
    kind = DETECT_SECRETS_TYPES.get(secret_type, f"other:{secret_type}")
    if kind == "aws_access_key" and not value.startswith(("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA")):
        return "aws_secret_key"
    if kind == "slack_token" and value.startswith("https://hooks.slack.com"):
        return "slack_webhook"
    return kind


def _occurrences(line: str, value: str) -> Iterable[int]:
    if not value:
        return
    i = line.find(value)
    while i >= 0:
        yield i
        i = line.find(value, i + len(value))


# -- scoring (tests/eval/leakage_eval.py's rules, plus the any_secret pool) -------------------


def _secret_kinds() -> tuple[frozenset[str], frozenset[str]]:
    from detectors.secrets import PROVIDER_CATEGORIES

    return PROVIDER_CATEGORIES, PROVIDER_CATEGORIES | {"high_entropy"}


def _is_provider(kind: str, provider: frozenset[str]) -> bool:
    return kind in provider or kind.startswith("other:")


def _merge_pieces(found: Found, gap: int = 0, same_kind: bool = True) -> Found:
    """Adjacent pieces of one long credential count as one finding (as leakage_eval does, with
    ``gap=0``, per kind). The ``any_secret`` row merges across kinds and over one separator,
    so a PEM key that detect-secrets reports line by line counts once, like gapwatch's."""
    out: Found = []
    for kind, s, e in sorted(found, key=lambda x: (x[1], x[2])):
        if out and (out[-1][0] == kind or not same_kind) and s - out[-1][2] <= gap:
            out[-1] = (out[-1][0], out[-1][1], max(e, out[-1][2]))
        else:
            out.append((kind, s, e))
    return out


def score(items: list[dict[str, Any]], found: list[Found]) -> dict[str, Any]:
    """Per-row ``leakage_eval.Score`` for one tool; ``found[i]`` are its findings on item i.

    Per kind and ``provider_keys``: leakage_eval's rules exactly (checked against it). Two
    rows differ so that tools whose secret categories do not line up with the set's are not
    penalised twice: ``high_entropy`` leaves out generic findings that overlap a provider-format
    label (they belong to that credential and count in ``any_secret``), and ``any_secret``
    scores merged regions of every secret finding against every secret label.
    """
    from tests.eval.leakage_eval import Score

    provider, secret = _secret_kinds()
    scores: dict[str, Score] = defaultdict(Score)

    def overlaps(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
        return a[1] < b[2] and b[1] < a[2]

    def tally(row: str, labels: Found, fs: Found, match: Callable[[str, str], bool],
              exclude: Found | None = None) -> None:
        """``exclude``: labels whose overlapping findings this row does not score."""
        sc = scores[row]
        for lab in labels:
            sc.labels += 1
            sc.recalled += any(match(lab[0], f[0]) and overlaps(lab, f) for f in fs)
        for f in fs:
            if exclude and any(overlaps(x, f) for x in exclude):
                continue
            if any(match(lab[0], f[0]) and overlaps(lab, f) for lab in labels):
                sc.tp += 1
            else:
                sc.fp += 1

    for it, raw in zip(items, found, strict=True):
        labels = [(str(lab["kind"]), int(lab["start"]), int(lab["end"])) for lab in it["labels"]]
        fs = _merge_pieces(raw)
        for kind in {k for k, _, _ in labels} | {k for k, _, _ in fs}:
            exclude = [x for x in labels if _is_provider(x[0], provider)] if kind == "high_entropy" else []
            tally(kind, [x for x in labels if x[0] == kind], [x for x in fs if x[0] == kind], str.__eq__, exclude)
        tally("provider_keys", [x for x in labels if _is_provider(x[0], provider)],
              [x for x in fs if _is_provider(x[0], provider)], lambda a, b: True)
        secret_fs = _merge_pieces([x for x in raw if x[0] in secret or x[0].startswith("other:")], gap=1,
                                  same_kind=False)
        tally("any_secret", [x for x in labels if x[0] in secret], secret_fs, lambda a, b: True)
    return {k: v for k, v in scores.items() if v.labels or v.tp or v.fp}


# -- measurement -------------------------------------------------------------------------------


def _best(fn: Callable[[], object], rounds: int) -> float:
    """Best of ``rounds`` in CPU seconds of this process (other jobs share the machine)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _kb(text: str) -> float:
    return len(text.encode()) / 1024


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _counts(sc: Any | None) -> tuple[int, int, int, int] | None:
    return None if sc is None else (sc.tp, sc.fp, sc.recalled, sc.labels)


def _cell(sc: Any | None, applies: bool) -> str:
    if not applies:
        return f"{'n/a':^20s}"
    if sc is None:
        return f"{'-':^20s}"
    prec = f"{sc.precision:6.3f}" if sc.tp + sc.fp else f"{'-':>6s}"  # nothing found: no precision
    return f"{prec} {sc.recall:6.3f} {sc.f1 if sc.tp + sc.fp else 0.0:6.3f}"


def _run_tools(tools: dict[str, Callable[[str], Found]], texts: list[str]) -> tuple[dict[str, list[Found]],
                                                                                    dict[str, float]]:
    """Every tool on every text, each timed (CPU seconds summed per tool)."""
    found: dict[str, list[Found]] = {name: [] for name in tools}
    cpu: dict[str, float] = dict.fromkeys(tools, 0.0)
    for text in texts:
        for name, fn in tools.items():
            t0 = time.process_time()
            got = fn(text)
            cpu[name] += time.process_time() - t0
            found[name].append(got)
    return found, cpu


def _speed_table(tools: dict[str, Callable[[str], Found]], texts: list[str], cpu: dict[str, float],
                 headline: dict[str, float]) -> None:
    from tests.bench.bench_leakage import prose, technical

    corpora = {"prose": prose(), "technical": technical(), "eval set, joined": "\n".join(texts)}
    rows: list[tuple[str, str, float, dict[str, float]]] = []
    for cname, text in corpora.items():
        kb = _kb(text)
        us = {name: _best(lambda fn=fn, text=text: fn(text), 3 if kb < 64 else 2) * 1e6 / kb
              for name, fn in tools.items()}
        rows.append((cname, cname.split(",")[0].replace(" ", "_"), kb, us))
    eval_kb = sum(_kb(t) for t in texts)
    rows.append((f"eval set, {len(texts)} texts one by one", "eval_set_per_text", eval_kb,
                 {name: cpu[name] * 1e6 / eval_kb for name in tools}))
    print("speed, µs of CPU per KB of text (best of 2-3 rounds; the one-by-one row is the scoring pass)")
    cols = ["gapwatch pii", "presidio", "gapwatch secrets", "detect-secrets", "gapwatch both", "peers both"]
    print(f"{'corpus':34s} {'KB':>5s} " + " ".join(f"{c:>16s}" for c in cols))
    for cname, slug, kb, us in rows:
        us = {**us, "gapwatch both": us["gapwatch pii"] + us["gapwatch secrets"],
              "peers both": us["presidio"] + us["detect-secrets"]}
        print(f"{cname:34s} {kb:5.0f} " + " ".join(f"{us[c]:16.0f}" for c in cols))
        for c in cols:
            headline[f"peers.{slug}.{c.replace(' ', '_')}_us_per_kb"] = us[c]
    print('("both" adds up the pii and the secrets column of the same tools)')


def _quality_table(per_tool: dict[str, dict[str, Any]], n_texts: int, headline: dict[str, float]) -> None:
    from tests.eval.leakage_eval import DATA

    print(f"quality on the evaluation set ({n_texts} texts, {_rel(DATA)}): precision recall F1")
    print(f"{'kind':14s} {'labels':>6s} | " + " | ".join(f"{t:^20s}" for t in TOOLS))
    print(f"{'':14s} {'':6s} | " + " | ".join(f"{'prec':>6s} {'recall':>6s} {'F1':>6s}" for _ in TOOLS))
    gw = per_tool["gapwatch"]
    for kind in TABLE_KINDS:
        n = gw[kind].labels if kind in gw else 0
        cells = " | ".join(_cell(per_tool[t].get(kind), kind in TOOL_KINDS[t]) for t in TOOLS)
        print(f"{kind:14s} {n:6d} | {cells}")
        for t in TOOLS:
            sc = per_tool[t].get(kind)
            if sc is not None and kind in TOOL_KINDS[t]:
                headline[f"peers.eval.{t}.{kind}.precision"] = sc.precision
                headline[f"peers.eval.{t}.{kind}.recall"] = sc.recall
    print("national_id = FR NIR, ES DNI/NIE, IT codice fiscale, IN Aadhaar, DE Steuer-ID. provider_keys = "
          "provider formats pooled. high_entropy = generic secrets in context (detect-secrets: its entropy and "
          "keyword plugins). any_secret = every secret label against every secret finding, merged into regions. "
          "prec '-' = nothing found.")


def _provider_table(items: list[dict[str, Any]], found: dict[str, list[Found]]) -> None:
    """Recall per credential category: by the matching category, and flagged at all."""
    _provider, secret = _secret_kinds()
    plugins: dict[str, list[str]] = defaultdict(list)
    for t, k in DETECT_SECRETS_TYPES.items():
        plugins[k].append(t)
    plugins["aws_secret_key"] = ["AWS Access Key (keyword form)"]
    plugins["slack_webhook"] = ["Slack Token"]
    plugins["npm_token"] = ["NPM tokens (.npmrc _authToken= lines only)"]
    cats = sorted({str(lab["kind"]) for it in items for lab in it["labels"]} & secret)
    print("credentials, recall per category: found as that category / flagged by any secret finding")
    print(f"{'category':20s} {'labels':>6s} {'gapwatch':>15s} {'detect-secrets':>15s}  detect-secrets plugin")
    for cat in cats:
        cells = []
        n = 0
        for tool in ("gapwatch", "detect-secrets"):
            n = exact = flagged = 0
            for it, fs in zip(items, found[tool], strict=True):
                for lab in it["labels"]:
                    if lab["kind"] == cat:
                        n += 1
                        over = [k for k, s, e in fs if int(lab["start"]) < e and s < int(lab["end"])]
                        exact += cat in over
                        flagged += any(k in secret or k.startswith("other:") for k in over)
            cells.append(f"{exact / n:6.3f} / {flagged / n:5.3f}")
        print(f"{cat:20s} {n:6d} {cells[0]:>15s} {cells[1]:>15s}  "
              + (", ".join(plugins.get(cat, [])) or "none (entropy/keyword plugins only)"))


def _bench() -> dict[str, float]:
    from tests.eval.leakage_eval import evaluate, load

    t_start = time.monotonic()
    items = load()
    texts = [str(it["text"]) for it in items]
    pii, secrets = _gapwatch()
    presidio = _presidio()
    ds = _DetectSecrets()
    headline: dict[str, float] = {}
    try:
        tools: dict[str, Callable[[str], Found]] = {
            "gapwatch pii": lambda t: _gapwatch_findings(pii, t),
            "presidio": lambda t: _presidio_findings(presidio, t),
            "gapwatch secrets": lambda t: _gapwatch_findings(secrets, t),
            "detect-secrets": ds.findings,
        }
        print("== peers: gapwatch pii+secrets vs Presidio pattern recognizers vs detect-secrets ==")
        print(f"interpreter: {_rel(Path(sys.executable))} "
              f"(Python {platform.python_version()}); presidio-analyzer {_version('presidio-analyzer')}, "
              f"detect-secrets {_version('detect-secrets')}, phonenumbers {_version('phonenumbers')}, "
              f"python-stdnum {_version('python-stdnum')}")
        print(f"gapwatch: pii (every kind) + secrets (defaults). Presidio: {len(presidio)} predefined pattern "
              "recognizers called directly, no NLP engine, score threshold 0. detect-secrets: scan_line per line "
              f"in default_settings() ({len(ds.plugins)} plugins, default filters), entropy hits above the limit.")
        print()
        found, cpu = _run_tools(tools, texts)
        found["gapwatch"] = [a + b for a, b in zip(found["gapwatch pii"], found["gapwatch secrets"], strict=True)]
        per_tool = {t: score(items, found[t]) for t in TOOLS}
        _speed_table(tools, texts, cpu, headline)
    finally:
        ds.close()
    print()
    _quality_table(per_tool, len(items), headline)
    print()
    _provider_table(items, found)
    print()
    print("not comparable (n/a above):")
    for line in NO_EQUIVALENT:
        print("  - " + line)
    reference = evaluate(items, pii, secrets)
    mismatch = [k for k, sc in reference.items()
                if k != "high_entropy" and _counts(sc) != _counts(per_tool["gapwatch"].get(k))]
    print("cross-check: gapwatch's rows (but high_entropy) "
          + ("match tests/eval/leakage_eval.py" if not mismatch else f"DIFFER from leakage_eval on {mismatch}"))
    print(f"[bench_peers: {time.monotonic() - t_start:.0f}s in the peers venv]")
    return headline


def main() -> dict[str, float] | None:
    """Under ``.venv/peers``: measure. Anywhere else: make sure that venv exists, then run
    this module there (the peers never enter the product's venv)."""
    if not _in_peers_venv():
        return _run_in_peers_venv()
    headline = _bench()
    out = os.environ.get(_HEADLINE_ENV)
    if out:
        Path(out).write_text(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
