//! A minimal pyo3 binding of smg's `kv_index::StringTree`, so that the peer benchmark can
//! time it from Python exactly as it times the other trees (one call per op, the call
//! overhead included, as a Python gateway would pay it). Benchmarks only.
//!
//! `build.sh` assembles the crate: smg's `string_tree.rs`, `common.rs` and `snapshot.rs`,
//! its `RadixTree` trait (from its `lib.rs`), and this file as the crate root.

mod common;
pub mod snapshot;
mod string_tree;
include!("radix_trait.rs");

pub use common::{MatchResult, TenantId};
use pyo3::prelude::*;

/// smg's tree, one instance per benchmark process.
#[pyclass]
struct StringTree {
    tree: string_tree::Tree,
}

#[pymethods]
impl StringTree {
    #[new]
    fn new() -> Self {
        StringTree { tree: string_tree::Tree::new() }
    }

    /// `insert_text(text, tenant)`.
    fn insert(&self, text: &str, tenant: &str) {
        self.tree.insert_text(text, tenant)
    }

    /// `match_prefix_with_counts(text)`: `(matched chars, tenant)`.
    fn prefix_match(&self, text: &str) -> (usize, String) {
        let r = self.tree.match_prefix_with_counts(text);
        (r.matched_char_count, r.tenant.to_string())
    }

    /// The fused `match_and_insert(text, tenant)`: `(matched chars, tenant)`.
    fn match_and_insert(&self, text: &str, tenant: &str) -> (usize, String) {
        let r = self.tree.match_and_insert(text, tenant);
        (r.matched_char_count, r.tenant.to_string())
    }
}

#[pymodule]
fn smg_tree(_py: Python, m: &PyModule) -> PyResult<()> {
    m.add_class::<StringTree>()?;
    m.add("SMG_COMMIT", option_env!("SMG_COMMIT").unwrap_or("unknown"))?;
    Ok(())
}
