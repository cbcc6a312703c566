#!/bin/sh
# Run every benchmark in bench/ in turn; each prints its own table and compares against
# the reference tool in the same run. Results are summarised in docs/benchmarks.md.
set -eu
cd "$(dirname "$0")"
for script in *_bench.py agent_overhead.py; do
  [ -f "$script" ] || continue
  echo "== $script"
  python3 "$script" "$@"
done
