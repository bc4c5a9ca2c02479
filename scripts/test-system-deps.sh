#!/usr/bin/env bash
# The system programs the test suite starts or calls, installed from Debian when missing.
# `make test` runs this before the tests: as root it installs what is missing with apt-get
# (only that); otherwise it stops with one message naming the install command, so a missing
# program is never discovered as a dozen failing tests. Uses shell builtins only (command -v),
# apt-get and nothing else, so it runs on a bare machine.
set -euo pipefail

# program:Debian package
NEEDED=(
  prometheus:prometheus                 # Prometheus scrapes gapwatch in integration tests
  promtool:prometheus                   # rule unit tests, config checks
  prometheus-alertmanager:prometheus-alertmanager
  amtool:prometheus-alertmanager        # Alertmanager config check
  redis-server:redis-server             # shared-state tests
  docker-compose:docker-compose         # parses deploy/compose.yaml (no Docker engine needed)
  chromium:chromium                     # report and dashboard tests, headless
)
# programs no Debian package provides at the version the tests need
NOT_FROM_APT=(
  "kubectl:ships with this machine image (Debian's kubernetes-client 1.20 is too old for kustomize components)"
)

missing_pkgs=()
missing_bins=()
for entry in "${NEEDED[@]}"; do
  bin=${entry%%:*}
  pkg=${entry#*:}
  if ! command -v "$bin" >/dev/null 2>&1; then
    missing_bins+=("$bin")
    [[ " ${missing_pkgs[*]} " == *" $pkg "* ]] || missing_pkgs+=("$pkg")
  fi
done
unavailable=()
for entry in "${NOT_FROM_APT[@]}"; do
  command -v "${entry%%:*}" >/dev/null 2>&1 || unavailable+=("${entry%%:*} (${entry#*:})")
done

if [ ${#unavailable[@]} -gt 0 ]; then
  echo "make test: missing, and not installable with apt-get: ${unavailable[*]}" >&2
  exit 1
fi
[ ${#missing_pkgs[@]} -eq 0 ] && exit 0

install_cmd="apt-get update && apt-get install -y --no-install-recommends ${missing_pkgs[*]}"
if [ "${EUID}" -ne 0 ]; then
  echo "make test needs ${missing_bins[*]}; install them first: sudo sh -c '${install_cmd}'" >&2
  exit 1
fi
echo "make test: installing ${missing_pkgs[*]} (for ${missing_bins[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
for bin in "${missing_bins[@]}"; do
  if ! command -v "$bin" >/dev/null 2>&1; then
    echo "make test: apt-get installed ${missing_pkgs[*]} but $bin is still not on PATH" >&2
    exit 1
  fi
done
