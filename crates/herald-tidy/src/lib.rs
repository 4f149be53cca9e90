//! The architecture's invariants (ARCHITECTURE.md) as checks over the workspace's own
//! sources, parsed with `syn` rather than searched as text, so that nested `use` groups,
//! `super::` paths and code after an inline test module are all seen.
//!
//! # Layout
//! - `modules`: each crate's module graph, and its check against the order the
//!   crate's own docs give (`# Layout` in `lib.rs` / `main.rs`: every module may use
//!   only the modules listed after it).
//! - `boundaries`: which crates may write Herald's wire frames (herald-protocol) and
//!   speak Redis (herald-redis).
//!
//! The checks run as this crate's tests (`tests/workspace.rs`); each has unit tests here
//! showing that it catches a violation.

pub mod boundaries;
pub mod modules;

use std::path::{Path, PathBuf};

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/herald-tidy is two levels down")
        .to_path_buf()
}

/// Whether an item carries `#[cfg(test)]` (test code is outside the architecture's
/// rules: it may reach into anything to test it).
pub(crate) fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// The `.rs` files under `dir`, recursively, sorted.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
