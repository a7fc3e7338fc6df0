#!/usr/bin/env bash
# Reproduces the balance_abs_threshold table in docs/policies/cache_aware.md:
# cache_aware at N = 4, 8, 16, 32 against shortest_queue on the built-in workloads and the
# shared traces, 8 workers, seed 0.  Usage: bash benchmarks/sweep_balance_threshold.sh [TRACES_DIR]
set -euo pipefail
traces=${1:-../shared/traces}
policies='cache_aware[balance_abs_threshold=4],cache_aware[balance_abs_threshold=8],cache_aware[balance_abs_threshold=16],cache_aware[balance_abs_threshold=32],shortest_queue'
run() { cacheroute simulate --workers 8 --seed 0 --progress off --policies "$policies" "$@"; }
run --workload default
run --workload shared_prefix
run --trace "$traces/mooncake/conversation_trace.jsonl.gz" --format mooncake
run --trace "$traces/claude_code/claude_code_traces.jsonl.gz" --format claude_code --limit 12000
