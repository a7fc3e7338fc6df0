#!/usr/bin/env bash
# The gateway's CPU per request, before and after a change, in one run (ratios are what
# count on a noisy machine). Usage, from the repository root:
#
#   bash benchmarks/e2e/overhead.sh [BEFORE_COMMIT]     # default: bb66d03 (httpx gateway)
#
# It makes two scratch venvs (VENVS, default $HOME/.cache/cacheroute-overhead): "base" with
# the examples extra only, and "fast" with uvloop and httptools added, and runs
# benchmarks/e2e/compare.py's "cpu c=1" and "cpu c=32" scenarios (three fake engines with no
# prefill or decode time, ~6,000-character chat prompts, cache_aware) for:
#   before       the gateway of BEFORE_COMMIT, with the dependencies it shipped with
#   after        this checkout's gateway, examples extra only
#   after+fast   this checkout's gateway with uvloop and httptools (picked up by uvicorn)
set -euo pipefail
cd "$(dirname "$0")/../.."
BEFORE=${1:-bb66d03}
V=${VENVS:-$HOME/.cache/cacheroute-overhead}
mkdir -p "$V"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git show "$BEFORE:examples/gateway.py" > "$scratch/gateway_before.py"

if [[ ! -x "$V/before/bin/python" ]]; then   # the old extra, plus aiohttp for load.py
  python3 -m venv "$V/before"
  "$V/before/bin/pip" install -q -e . 'starlette>=0.37' 'uvicorn>=0.29' 'httpx>=0.27' 'aiohttp>=3.10'
fi
if [[ ! -x "$V/base/bin/python" ]]; then
  python3 -m venv "$V/base"
  "$V/base/bin/pip" install -q -e '.[examples]'
fi
if [[ ! -x "$V/fast/bin/python" ]]; then
  python3 -m venv "$V/fast"
  "$V/fast/bin/pip" install -q -e '.[examples]' uvloop httptools
fi
run() {  # label venv [compare.py args]
  local label=$1 venv=$2; shift 2
  echo "== $label"
  "$V/$venv/bin/python" benchmarks/e2e/compare.py --routers ours \
    --scenarios "cpu c=1,cpu c=32" "$@" 2>/dev/null | grep '^| ours'
}
run "before ($BEFORE)" before --gateway-script "$scratch/gateway_before.py"
run "after" base
run "after+fast (uvloop, httptools)" fast
