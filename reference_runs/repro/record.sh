#!/usr/bin/env bash
# Records reference_runs/repro/ (checked by tests/test_reference_runs.py): one short run of
# config.json in float32 (bit-exact on machines with the same fingerprint), the same run in
# float64 (the guard that holds on every machine), and the recording machine's fingerprint.
set -euo pipefail
cd "$(dirname "$0")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m minispatial train --config config.json --out "$tmp/f32" --quiet >/dev/null
cp "$tmp/f32/summary.json" summary.json
python -m minispatial train --config config.json --dtype float64 --out "$tmp/f64" --quiet >/dev/null
cp "$tmp/f64/config.json" float64.config.json
cp "$tmp/f64/summary.json" float64.summary.json
python -m minispatial.machine > machine.json
