"""``make test`` sets itself up on a fresh machine: the Debian programs the suite needs are
installed when missing (as root, with apt-get, only those), and without root it stops before
any test with one message naming the install command. ``.ci/run`` only calls ``make test``.

Each case runs ``make test-deps`` in a copy of the repository's Makefile and script whose PATH
holds only ``bash``, ``make`` and a fake ``apt-get`` that records what it was asked and, on
``install``, provides stub programs (so the script's check after installing can pass): the
machine's real programs are absent, as on a fresh machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALL_PACKAGES = ["prometheus", "prometheus-alertmanager", "redis-server", "docker-compose", "chromium"]
PROVIDES = {"prometheus": ["prometheus", "promtool"], "prometheus-alertmanager": ["prometheus-alertmanager", "amtool"],
            "redis-server": ["redis-server"], "docker-compose": ["docker-compose"], "chromium": ["chromium"]}

FAKE_APT = """#!/bin/bash
echo "$*" >> "{log}"
if [ "$1" = install ]; then
  for arg in "$@"; do
    case "$arg" in
{cases}
    esac
  done
fi
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@contextlib.contextmanager
def fresh_clone(present: tuple[str, ...] = ()) -> Iterator[tuple[Path, Path, Path]]:
    """(clone, bin, apt log): a world-readable copy of what ``make test-deps`` needs, and a bin
    directory with bash, make, the fake apt-get, kubectl (it ships with the machine image) and
    stubs for the programs in ``present``."""
    top = Path(tempfile.mkdtemp(prefix="gapwatch-fresh-"))
    try:
        top.chmod(0o755)  # readable by the unprivileged user of the non-root case
        clone, bindir = top / "clone", top / "bin"
        (clone / "scripts").mkdir(parents=True)
        bindir.mkdir()
        shutil.copy(ROOT / "Makefile", clone / "Makefile")
        shutil.copy(ROOT / "scripts" / "test-system-deps.sh", clone / "scripts" / "test-system-deps.sh")
        for tool in ("bash", "make"):
            found = shutil.which(tool)
            assert found, f"{tool} is needed to run this test"
            (bindir / tool).symlink_to(found)
        log = top / "apt.log"
        cases = "\n".join(f"      {pkg}) " + " ".join(f'printf "#!/bin/sh\\n" > "{bindir}/{b}"; /bin/chmod 755 '
                                                       f'"{bindir}/{b}";' for b in bins) + " ;;"
                          for pkg, bins in PROVIDES.items())
        _executable(bindir / "apt-get", FAKE_APT.format(log=log, cases=cases))
        for name in ("kubectl", *present):
            _executable(bindir / name, "#!/bin/sh\n")
        for p in (clone, clone / "scripts", bindir):
            p.chmod(p.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        yield clone, bindir, log
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run_make(clone: Path, bindir: Path, as_user: str | None = None,
             target: str = "test-deps") -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bindir), "HOME": "/tmp", "LANG": "C"}
    cmd = [str(bindir / "make"), "--no-print-directory", "-C", str(clone), target]
    if as_user is not None:
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        cmd = [runuser, "-u", as_user, "--", "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the install path runs as root (CI runs as root)")


def test_as_root_every_missing_package_is_installed_with_apt_get():
    require_root()
    with fresh_clone() as (clone, bindir, log):
        res = run_make(clone, bindir)
        assert res.returncode == 0, res.stdout + res.stderr
        calls = log.read_text().splitlines()
        assert calls[0] == "update -qq"
        assert calls[1].split() == ["install", "-y", "-qq", "--no-install-recommends", *ALL_PACKAGES]
        assert len(calls) == 2
        assert "make test: installing" in res.stdout
        for bins in PROVIDES.values():
            assert all((bindir / b).exists() for b in bins)  # what the script checked afterwards


def test_as_root_only_the_missing_packages_are_installed():
    require_root()
    with fresh_clone(present=("prometheus", "promtool", "chromium")) as (clone, bindir, log):
        res = run_make(clone, bindir)
        assert res.returncode == 0, res.stdout + res.stderr
        install = log.read_text().splitlines()[1].split()
        assert install[4:] == ["prometheus-alertmanager", "redis-server", "docker-compose"]


def test_nothing_happens_when_everything_is_there():
    every = tuple(b for bins in PROVIDES.values() for b in bins)
    with fresh_clone(present=every) as (clone, bindir, log):
        res = run_make(clone, bindir)
        assert res.returncode == 0, res.stdout + res.stderr
        assert not log.exists() and res.stdout == "" and res.stderr == ""


def test_without_root_it_stops_with_one_message_naming_the_install_command():
    user = "nobody" if os.geteuid() == 0 else None
    with fresh_clone(present=("redis-server",)) as (clone, bindir, log):
        res = run_make(clone, bindir, as_user=user)
        assert res.returncode != 0
        assert not log.exists(), "apt-get must not run without root"
        message = [line for line in res.stderr.splitlines() if line.startswith("make test needs")]
        assert len(message) == 1, res.stderr
        assert "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager docker-compose " \
               "chromium" in message[0]
        assert "redis-server" not in message[0].split("install")[-1]  # only what is missing


def test_kubectl_missing_is_named_not_guessed():
    every = tuple(b for bins in PROVIDES.values() for b in bins)
    with fresh_clone(present=every) as (clone, bindir, log):
        (bindir / "kubectl").unlink()
        res = run_make(clone, bindir)
        assert res.returncode != 0 and "kubectl" in res.stderr and not log.exists()


def test_make_test_runs_the_setup_first_and_ci_holds_no_install_logic():
    res = subprocess.run(["make", "--no-print-directory", "-n", "-C", str(ROOT), "test"], capture_output=True,
                         text=True, timeout=60, check=False)
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert lines and lines[0] == "bash scripts/test-system-deps.sh", res.stdout
    assert any("pytest" in line for line in lines)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "apt-get" not in ci and "command -v" not in ci


def test_make_test_on_a_fresh_clone_installs_first_as_root():
    """``make test`` itself (not only its first step): the install runs before anything else;
    the clone has no Python on PATH, so what follows (the venv) is where it then stops."""
    require_root()
    with fresh_clone() as (clone, bindir, log):
        res = run_make(clone, bindir, target="test")
        calls = log.read_text().splitlines()
        assert calls[0] == "update -qq" and calls[1].startswith("install "), calls
        assert res.stdout.splitlines()[0].startswith("make test: installing prometheus"), res.stdout
        assert "pytest" not in res.stdout  # no test ran on a half-set-up machine


def test_make_test_on_a_fresh_clone_stops_before_the_tests_without_root():
    user = "nobody" if os.geteuid() == 0 else None
    with fresh_clone() as (clone, bindir, log):
        res = run_make(clone, bindir, as_user=user, target="test")
        assert res.returncode != 0 and not log.exists()
        assert [line for line in res.stderr.splitlines() if line.startswith("make test needs")], res.stderr
        assert not (clone / ".venv").exists(), "nothing after the check ran"
