#!/usr/bin/env bash
# The peer tree benchmark (../shared/peer-bench) with smg's Rust StringTree added beside
# Ray's, Dynamo's and pygtrie: rows `smg` (W1/W2/W3) and `smg-fused` (W2, its
# match_and_insert), same workloads, same fresh-process-per-run timing, same-rep ratios.
#
#   bash benchmarks/smg_tree/build.sh                         # once (see its header)
#   REPS=3 GC_REPS=0 bash benchmarks/smg_tree/peer_bench.sh   # from the checkout; measures HEAD
#
# The harness is copied into a scratch dir and patched there (an adapter for the `smg_tree`
# module built by build.sh, and its cells); PEER_BENCH (default ../shared/peer-bench) is
# left as it is. Every other knob (REPS, GC_REPS, PEERS_DIR, PROJECT...) is run_all.sh's.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SRC=${PEER_BENCH:-$(pwd)/../shared/peer-bench}
MOD=${SMG_TREE_DIR:-$HOME/.cache/smg-tree}/module
[[ -f "$SRC/run_all.sh" ]] || { echo "smg peer bench: no run_all.sh in $SRC (set PEER_BENCH)" >&2; exit 2; }
[[ -f "$MOD/smg_tree.so" ]] || { echo "smg peer bench: no $MOD/smg_tree.so: run build.sh first" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp "$SRC"/*.py "$SRC"/run_all.sh "$WORK/"
chmod u+w "$WORK"/*
python3 - "$WORK" <<'PY'
import sys

work = sys.argv[1]


def patch(name: str, edits: list[tuple[str, str]]) -> None:
    path = f"{work}/{name}"
    text = open(path).read()
    for old, new in edits:
        if text.count(old) != 1:
            sys.exit(f"smg peer bench: {name} changed; cannot find {old!r} once")
        text = text.replace(old, new)
    open(path, "w").write(text)


ADAPTER = '''
def make_smg(tenants: list[str]) -> dict:
    import smg_tree  # benchmarks/smg_tree/build.sh

    t = smg_tree.StringTree()

    def conv(r: tuple, text: str) -> tuple[int, set | None]:
        n, ten = r
        return n, ({ten} if n else None)

    def fconv(r: tuple, text: str) -> tuple[int, set | None]:
        n, ten = r
        return n, {ten}

    return {"obj": t, "insert": t.insert, "match": t.prefix_match, "conv": conv,
            "fused": t.match_and_insert, "fconv": fconv,
            "version": f"smg kv_index::StringTree {smg_tree.SMG_COMMIT} (pyo3 binding)"}


def exp_ok('''
patch("bench_py.py", [
    ("\ndef exp_ok(", ADAPTER),
    ('fused = args.peer == "ours-fused"', 'fused = args.peer in ("ours-fused", "smg-fused")'),
    ('"dynamo": make_dynamo,\n', '"dynamo": make_dynamo,\n        "smg": make_smg,\n'
                                 '        "smg-fused": make_smg,\n'),
])
patch("run_all.sh", [
    ('  CELLS+=("py ours $w" "py ray $w")', '  CELLS+=("py ours $w" "py smg $w" "py ray $w")'),
    ('  [[ $w == w2 ]] && CELLS+=("py ours-fused w2")',
     '  [[ $w == w2 ]] && CELLS+=("py ours-fused w2" "py smg-fused w2")'),
])
patch("summarize.py", [
    ('"smg": "SGLang → smg `kv_index::StringTree` (Rust, 2026-08)"',
     '"smg": "SGLang → smg `kv_index::StringTree` (Rust via pyo3, this run)"'),
])
PY
PYTHONPATH="$MOD${PYTHONPATH:+:$PYTHONPATH}" bash "$WORK/run_all.sh"
