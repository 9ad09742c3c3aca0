#!/usr/bin/env bash
# Writes packaging/deb/requirements.lock and packaging/deb/build-requirements.lock: every
# distribution the .deb's virtualenv holds, pinned with the sha256 of the file pip chose for
# Debian 12's python3.11 on this architecture. build.sh installs only these (--require-hashes),
# so a rebuild holds the same files. Run it after a change to the dependencies in pyproject.toml.
# Usage: packaging/deb/lock.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=/usr/bin/python3.11
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"

# What `pip install .[journald]` would install, with the hash of each file it would fetch.
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --dry-run --ignore-installed \
    --report "$work/runtime.json" '.[journald]'
# The build backends of gatewayd and systemd-python (an sdist): build.sh builds without isolation.
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --dry-run --ignore-installed \
    --report "$work/build.json" 'setuptools>=68' wheel

write_lock() {
    "$PYTHON" - "$1" "$2" <<'PY'
import json
import sys

report, header = json.load(open(sys.argv[1])), sys.argv[2]
lines = []
for item in report["install"]:
    meta = item["metadata"]
    if meta["name"] == "gatewayd":
        continue
    digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
    lines.append(f"{meta['name'].lower()}=={meta['version']} \\\n    --hash=sha256:{digest}")
print(header)
print("\n".join(sorted(lines)))
PY
}
header="# Written by packaging/deb/lock.sh; do not edit."
write_lock "$work/runtime.json" "$header" > packaging/deb/requirements.lock
write_lock "$work/build.json" "$header" > packaging/deb/build-requirements.lock
