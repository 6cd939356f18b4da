#!/usr/bin/env bash
# Runs scripts/install.sh unless it already ran for this pyproject.toml and install script: the stamp
# file holds a hash of both, so `make serve` restarts in a moment and a dependency change reinstalls.
#   scripts/ensure-installed.sh          Python packages (what `make serve` needs)
#   scripts/ensure-installed.sh --force  install even when the stamp matches (`make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.install-stamp
key=$( { cat pyproject.toml scripts/install.sh; command -v python3; } | sha256sum | cut -d' ' -f1)
if [ "${1:-}" != "--force" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
echo "servelm: installing Python packages (scripts/install.sh; about 2 minutes on a fresh machine)" >&2
rm -f "$stamp"
bash scripts/install.sh
echo "$key" > "$stamp"
