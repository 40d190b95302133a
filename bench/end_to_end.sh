#!/usr/bin/env bash
# Time the README's main command (`make repro`) from nothing in a fresh temporary clone, under /usr/bin/time -v.
#
#   bash bench/end_to_end.sh            # reuses this checkout's .venv (set-up is not what is measured)
#   FRESH_VENV=1 bash bench/end_to_end.sh   # include the venv set-up in the measurement
#
# Prints a table and, as the last line, {"wall_s": ..., "peak_rss_mb": ...}. Peak RSS is the largest single process
# of the run (what /usr/bin/time reports for the process tree's biggest member), not the sum over processes.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git clone -q "$src" "$tmp/repo"
[ -d "$src/../shared" ] && ln -s "$(realpath "$src/../shared")" "$tmp/shared"
cd "$tmp/repo"
make_args=()
if [ "${FRESH_VENV:-0}" != "1" ]; then
  # Use this checkout's venv as it is (-o: never re-run its set-up, which would re-point its editable install at
  # this temporary clone); the measurement is the pipeline. This clone's code goes first on the path.
  make_args=(VENV="$src/.venv" -o "$src/.venv/.campe-installed")
  export PYTHONPATH="$tmp/repo"
fi
/usr/bin/time -v -o "$tmp/time.txt" make "${make_args[@]}" repro > "$tmp/repro.log" 2>&1 || { tail -30 "$tmp/repro.log"; exit 1; }
wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$tmp/time.txt")
rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tmp/time.txt")
python3 - "$wall" "$rss_kb" <<'PY'
import json, sys
wall, rss_kb = sys.argv[1], int(sys.argv[2])
parts = [float(x) for x in wall.split(":")]
secs = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
print(f"{'what':<28}{'value':>12}")
print(f"{'make repro wall (s)':<28}{secs:>12.1f}")
print(f"{'peak RSS (MB)':<28}{rss_kb / 1024:>12.1f}")
print(json.dumps({"wall_s": round(secs, 1), "peak_rss_mb": round(rss_kb / 1024, 1)}))
PY
