//! The invariants ARCHITECTURE.md states, checked on the workspace as it is.

use herald_tidy::{boundaries, modules, workspace_root};

/// Crates whose job is testing or measuring: they speak raw frames and Redis on purpose.
const TEST_SUPPORT: &[&str] = &[
    "herald-testkit",
    "herald-harness",
    "herald-tidy",
    "herald-soak",
];

fn crates() -> Vec<(String, std::path::PathBuf)> {
    let dir = workspace_root().join("crates");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("crates/")
        .flatten()
        .filter(|e| e.path().join("src").is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    out.sort();
    assert!(out.len() >= 10, "found only {out:?}");
    out
}

#[test]
fn every_crate_follows_its_documented_module_order() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (name, dir) in crates() {
        for root in ["lib.rs", "main.rs"] {
            let path = dir.join("src").join(root);
            let Ok(source) = std::fs::read_to_string(&path) else {
                continue;
            };
            let declared = modules::declared_modules(&source)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if declared.is_empty() {
                continue;
            }
            checked += 1;
            // Bullets may also name types; the order is that of the modules among them.
            let order: Vec<String> = modules::documented_order(&source)
                .into_iter()
                .filter(|m| declared.contains(m))
                .collect();
            let graph = modules::graph_of_root(&path).unwrap();
            for p in modules::check_order(&graph, &order, &declared) {
                problems.push(format!("{name}/src/{root}: {p}"));
            }
        }
    }
    assert!(checked >= 6, "only {checked} crate roots have modules");
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn only_herald_protocol_writes_wire_frames_and_only_herald_redis_speaks_redis() {
    let mut problems = Vec::new();
    for (name, dir) in crates() {
        if TEST_SUPPORT.contains(&name.as_str()) {
            continue;
        }
        for file in herald_tidy::rust_files(&dir.join("src")) {
            let source = std::fs::read_to_string(&file).unwrap();
            let found =
                boundaries::scan(&source).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let rel = file
                .strip_prefix(workspace_root())
                .unwrap()
                .display()
                .to_string();
            if name != "herald-protocol" {
                for l in found.frames {
                    problems.push(format!("{rel}:{}: wire frame {:?}", l.line, l.what));
                }
            }
            if name != "herald-redis" {
                for l in found.redis {
                    problems.push(format!("{rel}:{}: Redis {:?}", l.line, l.what));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// herald-server and herald-redis carry Herald's promises: every struct field and enum
/// variant there says why it exists.
#[test]
fn every_field_of_the_gateway_and_the_redis_broker_is_documented() {
    let mut problems = Vec::new();
    for krate in ["herald-server", "herald-redis"] {
        let src = workspace_root().join("crates").join(krate).join("src");
        let root = std::fs::read_to_string(src.join("lib.rs")).unwrap();
        let tests = herald_tidy::test_modules(&root).unwrap();
        for file in herald_tidy::rust_files(&src) {
            if file
                .file_stem()
                .is_some_and(|s| tests.contains(&s.to_string_lossy().into_owned()))
            {
                continue;
            }
            let source = std::fs::read_to_string(&file).unwrap();
            let rel = file
                .strip_prefix(workspace_root())
                .unwrap()
                .display()
                .to_string();
            for (line, name) in herald_tidy::undocumented(&source).unwrap() {
                problems.push(format!("{rel}:{line}: {name}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} undocumented:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
