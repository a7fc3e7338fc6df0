#!/usr/bin/env bash
# Build smg's Rust `kv_index::StringTree` (SGLang's gateway tree) as a Python module,
# `smg_tree`, for the side-by-side tree benchmark (peer_bench.sh). Benchmarks only.
#
#   SMG_REPO=/path/to/smg bash benchmarks/smg_tree/build.sh    # prints the module's directory
#
# smg's source is copied into a scratch crate at build time and never into this repository:
# SMG_REPO is a clone (or bare git dir) of https://github.com/lightseekorg/smg (default:
# cloned into the scratch dir), SMG_REV the commit (default HEAD). The scratch dir is
# SMG_TREE_DIR (default $HOME/.cache/smg-tree).
#
# Crates: from crates.io, or, where crates.io is unreachable, from Debian's packaged crates
# (CRATES=debian; the default when /usr/share/cargo/registry holds dashmap):
#   apt-get install librust-dashmap-dev librust-parking-lot-dev librust-once-cell-dev \
#     librust-tracing-dev librust-serde-derive-dev librust-bincode-dev librust-pyo3-dev
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT=${SMG_TREE_DIR:-$HOME/.cache/smg-tree}
REV=${SMG_REV:-HEAD}
REG=/usr/share/cargo/registry
if [[ -z "${CRATES:-}" ]]; then
  if compgen -G "$REG/dashmap-*" >/dev/null; then CRATES=debian; else CRATES=crates.io; fi
fi
mkdir -p "$OUT"
REPO=${SMG_REPO:-$OUT/smg}
if [[ -z "${SMG_REPO:-}" && ! -e "$REPO" ]]; then
  git clone -q --filter=blob:none https://github.com/lightseekorg/smg "$REPO"
fi
git -C "$REPO" rev-parse -q --verify "$REV^{commit}" >/dev/null ||
  { echo "smg_tree: $REPO has no commit $REV" >&2; exit 2; }
COMMIT=$(git -C "$REPO" rev-parse --short=12 "$REV")

CRATE="$OUT/crate"
rm -rf "$CRATE"
mkdir -p "$CRATE/src" "$CRATE/.cargo"
cp "$HERE/Cargo.toml" "$CRATE/"
cp "$HERE/src/binding.rs" "$CRATE/src/"
for f in string_tree common snapshot; do
  git -C "$REPO" show "$REV:crates/kv_index/src/$f.rs" > "$CRATE/src/$f.rs"
done
# the RadixTree trait string_tree.rs implements, as smg's lib.rs defines it
git -C "$REPO" show "$REV:crates/kv_index/src/lib.rs" |
  sed -n '/^pub trait RadixTree/,/^}/p' > "$CRATE/src/radix_trait.rs"
[[ -s "$CRATE/src/radix_trait.rs" ]] ||
  { echo "smg_tree: no 'pub trait RadixTree' in $REV:crates/kv_index/src/lib.rs" >&2; exit 2; }
if [[ "$CRATES" == debian ]]; then
  printf '[source.crates-io]\nreplace-with = "debian"\n[source.debian]\ndirectory = "%s"\n[net]\noffline = true\n' \
    "$REG" > "$CRATE/.cargo/config.toml"
fi
(cd "$CRATE" && SMG_COMMIT="$COMMIT" PYO3_PYTHON="${PYO3_PYTHON:-$(command -v python3)}" \
  cargo build -q --release 2> build.log) ||
  { tail -30 "$CRATE/build.log" >&2; echo "smg_tree: cargo build failed (crates: $CRATES)" >&2; exit 2; }
mkdir -p "$OUT/module"
cp "$CRATE/target/release/libsmg_tree.so" "$OUT/module/smg_tree.so"
echo "$OUT/module"
