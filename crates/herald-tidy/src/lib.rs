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

/// Struct fields and enum variants in `source` without a doc comment, outside test
/// code: `(line, name)`.
pub fn undocumented(source: &str) -> Result<Vec<(usize, String)>, String> {
    use syn::visit::Visit;
    struct V(Vec<(usize, String)>);
    fn documented(attrs: &[syn::Attribute]) -> bool {
        attrs.iter().any(|a| a.path().is_ident("doc"))
    }
    impl<'ast> Visit<'ast> for V {
        fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
            if !is_test(&m.attrs) {
                syn::visit::visit_item_mod(self, m);
            }
        }
        fn visit_item_fn(&mut self, _: &'ast syn::ItemFn) {}
        fn visit_item_struct(&mut self, s: &'ast syn::ItemStruct) {
            if is_test(&s.attrs) {
                return;
            }
            for f in &s.fields {
                if let (Some(name), false) = (&f.ident, documented(&f.attrs)) {
                    let line = name.span().start().line;
                    self.0.push((line, format!("{}.{name}", s.ident)));
                }
            }
        }
        fn visit_item_enum(&mut self, e: &'ast syn::ItemEnum) {
            if is_test(&e.attrs) {
                return;
            }
            for v in &e.variants {
                if !documented(&v.attrs) {
                    let line = v.ident.span().start().line;
                    self.0.push((line, format!("{}::{}", e.ident, v.ident)));
                }
            }
        }
    }
    let file = syn::parse_file(source).map_err(|e| e.to_string())?;
    let mut v = V(Vec::new());
    v.visit_file(&file);
    Ok(v.0)
}

/// The modules a crate root declares out of line under `#[cfg(test)]` (whole files of
/// test code, such as herald-server's property tests).
pub fn test_modules(root_source: &str) -> Result<Vec<String>, String> {
    let file = syn::parse_file(root_source).map_err(|e| e.to_string())?;
    Ok(file
        .items
        .iter()
        .filter_map(|i| match i {
            syn::Item::Mod(m) if is_test(&m.attrs) && m.content.is_none() => {
                Some(m.ident.to_string())
            }
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn undocumented_fields_and_variants_are_found() {
        let src = "
            struct A {
                /// Why.
                a: u8,
                b: u8,
            }
            enum E {
                /// Why.
                X,
                Y,
            }
            #[cfg(test)]
            mod tests { struct T { t: u8 } }
        ";
        let names: Vec<String> = super::undocumented(src)
            .unwrap()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(names, ["A.b", "E::Y"]);
    }
}
