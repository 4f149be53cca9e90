//! Keeps the crate's layering true: its modules import each other one way.
//!
//! Reads this crate's own sources, collects which module refers to which (`crate::x`,
//! `super::x`, and a parent's `child::` paths), and fails on any cycle, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`""` for the crate root, `http::api`) → source without comments.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let mut parts: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let mut text = std::fs::read_to_string(&path).expect("read source");
            // Inline test modules (`#[cfg(test)] mod tests { use super::*; ... }`)
            // import their own file through `super`: not a dependency between files.
            if let Some(at) = inline_test_module(&text) {
                text.truncate(at);
            }
            let code: String = text
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), code);
        }
    }
    out
}

/// Where an inline `#[cfg(test)]` module starts, if the file has one.
fn inline_test_module(text: &str) -> Option<usize> {
    text.match_indices("#[cfg(test)]").find_map(|(at, m)| {
        let rest = text[at + m.len()..].trim_start();
        let rest = rest.strip_prefix("pub(crate) ").unwrap_or(rest);
        let rest = rest.strip_prefix("mod ")?;
        let name_len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        rest[name_len..].trim_start().starts_with('{').then_some(at)
    })
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}::{name}")
    }
}

fn parent(m: &str) -> &str {
    m.rsplit_once("::").map_or("", |(p, _)| p)
}

/// The identifiers of the path that starts at `rest` (`a::b::{c, d}` → `[[a,b,c],[a,b,d]]`,
/// shortened to what matters here: each first segment with the segments after it).
fn paths_at(rest: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    if let Some(group) = rest.strip_prefix('{') {
        let inner = group.split('}').next().unwrap_or("");
        return inner
            .split(',')
            .map(|p| p.trim().split("::").map(ident).collect())
            .collect();
    }
    let mut segs = Vec::new();
    let mut s = rest;
    loop {
        let id = ident(s);
        if id.is_empty() {
            break;
        }
        s = &s[id.len()..];
        segs.push(id);
        match s.strip_prefix("::") {
            Some(r) if !r.starts_with('{') => s = r,
            _ => break,
        }
    }
    vec![segs]
}

/// The deepest known module that `base` + `segs` names (`base` itself when none).
fn resolve(known: &BTreeMap<String, String>, base: &str, segs: &[String]) -> String {
    let mut found = base.to_owned();
    let mut cur = base.to_owned();
    for s in segs {
        cur = join(&cur, s);
        if known.contains_key(&cur) {
            found = cur.clone();
        } else {
            break;
        }
    }
    found
}

fn edges(known: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, code) in known {
        let mut to = BTreeSet::new();
        for (marker, base) in [
            ("crate::", String::new()),
            ("super::", parent(m).to_owned()),
        ] {
            for (i, _) in code.match_indices(marker) {
                // `use super::*` in an inline test module names the file itself.
                for segs in paths_at(&code[i + marker.len()..]) {
                    if !segs.is_empty() && !segs[0].is_empty() {
                        to.insert(resolve(known, &base, &segs));
                    }
                }
            }
        }
        // A parent's paths into its own children (`api::handle`).
        for child in known.keys().filter(|k| parent(k) == m && !k.is_empty()) {
            let name = child.rsplit("::").next().unwrap_or(child);
            let needle = format!("{name}::");
            let used = code.match_indices(&needle).any(|(i, _)| {
                let before = code[..i].chars().next_back();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            });
            if used {
                to.insert(child.clone());
            }
        }
        to.remove(m);
        g.insert(m.clone(), to);
    }
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_owned());
        for next in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
}

#[test]
fn modules_import_one_way() {
    let known = modules();
    assert!(known.contains_key("handle") && known.contains_key("http::api"));
    let g = edges(&known);
    // The checker sees real imports (so a pass means something).
    assert!(g["writer"].contains("handle"), "{g:?}");
    assert!(g["http"].contains("http::api"), "{g:?}");
    if let Some(cycle) = find_cycle(&g) {
        let shown: Vec<&str> = cycle
            .iter()
            .map(|m| if m.is_empty() { "lib" } else { m.as_str() })
            .collect();
        panic!(
            "modules import each other in a circle: {}",
            shown.join(" -> ")
        );
    }
}

#[test]
fn the_checker_finds_a_cycle() {
    let mut known = BTreeMap::new();
    known.insert("a".to_owned(), "use crate::b::X;".to_owned());
    known.insert("b".to_owned(), "fn f() { super::a::g() }".to_owned());
    let cycle = find_cycle(&edges(&known)).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
}
