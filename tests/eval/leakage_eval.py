"""Labelled evaluation of the ``pii`` and ``secrets`` detectors.

The set is generated from seeded ``faker`` instances in eight locales plus seeded synthetic
credentials in each provider's documented format, mixed into varied sentence templates
(prose, JSON, YAML, logs, markdown tables) together with hard negatives: order and tracking
numbers, version strings, git SHAs, UUIDs, ISBNs, timestamps, dates, prices, hex hashes,
base64 text and images, product codes, Luhn-failing card-like numbers, IBANs with a broken
check, private IPs, documentation placeholder keys, identifiers and paths. The generated file
is committed (``tests/data/leakage_eval/leakage_eval.jsonl``), so results do not move with
faker releases; ``--generate`` rewrites it from the seed (identical for the same faker
version; faker's French and Italian identifiers derive birth dates from today's date).

Run (prints precision, recall and F1 per kind):

    .venv/bin/python -m tests.eval.leakage_eval
    .venv/bin/python -m tests.eval.leakage_eval --generate   # regenerate the JSONL first

Scoring: a labelled span is recalled when a finding of the same kind overlaps it; a finding
is a true positive when it overlaps a labelled span of its kind (adjacent pieces of one long
credential count as one finding). ``provider_keys`` aggregates every provider format (any
provider category overlapping a provider label). The detectors run with their defaults,
except that pii enables every kind (``address`` is off by default).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import random
import string
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detectors.base import Detector

DATA = Path(__file__).resolve().parents[1] / "data" / "leakage_eval" / "leakage_eval.jsonl"
SEED = 20240611
N_TEXTS = 2400

PII_KINDS = ("email", "phone", "card", "iban", "ssn", "national_id", "ip", "address")
TARGET_KINDS = ("card", "email", "iban", "provider_keys")
TARGET = 0.95

_ALNUM = string.ascii_letters + string.digits
_B32 = string.ascii_uppercase + "234567"
_B64 = string.ascii_letters + string.digits + "+/"
_B64URL = string.ascii_letters + string.digits + "-_"


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass
class _Builder:
    """Assembles one text from parts, recording the spans of labelled values."""

    parts: list[str] = field(default_factory=list)
    labels: list[dict[str, object]] = field(default_factory=list)
    length: int = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def value(self, kind: str, text: str) -> None:
        self.labels.append({"kind": kind, "start": self.length, "end": self.length + len(text)})
        self.add(text)

    def template(self, template: str, kind: str | None, value: str, **fill: str) -> None:
        """``template`` holds ``{v}`` for the value and other ``{names}`` for fillers."""
        before, _, after = template.partition("{v}")
        self.add(before.format(**fill))
        if kind is None:
            self.add(value)
        else:
            self.value(kind, value)
        self.add(after.format(**fill))

    def item(self, idx: int, group: str) -> dict[str, object]:
        return {"id": idx, "group": group, "text": "".join(self.parts), "labels": self.labels}


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _rand_token(rng: random.Random, alphabet: str, n: int) -> str:
    """Random token that is diverse enough to look like a real credential (what providers
    issue), i.e. not accidentally a placeholder like 'xxxx' or '0000'."""
    while True:
        t = _rand(rng, alphabet, n)
        low = t.lower()
        if not any(w in low for w in ("xxxx", "0000", "your", "example", "dummy")):
            return t


class _Values:
    """Seeded generators for every labelled kind and every hard negative."""

    LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "en_IN", "nl_NL")
    PHONE_REGION = {"en_US": "US", "en_GB": "GB", "de_DE": "DE", "fr_FR": "FR", "en_IN": "IN",
                    "es_ES": "ES", "it_IT": "IT", "nl_NL": "NL"}
    DEFAULT_REGIONS = ("US", "GB", "DE", "FR", "IN")

    def __init__(self, seed: int) -> None:
        from faker import Faker

        self.rng = random.Random(seed)
        self.fakers = {}
        for i, loc in enumerate(self.LOCALES):
            f = Faker(loc)
            f.seed_instance(seed + i)
            self.fakers[loc] = f

    def faker(self, locales: Iterable[str] | None = None):  # type: ignore[no-untyped-def]
        return self.fakers[self.rng.choice(tuple(locales or self.LOCALES))]

    # -- PII -------------------------------------------------------------------------------

    def name(self) -> str:
        return self.faker().name()

    def email(self) -> str:
        f = self.faker()
        style = self.rng.random()
        if style < 0.5:
            return f.email()
        if style < 0.75:
            return f.free_email()
        user = f.user_name().replace(" ", "")
        tag = f"+{f.word()}" if self.rng.random() < 0.5 else ""
        return f"{user}{tag}@{self.rng.choice(['mail.', 'eu.', ''])}{f.domain_name()}"

    def phone(self) -> str:
        import phonenumbers

        while True:
            loc = self.rng.choice(self.LOCALES)
            number = self.fakers[loc].phone_number()
            region = self.PHONE_REGION[loc]
            # national formats are only findable for the configured regions; other locales
            # contribute their international ("+") forms
            if region not in self.DEFAULT_REGIONS and not number.startswith("+"):
                continue
            try:
                parsed = phonenumbers.parse(number.replace("(0)", ""), region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(parsed):
                return number

    def card(self) -> str:
        f = self.fakers["en_US"]
        kind = self.rng.choice(["visa16", "visa16", "visa13", "mastercard", "mastercard", "amex",
                                "discover", "jcb16", "diners", "maestro"])
        # faker's JCB ("35xx") and Maestro (12 digits, "0604") numbers stray outside the
        # issuers' published ranges and lengths: JCB is redrawn, Maestro built here.
        if kind == "maestro":
            from stdnum import luhn

            body = self.rng.choice(["5018", "5020", "5038", "6304", "6759", "6761", "6763"]) + _rand(
                self.rng, string.digits, self.rng.choice([11, 14]))
            digits = body + luhn.calc_check_digit(body)
        else:
            while True:
                digits = f.credit_card_number(kind)
                if kind != "jcb16" or 3528 <= int(digits[:4]) <= 3589:
                    break
        style = self.rng.random()
        if style < 0.4:
            return digits
        sep = " " if style < 0.75 else "-"
        if len(digits) == 15 and digits[:2] in ("34", "37"):
            return sep.join([digits[:4], digits[4:10], digits[10:]])
        return sep.join(digits[i : i + 4] for i in range(0, len(digits), 4))

    def iban(self) -> str:
        from stdnum import iban

        while True:
            value = self.faker().iban()
            if iban.is_valid(value):
                break
        if self.rng.random() < 0.5:
            return " ".join(value[i : i + 4] for i in range(0, len(value), 4))
        return value

    def ssn(self) -> str:
        from stdnum.us import ssn

        while True:
            value = self.fakers["en_US"].ssn()
            if ssn.is_valid(value):
                return value

    def national_id(self) -> tuple[str, str]:
        """(value, template hint)"""
        from stdnum import verhoeff
        from stdnum.fr import nir
        from stdnum.iso7064 import mod_11_10
        from stdnum.it import codicefiscale

        scheme = self.rng.choice(["fr_nir", "es_dni", "es_nie", "it_cf", "in_aadhaar", "de_idnr"])
        if scheme == "fr_nir":
            while True:
                v = self.fakers["fr_FR"].ssn()
                if nir.is_valid(v):
                    break
            if self.rng.random() < 0.5:
                v = f"{v[0]} {v[1:3]} {v[3:5]} {v[5:7]} {v[7:10]} {v[10:13]} {v[13:]}"
            return v, "numéro de sécurité sociale"
        if scheme == "es_dni":
            return self.fakers["es_ES"].nif(), "DNI"
        if scheme == "es_nie":
            return self.fakers["es_ES"].nie(), "NIE"
        if scheme == "it_cf":
            while True:
                v = self.fakers["it_IT"].ssn()
                if codicefiscale.is_valid(v):
                    return v, "codice fiscale"
        if scheme == "in_aadhaar":
            while True:
                body = str(self.rng.randint(2, 9)) + _rand(self.rng, string.digits, 10)
                v = body + verhoeff.calc_check_digit(body)
                if v != v[::-1]:
                    break
            if self.rng.random() < 0.6:
                return f"{v[:4]} {v[4:8]} {v[8:]}", "Aadhaar"
            return v, "Aadhaar number"
        # de_idnr: 10 digits, exactly one repeated twice, then the ISO 7064 mod 11,10 digit
        while True:
            digits = [*self.rng.sample("123456789", 8), self.rng.choice("0123456789")]
            body = [*digits, self.rng.choice(digits)]
            self.rng.shuffle(body)
            if body[0] == "0":
                continue
            s = "".join(body)
            if len(set(s)) != 9:
                continue
            return s + mod_11_10.calc_check_digit(s), "Steuer-ID"

    def ip(self) -> str:
        import ipaddress

        f = self.faker()
        while True:
            if self.rng.random() < 0.7:
                v = f.ipv4_public()
            else:  # global unicast lives in 2000::/3; faker draws from the whole space
                v = f"{self.rng.randint(0x2000, 0x3FFF):x}:" + f.ipv6().split(":", 1)[1]
            a = ipaddress.ip_address(v)
            octets = v.split(".")
            if a.is_global and not (a.version == 4 and all(len(o) == 1 for o in octets)) and not (
                a.version == 6 and len([g for g in v.split(":") if g]) < 3
            ):
                return v

    def address(self) -> str:
        return self.fakers["en_US"].street_address()

    # -- credentials -----------------------------------------------------------------------

    def secret(self) -> tuple[str, str]:
        """(category, value)"""
        r = self.rng
        kind = r.choice([
            "aws_access_key", "github_token", "github_token", "gitlab_token", "slack_token", "slack_webhook",
            "stripe_key", "openai_key", "openai_key", "anthropic_key", "google_api_key",
            "azure_storage_key", "jwt", "database_url", "npm_token", "huggingface_token",
            "sendgrid_key", "private_key", "pypi_token", "digitalocean_token",
        ])
        if kind == "aws_access_key":
            return kind, r.choice(["AKIA", "ASIA"]) + _rand_token(r, _B32, 16)
        if kind == "github_token":
            if r.random() < 0.25:
                return kind, "github_pat_" + _rand_token(r, _ALNUM, 22) + "_" + _rand_token(r, _ALNUM, 59)
            return kind, "gh" + r.choice("pousr") + "_" + _rand_token(r, _ALNUM, 36)
        if kind == "gitlab_token":
            return kind, "glpat-" + _rand_token(r, _ALNUM + "_-", 20)
        if kind == "slack_token":
            return kind, (f"xox{r.choice('bp')}-{r.randint(10**10, 10**12)}-{r.randint(10**11, 10**13)}-"
                          + _rand_token(r, _ALNUM, 24))
        if kind == "slack_webhook":
            upper = string.ascii_uppercase + string.digits
            return kind, ("https://hooks.slack.com/services/T" + _rand_token(r, upper, 8)
                          + "/B" + _rand_token(r, upper, 10) + "/" + _rand_token(r, _ALNUM, 24))
        if kind == "stripe_key":
            return kind, r.choice(["sk_live_", "rk_live_", "sk_test_"]) + _rand_token(r, _ALNUM, r.choice([24, 99]))
        if kind == "openai_key":
            if r.random() < 0.4:
                return kind, "sk-" + _rand_token(r, _ALNUM, 20) + "T3BlbkFJ" + _rand_token(r, _ALNUM, 20)
            return kind, ("sk-proj-" + _rand_token(r, _ALNUM + "_-", 74) + "T3BlbkFJ"
                          + _rand_token(r, _ALNUM + "_-", 74))
        if kind == "anthropic_key":
            return kind, "sk-ant-api03-" + _rand_token(r, _ALNUM + "_-", 93) + "AA"
        if kind == "google_api_key":
            return kind, "AIza" + _rand_token(r, _ALNUM + "_-", 35)
        if kind == "azure_storage_key":
            key = base64.b64encode(r.randbytes(64)).decode()
            name = self.fakers["en_US"].user_name().replace(".", "")[:20]
            return kind, (f"DefaultEndpointsProtocol=https;AccountName={name};AccountKey={key};"
                          "EndpointSuffix=core.windows.net")
        if kind == "jwt":
            f = self.faker()
            header = {"alg": r.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"}
            payload = {"sub": str(r.randint(1, 10**9)), "name": f.name(), "iat": r.randint(1.5e9, 1.8e9)}

            def enc(obj: dict[str, object]) -> str:
                return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

            sig = base64.urlsafe_b64encode(r.randbytes(r.choice([32, 64, 256]))).decode().rstrip("=")
            return kind, f"{enc(header)}.{enc(payload)}.{sig}"
        if kind == "database_url":
            f = self.fakers["en_US"]
            scheme = r.choice(["postgres", "postgresql", "mysql", "mongodb+srv", "redis", "amqp"])
            pw = _rand_token(r, _ALNUM + "!*-_", r.randint(10, 24))
            return kind, f"{scheme}://{f.user_name()}:{pw}@{f.domain_word()}.internal.{f.domain_name()}:5432/app"
        if kind == "npm_token":
            return kind, "npm_" + _rand_token(r, _ALNUM, 36)
        if kind == "huggingface_token":
            return kind, "hf_" + _rand_token(r, string.ascii_letters, 34)
        if kind == "sendgrid_key":
            return kind, "SG." + _rand_token(r, _ALNUM + "_-", 22) + "." + _rand_token(r, _ALNUM + "_-", 43)
        if kind == "pypi_token":
            return kind, "pypi-AgEIcHlwaS5vcmc" + _rand_token(r, _B64URL, 160)
        if kind == "digitalocean_token":
            return kind, "dop_v1_" + _rand_token(r, "0123456789abcdef", 64)
        # private_key
        label = r.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
        body = base64.b64encode(r.randbytes(r.choice([121, 600, 1190]))).decode()
        lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
        return kind, f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----"

    def generic_secret(self) -> str:
        return _rand_token(self.rng, _ALNUM, self.rng.randint(24, 48))

    # -- hard negatives --------------------------------------------------------------------

    def negative(self) -> tuple[str, str]:
        """(negative kind, text fragment) that no detector should flag."""
        r = self.rng
        f = self.fakers["en_US"]
        k = r.choice(list(_NEGATIVES))
        return k, _NEGATIVES[k](self, r, f)


def _luhn_fail(r: random.Random) -> str:
    from stdnum import luhn

    while True:
        d = r.choice("4536") + _rand(r, string.digits, 15)
        if not luhn.is_valid(d):
            return " ".join(d[i : i + 4] for i in range(0, 16, 4))


def _iban_broken(v: _Values, r: random.Random) -> str:
    from stdnum import iban

    while True:
        value = v.faker().iban()
        broken = value[:2] + f"{(int(value[2:4]) + r.randint(1, 9)) % 100:02d}" + value[4:]
        if not iban.is_valid(broken):
            return broken


def _when(r: random.Random) -> datetime.datetime:
    """A timestamp that does not depend on today's date (faker's do)."""
    return datetime.datetime(2001, 1, 1) + datetime.timedelta(seconds=r.randint(0, 30 * 365 * 86400))


def _b64_text(f) -> str:  # type: ignore[no-untyped-def]
    return base64.b64encode(f.sentence(nb_words=8).encode()).decode()


def _data_uri(r: random.Random) -> str:
    return "data:image/png;base64," + base64.b64encode(r.randbytes(r.randint(90, 300))).decode()


_NEGATIVES: dict[str, Callable[[_Values, random.Random, object], str]] = {
    "order_number": lambda v, r, f: f"Order #{r.randint(10**15, 10**16 - 1)}",
    "order_number2": lambda v, r, f: f"your order number is {r.randint(10**11, 10**16 - 1)}",
    "invoice": lambda v, r, f: f"Invoice {r.choice(['INV-', ''])}{r.randint(10**7, 10**10)} is attached",
    "tracking_ups": lambda v, r, f: "tracking 1Z" + _rand(r, string.ascii_uppercase + string.digits, 16),
    "tracking_usps": lambda v, r, f: "USPS tracking " + " ".join(_rand(r, string.digits, 4) for _ in range(5))
    + " " + _rand(r, string.digits, 2),
    "tracking_fedex": lambda v, r, f: f"FedEx tracking number {r.randint(10**11, 10**15)}",
    "version": lambda v, r, f: r.choice(["v", "version ", "release ", ""]) + ".".join(
        str(r.randint(0, 20)) for _ in range(r.randint(2, 4))),
    "git_sha": lambda v, r, f: r.choice(["commit ", "fixed in ", ""]) + hashlib.sha1(r.randbytes(8)).hexdigest()[
        : r.choice([7, 12, 40])],
    "uuid": lambda v, r, f: str(uuid.UUID(bytes=r.randbytes(16), version=4)),
    "isbn": lambda v, r, f: "ISBN " + r.choice([f.isbn13(), f.isbn10()]),
    "isbn_bare": lambda v, r, f: f.isbn13(),
    "timestamp": lambda v, r, f: r.choice([_when(r).isoformat(), str(r.randint(1_500_000_000, 1_800_000_000)),
                                           str(r.randint(1_500_000_000_000, 1_800_000_000_000))]),
    "date": lambda v, r, f: _when(r).strftime(r.choice(["%d/%m/%Y", "%Y-%m-%d", "%d.%m.%Y", "%m/%d/%Y"])),
    "price": lambda v, r, f: r.choice([f"${r.randint(1, 99999):,}.{r.randint(0, 99):02d}",
                                       f"€ {r.randint(1000, 9999999):,}".replace(",", "."),
                                       f"{r.randint(1, 999)} {r.randint(100, 999)} €", f"₹{r.randint(100, 10**7)}"]),
    "hex_hash": lambda v, r, f: r.choice(["sha256: ", "md5 ", "checksum ", ""]) + r.choice(
        [hashlib.md5(r.randbytes(8)).hexdigest(), hashlib.sha256(r.randbytes(8)).hexdigest(),
         hashlib.sha1(r.randbytes(8)).hexdigest()]),
    "base64_text": lambda v, r, f: _b64_text(f),
    "data_uri": lambda v, r, f: _data_uri(r),
    "product_code": lambda v, r, f: r.choice([
        f"SKU {r.randint(100, 999)}-{r.randint(100, 999)}-{r.randint(1000, 9999)}",
        f"Model KX-TG{r.randint(1000, 9999)}",
        f"part no. {r.randint(1000, 9999)}-{r.randint(1000, 9999)}-{r.randint(10, 99)}",
        f"P/N {r.randint(10**8, 10**10)}"]),
    "luhn_fail_card": lambda v, r, f: _luhn_fail(r),
    "iban_broken": lambda v, r, f: _iban_broken(v, r),
    "private_ip": lambda v, r, f: r.choice([f.ipv4_private(), "127.0.0.1", "10.0.0.1", "192.168.1.254", "::1",
                                            "fe80::1ff:fe23:4567:890a"]),
    "placeholder_key": lambda v, r, f: r.choice([
        "sk-XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "AKIAIOSFODNN7EXAMPLE",
        "sk_live_xxxxxxxxxxxxxxxxxxxxxxxx",
        "ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "YOUR_API_KEY_HERE", "postgres://user:password@localhost:5432/db",
        "sk-proj-your-api-key-here"]),
    "identifier": lambda v, r, f: r.choice([
        "AbstractSingletonProxyFactoryBean", "get_user_profile_settings_v2", "XMLHttpRequestEventTarget",
        "ENABLE_FEATURE_FLAG_FOR_TESTING_2024", "com.example.myapp.MainActivity", "my-kubernetes-deployment-v2",
        "InternalServerErrorException", "test_user_2024_backup_v2", "useEffectCleanupHandler3"]),
    "path": lambda v, r, f: r.choice([f.file_path(depth=r.randint(2, 5)), "/usr/local/lib/python3.11/site-packages",
                                      "node_modules/react-dom/cjs/react-dom.development.js", f.uri()]),
    "sri": lambda v, r, f: "sha384-" + base64.b64encode(r.randbytes(48)).decode(),
    "phone_like_number": lambda v, r, f: f"call number {r.randint(1, 9)} or press {r.randint(10, 99)}",
    "number_list": lambda v, r, f: " ".join(str(r.randint(1, 9999)) for _ in range(r.randint(3, 6))),
    "url": lambda v, r, f: f.url() + f.uri_path() + "?id=" + str(r.randint(1000, 99999)),
    "coordinates": lambda v, r, f: f"{f.latitude()}, {f.longitude()}",
}

_PII_TEMPLATES: dict[str, list[str]] = {
    "email": ["You can reach {name} at {v}.", "Contact: {v}", "Send the signed copy to {v} before Friday.",
              '{{"name": "{name}", "email": "{v}"}}', "| {name} | {v} | active |", "email: {v}\n",
              "The ticket was opened by {v} yesterday.", "Forwarding to <{v}> as requested."],
    "phone": ["Call {name} on {v} if anything breaks.", "Phone: {v}", "Her mobile number is {v}.",
              "You can reach the front desk at {v} (ext. 2).", '{{"phone": "{v}"}}', "| {name} | {v} |",
              "Tel. {v}\n", "Please text {v} when you arrive."],
    "card": ["The card on file is {v}, expiring 09/27.", "Card number: {v}", "Charge it to my Visa {v} please.",
             '{{"card_number": "{v}", "cvv": "***"}}', "Payment method: credit card {v}.", "| {name} | {v} |"],
    "iban": ["Please transfer the deposit to IBAN {v}.", "IBAN: {v}", "Bank details for {name}: {v} (BIC on request).",
             '{{"iban": "{v}"}}', "Wire it to {v} by Monday."],
    "ssn": ["{name}'s SSN is {v}.", "SSN: {v}", "Social Security Number {v} was on the form.",
            '{{"ssn": "{v}"}}'],
    "ip": ["The request came from {v} at noon.", "client_ip={v}", "Blocked address: {v}",
           "{name} logged in from {v}.", '{{"remote_addr": "{v}"}}'],
    "address": ["{name} lives at {v}, Springfield.", "Ship to: {v}", "The office moved to {v} last year.",
                "Address: {v}\n"],
}
_ID_TEMPLATES = ["{hint}: {v}", "My {hint} is {v}.", "{name} ({hint} {v}) signed the contract.",
                 '{{"{hint}": "{v}"}}']
_SECRET_TEMPLATES = ["Here is the key you asked for: {v}", "export TOKEN={v}\n", 'config = {{"api_key": "{v}"}}',
                     "Use {v} in the Authorization header.", "The deployment uses `{v}` for auth.",
                     "credentials:\n  value: {v}\n", "I found this in the logs: {v} - rotate it."]
_ENTROPY_TEMPLATES = ["api_key = '{v}'", "Authorization: Token {v}", "The client secret is {v}.",
                      'password: "{v}"', "session token {v}"]
_NEGATIVE_TEMPLATES = ["See {v} for details.", "Reference: {v}", "{v}", "The log shows {v} twice.",
                       "| {v} | ok |", "Note: {v}."]
_FILLER = ["The meeting moved to Thursday.", "Let me know if you need anything else.",
           "Here is a summary of the changes.", "All tests passed on the second run.",
           "I updated the configuration as discussed.", "This was fixed in the latest build.",
           "Thanks for waiting!", "The report is attached below."]


def generate(n: int = N_TEXTS, seed: int = SEED) -> list[dict[str, object]]:
    """``n`` labelled texts, reproducible for a given faker version."""
    v = _Values(seed)
    r = v.rng
    items: list[dict[str, object]] = []
    pii_kinds = list(PII_KINDS)
    for idx in range(n):
        b = _Builder()
        roll = r.random()
        group = "pii" if roll < 0.42 else "secret" if roll < 0.72 else "negative"
        if r.random() < 0.5:
            b.add(r.choice(_FILLER) + " ")
        for _ in range(1 if r.random() < 0.75 else 2):
            if group == "pii":
                kind = r.choice(pii_kinds)
                name = v.name()
                if kind == "national_id":
                    value, hint = v.national_id()
                    b.template(r.choice(_ID_TEMPLATES), "national_id", value, hint=hint, name=name)
                else:
                    value = getattr(v, kind)()
                    b.template(r.choice(_PII_TEMPLATES[kind]), kind, value, name=name)
                b.add(" ")
            elif group == "secret":
                if r.random() < 0.12:
                    b.template(r.choice(_ENTROPY_TEMPLATES), "high_entropy", v.generic_secret())
                    b.add(" ")
                else:
                    category, value = v.secret()
                    if category == "azure_storage_key":
                        key = value.split("AccountKey=", 1)[1].split(";", 1)[0]
                        pre, post = value.split(key)
                        b.add("Connection string: " + pre)
                        b.value(category, key)
                        b.add(post + "\n")
                    elif category == "database_url":
                        scheme_user, rest = value.split(":", 1)[0], value.split("://", 1)[1]
                        user, pw_host = rest.split(":", 1)
                        pw = pw_host.rsplit("@", 1)[0]
                        b.add(f"DATABASE_URL={scheme_user}://{user}:")
                        b.value(category, pw)
                        b.add(value[len(f"{scheme_user}://{user}:{pw}") :] + "\n")
                    elif category == "aws_access_key" and r.random() < 0.5:
                        secret = _rand_token(r, _B64, 40)
                        b.add("aws_access_key_id = ")
                        b.value(category, value)
                        b.add("\naws_secret_access_key = ")
                        b.value("aws_secret_key", secret)
                        b.add("\n")
                    else:
                        b.template(r.choice(_SECRET_TEMPLATES), category, value)
                    b.add(" ")
            if r.random() < 0.5:
                b.add(" " + r.choice(_FILLER) + " ")
        n_neg = r.randint(1, 3) if group == "negative" else r.randint(0, 2)
        for _ in range(n_neg):
            _kind, frag = v.negative()
            b.add(" " + r.choice(_NEGATIVE_TEMPLATES).format(v=frag) + " ")
        items.append(b.item(idx, group))
    return items


def write(items: list[dict[str, object]], path: Path = DATA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps(it, ensure_ascii=False) + "\n")


def load(path: Path = DATA) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class Score:
    tp: int = 0  # findings that overlap a label of their kind
    fp: int = 0
    recalled: int = 0
    labels: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.recalled / self.labels if self.labels else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _merge_pieces(found: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for kind, s, e in sorted(found, key=lambda x: (x[1], x[2])):
        if out and out[-1][0] == kind and out[-1][2] == s:
            out[-1] = (kind, out[-1][1], e)
        else:
            out.append((kind, s, e))
    return out


def findings_for(text: str, pii_detector: Detector, secrets_detector: Detector) -> list[tuple[str, int, int]]:
    """(category, start, end) of every finding of both detectors on ``text``, fed whole."""
    from detectors.base import TEXT, RequestContext, StreamEnd

    ctx = RequestContext()
    found: list[tuple[str, int, int]] = []
    for det in (pii_detector, secrets_detector):
        state = det.start(ctx)
        fs = state.feed(TEXT, text) + state.finish(TEXT, StreamEnd("stop"))
        found += [(f.category, f.span[0], f.span[1]) for f in fs if f.span]
    return _merge_pieces(found)


def _group(kind: str) -> str | None:
    from detectors.secrets import PROVIDER_CATEGORIES

    return "provider_keys" if kind in PROVIDER_CATEGORIES else None


def evaluate(items: list[dict[str, object]], pii_detector: Detector | None = None,
             secrets_detector: Detector | None = None) -> dict[str, Score]:
    from detectors.pii import KINDS, PiiConfig
    from detectors.secrets import SecretsConfig

    pii_detector = pii_detector or PiiConfig(kinds=KINDS).build()
    secrets_detector = secrets_detector or SecretsConfig().build()
    scores: dict[str, Score] = defaultdict(Score)

    def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] < b[1] and b[0] < a[1]

    for it in items:
        text = str(it["text"])
        labels = [(str(lab["kind"]), int(lab["start"]), int(lab["end"])) for lab in it["labels"]]  # type: ignore[index,union-attr,attr-defined]
        found = findings_for(text, pii_detector, secrets_detector)
        for kind, s, e in labels:
            for key in {kind, _group(kind)} - {None}:
                sc = scores[key]  # type: ignore[index]
                sc.labels += 1
                if any((fk == kind or (key == "provider_keys" and _group(fk) == key)) and overlaps((s, e), (fs, fe))
                       for fk, fs, fe in found):
                    sc.recalled += 1
        for fk, fs, fe in found:
            for key in {fk, _group(fk)} - {None}:
                hit = any((lk == fk or (key == "provider_keys" and _group(lk) == key)) and overlaps((s, e), (fs, fe))
                          for lk, s, e in labels)
                if hit:
                    scores[key].tp += 1  # type: ignore[index]
                else:
                    scores[key].fp += 1  # type: ignore[index]
    return dict(scores)


def report(scores: dict[str, Score], n_texts: int) -> str:
    where = DATA.relative_to(Path.cwd()) if DATA.is_relative_to(Path.cwd()) else DATA
    lines = [f"leakage evaluation: {n_texts} texts ({where})",
             f"{'kind':22s} {'labels':>6s} {'found':>6s} {'prec':>6s} {'recall':>6s} {'F1':>6s}"]
    order = [*PII_KINDS, "provider_keys"]
    rest = sorted(k for k in scores if k not in order)
    for kind in [*order, *rest]:
        sc = scores.get(kind)
        if sc is None:
            continue
        target = "  target" if kind in TARGET_KINDS else ""
        lines.append(f"{kind:22s} {sc.labels:6d} {sc.tp + sc.fp:6d} {sc.precision:6.3f} {sc.recall:6.3f} "
                     f"{sc.f1:6.3f}{target}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generate", action="store_true", help="regenerate the JSONL before scoring")
    parser.add_argument("--subset", type=int, default=1, help="score every N-th text only")
    args = parser.parse_args(argv)
    if args.generate or not DATA.exists():
        write(generate())
    items = load()[:: args.subset]
    scores = evaluate(items)
    print(report(scores, len(items)))
    missed = [k for k in TARGET_KINDS if k in scores and (scores[k].precision < TARGET or scores[k].recall < TARGET)]
    if missed:
        print(f"below the {TARGET:.2f} target: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
