//! A crate's module graph and the documented order of its modules.
//!
//! Every crate root (`lib.rs`, `main.rs`) documents its modules in a `# Layout` section,
//! one bullet per top-level module, in order: a module may refer only to modules listed
//! after it (so the graph has no cycle, and a reader learns the crate top-down). A
//! reference is any path through `crate::`, `super::` or `self::` (in `use` trees,
//! nested groups included, and in code), outside `#[cfg(test)]` items and test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use syn::visit::Visit;

/// Top-level module → the top-level modules it refers to.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The graph of the module tree rooted at `root` (a `lib.rs` or `main.rs`): files are
/// found the way rustc finds them (`name.rs` or `name/mod.rs` next to the parent).
pub fn graph_of_root(root: &Path) -> Result<Graph, String> {
    let mut graph = Graph::new();
    let dir = root.parent().expect("a file has a directory");
    let text = std::fs::read_to_string(root).map_err(|e| format!("{}: {e}", root.display()))?;
    walk(&text, root, dir, &[], &mut graph)?;
    Ok(graph)
}

/// The graph of one file's source, as the module at `path` (for tests).
pub fn graph_of_source(text: &str, path: &[&str]) -> Result<Graph, String> {
    let mut graph = Graph::new();
    let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
    let file = syn::parse_file(text).map_err(|e| e.to_string())?;
    collect(&file.items, &path, &mut graph, None);
    Ok(graph)
}

fn walk(
    text: &str,
    file: &Path,
    dir: &Path,
    path: &[String],
    graph: &mut Graph,
) -> Result<(), String> {
    let parsed = syn::parse_file(text).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut children = Vec::new();
    collect(&parsed.items, path, graph, Some(&mut children));
    for child in children {
        let candidates = [
            dir.join(format!("{child}.rs")),
            dir.join(&child).join("mod.rs"),
        ];
        let Some(found) = candidates.iter().find(|p| p.exists()) else {
            return Err(format!("{}: module {child} not found", file.display()));
        };
        let sub_dir = if found.ends_with("mod.rs") {
            found.parent().expect("has a parent").to_path_buf()
        } else {
            dir.join(&child)
        };
        let text =
            std::fs::read_to_string(found).map_err(|e| format!("{}: {e}", found.display()))?;
        let mut sub = path.to_vec();
        sub.push(child);
        walk(&text, found, &sub_dir, &sub, graph)?;
    }
    Ok(())
}

/// Records the references made by `items` (in the module at `path`); out-of-line
/// non-test `mod` declarations are pushed to `children`.
fn collect(
    items: &[syn::Item],
    path: &[String],
    graph: &mut Graph,
    mut children: Option<&mut Vec<String>>,
) {
    for item in items {
        if let syn::Item::Mod(m) = item {
            if crate::is_test(&m.attrs) {
                continue;
            }
            let mut sub = path.to_vec();
            sub.push(m.ident.to_string());
            match &m.content {
                Some((_, inner)) => collect(inner, &sub, graph, None),
                None => {
                    if let Some(c) = children.as_deref_mut() {
                        c.push(m.ident.to_string());
                    }
                }
            }
            continue;
        }
        if item_is_test(item) {
            continue;
        }
        let mut refs = Refs {
            here: path,
            found: BTreeSet::new(),
        };
        refs.visit_item(item);
        if let Some(from) = path.first() {
            for to in refs.found {
                if &to != from {
                    graph.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
}

fn item_is_test(item: &syn::Item) -> bool {
    let attrs = match item {
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        _ => return false,
    };
    crate::is_test(attrs)
}

/// Collects the top-level modules a piece of code refers to.
struct Refs<'a> {
    /// The module the code is in.
    here: &'a [String],
    found: BTreeSet<String>,
}

impl Refs<'_> {
    /// Resolves a path's leading segments (`crate`, `super`, `self`) to the top-level
    /// module it reaches, if any.
    fn resolve(&mut self, segments: &[String]) {
        let mut at: Vec<String> = self.here.to_vec();
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                at.clear();
                rest = &rest[1..];
            }
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    at.pop();
                    rest = &rest[1..];
                }
            }
            Some("self") => rest = &rest[1..],
            _ => return,
        }
        let top = at.first().cloned().or_else(|| rest.first().cloned());
        if let Some(top) = top {
            self.found.insert(top);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.resolve(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.resolve(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.resolve(prefix),
        }
    }
}

impl<'ast> Visit<'ast> for Refs<'_> {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segments);
        syn::visit::visit_path(self, p);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !crate::is_test(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // Paths inside macro calls (`format!`, `tracing::debug!`) are tokens; find
        // `crate :: name` sequences in them.
        let tokens: Vec<proc_macro2::TokenTree> = m.tokens.clone().into_iter().collect();
        scan_tokens(&tokens, self);
        syn::visit::visit_macro(self, m);
    }
}

fn scan_tokens(tokens: &[proc_macro2::TokenTree], refs: &mut Refs<'_>) {
    use proc_macro2::TokenTree;
    for (i, t) in tokens.iter().enumerate() {
        match t {
            TokenTree::Group(g) => {
                let inner: Vec<TokenTree> = g.stream().into_iter().collect();
                scan_tokens(&inner, refs);
            }
            TokenTree::Ident(id) if id == "crate" || id == "super" => {
                let mut segments = vec![id.to_string()];
                let mut j = i + 1;
                while let (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) =
                    (tokens.get(j), tokens.get(j + 1))
                {
                    if a.as_char() != ':' || b.as_char() != ':' {
                        break;
                    }
                    match tokens.get(j + 2) {
                        Some(TokenTree::Ident(next)) => segments.push(next.to_string()),
                        _ => break,
                    }
                    j += 3;
                }
                refs.resolve(&segments);
            }
            _ => {}
        }
    }
}

/// The module order a crate root's docs give: the first backticked name of each bullet
/// of its `# Layout` section.
pub fn documented_order(root_source: &str) -> Vec<String> {
    let mut order = Vec::new();
    let mut in_layout = false;
    for line in root_source.lines() {
        let Some(doc) = line.trim_start().strip_prefix("//!") else {
            continue;
        };
        let doc = doc.trim();
        if let Some(h) = doc.strip_prefix('#') {
            in_layout = h.trim_start_matches('#').trim() == "Layout";
            continue;
        }
        if !in_layout {
            continue;
        }
        let Some(bullet) = doc.strip_prefix("- ") else {
            continue;
        };
        let mut parts = bullet.split('`');
        parts.next();
        if let Some(name) = parts.next() {
            order.push(name.to_owned());
        }
    }
    order
}

/// Every way `graph` breaks `order`: a reference to a module listed earlier (or to
/// itself through a cycle), and modules missing from the order.
pub fn check_order(graph: &Graph, order: &[String], modules: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let rank = |m: &str| order.iter().position(|o| o == m);
    for m in modules {
        if rank(m).is_none() {
            problems.push(format!("module `{m}` is not in the documented order"));
        }
    }
    for (from, tos) in graph {
        for to in tos {
            if let (Some(a), Some(b)) = (rank(from), rank(to)) {
                if b <= a {
                    problems.push(format!(
                        "`{from}` uses `{to}`, which the documented order puts before it"
                    ));
                }
            }
        }
    }
    problems
}

/// The non-test top-level modules a crate root declares.
pub fn declared_modules(root_source: &str) -> Result<BTreeSet<String>, String> {
    let file = syn::parse_file(root_source).map_err(|e| e.to_string())?;
    Ok(file
        .items
        .iter()
        .filter_map(|i| match i {
            syn::Item::Mod(m) if !crate::is_test(&m.attrs) => Some(m.ident.to_string()),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn problems(src: &str, at: &[&str], names: &[&str]) -> Vec<String> {
        let g = graph_of_source(src, at).unwrap();
        let modules = names.iter().map(|s| s.to_string()).collect();
        check_order(&g, &order(names), &modules)
    }

    #[test]
    fn a_nested_use_group_reaching_up_is_caught() {
        let src = "use crate::{a::{b, c}, hub::Hub};";
        let p = problems(src, &["session"], &["hub", "session"]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("`session` uses `hub`"), "{p:?}");
        // The other way round is the documented direction.
        assert!(problems(src, &["session"], &["session", "hub"]).is_empty());
    }

    #[test]
    fn super_paths_and_code_paths_count() {
        let src = "fn f() { super::super::hub::Hub::new(); }";
        let p = problems(src, &["http", "api"], &["hub", "http"]);
        assert_eq!(p.len(), 1, "{p:?}");
        let src = "fn f() { let _ = crate::hub::X; tracing::debug!(x = crate::node::id()); }";
        let g = graph_of_source(src, &["session"]).unwrap();
        assert_eq!(
            g["session"],
            ["hub", "node"].iter().map(|s| s.to_string()).collect()
        );
    }

    #[test]
    fn code_after_an_inline_test_module_is_still_checked() {
        let src = "
            #[cfg(test)]
            mod tests { use crate::hub::Hub; }
            use crate::hub::Hub;
        ";
        assert_eq!(problems(src, &["session"], &["hub", "session"]).len(), 1);
        let only_tests = "#[cfg(test)]\nmod tests { use crate::hub::Hub; }";
        assert!(problems(only_tests, &["session"], &["hub", "session"]).is_empty());
    }

    #[test]
    fn an_undocumented_module_is_caught() {
        let p = problems("", &["x"], &["a", "b"]);
        assert!(p.is_empty());
        let g = Graph::new();
        let modules = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let p = check_order(&g, &order(&["a", "b"]), &modules);
        assert_eq!(p, vec!["module `c` is not in the documented order"]);
    }

    #[test]
    fn the_layout_section_gives_the_order() {
        let src = "//! Crate.\n//!\n//! # Layout\n//! - `gateway`: x; `error`: y.\n//! - [`config`]: z\n//!\n//! # Other\n//! - `no`\n";
        assert_eq!(documented_order(src), order(&["gateway", "config"]));
    }
}
