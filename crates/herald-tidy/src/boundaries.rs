//! Which crate may do what: only herald-protocol writes Herald's wire frames, and only
//! herald-redis speaks Redis.
//!
//! A wire frame is written where a string literal holds `"op":` or a `json!` call has
//! an `"op"` key. Redis is spoken where code names the `redis` crate or a string literal
//! is a Redis command. Test code (`#[cfg(test)]`, and the crates whose job is testing:
//! herald-testkit, herald-harness, the integration suite, the benchmark's load
//! generators) is outside these rules: it writes raw frames and drives Redis on purpose,
//! as a client or a fault would.

use proc_macro2::TokenTree;
use syn::visit::Visit;

/// Redis commands Herald uses; a literal naming one outside herald-redis is a leak.
const REDIS_COMMANDS: &[&str] = &[
    "PUBLISH",
    "SPUBLISH",
    "SUBSCRIBE",
    "SSUBSCRIBE",
    "UNSUBSCRIBE",
    "SUNSUBSCRIBE",
    "EVALSHA",
    "EVAL",
    "XADD",
    "XRANGE",
    "HINCRBY",
    "HGET",
    "PEXPIRE",
    "SCRIPT",
    "CLIENT",
];

/// One place that breaks a boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    /// What was found.
    pub what: String,
    /// Where (line in the file).
    pub line: usize,
}

/// The wire frames and the Redis uses in a file's non-test code.
#[derive(Debug, Default)]
pub struct Findings {
    pub frames: Vec<Leak>,
    pub redis: Vec<Leak>,
}

/// Scans one file's source.
pub fn scan(source: &str) -> Result<Findings, String> {
    let file = syn::parse_file(source).map_err(|e| e.to_string())?;
    let mut f = Scanner::default();
    f.visit_file(&file);
    Ok(f.0)
}

#[derive(Default)]
struct Scanner(Findings);

fn is_frame_literal(s: &str) -> bool {
    s.match_indices("\"op\"")
        .any(|(at, m)| s[at + m.len()..].trim_start().starts_with(':'))
}

impl<'ast> Visit<'ast> for Scanner {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        let test = match i {
            syn::Item::Mod(m) => crate::is_test(&m.attrs),
            syn::Item::Fn(f) => crate::is_test(&f.attrs),
            syn::Item::Impl(x) => crate::is_test(&x.attrs),
            syn::Item::Use(u) => crate::is_test(&u.attrs),
            _ => false,
        };
        if !test {
            syn::visit::visit_item(self, i);
        }
    }

    fn visit_lit_str(&mut self, l: &'ast syn::LitStr) {
        let v = l.value();
        let line = l.span().start().line;
        if is_frame_literal(&v) {
            self.0.frames.push(Leak {
                what: v.clone(),
                line,
            });
        }
        if REDIS_COMMANDS.contains(&v.as_str()) {
            self.0.redis.push(Leak { what: v, line });
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.segments.first().is_some_and(|s| s.ident == "redis") && p.segments.len() > 1 {
            let what = p
                .segments
                .iter()
                .map(|s| s.ident.to_string())
                .collect::<Vec<_>>()
                .join("::");
            let line = p.segments[0].ident.span().start().line;
            self.0.redis.push(Leak { what, line });
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if let syn::UseTree::Path(p) = &u.tree {
            if p.ident == "redis" {
                let line = p.ident.span().start().line;
                self.0.redis.push(Leak {
                    what: "use redis".into(),
                    line,
                });
            }
        }
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        let tokens: Vec<TokenTree> = m.tokens.clone().into_iter().collect();
        let line = m.path.segments[0].ident.span().start().line;
        scan_macro(&tokens, line, &mut self.0);
    }
}

/// Literals inside macro calls (`format!`, `json!`) are tokens, not parsed expressions.
fn scan_macro(tokens: &[TokenTree], line: usize, out: &mut Findings) {
    for (i, t) in tokens.iter().enumerate() {
        match t {
            TokenTree::Group(g) => {
                let inner: Vec<TokenTree> = g.stream().into_iter().collect();
                scan_macro(&inner, line, out);
            }
            TokenTree::Literal(l) => {
                let Ok(lit) = syn::parse_str::<syn::LitStr>(&l.to_string()) else {
                    continue;
                };
                let v = lit.value();
                let key = v == "op"
                    && matches!(tokens.get(i + 1), Some(TokenTree::Punct(p)) if p.as_char() == ':');
                if key || is_frame_literal(&v) {
                    out.frames.push(Leak {
                        what: v.clone(),
                        line,
                    });
                }
                if REDIS_COMMANDS.contains(&v.as_str()) {
                    out.redis.push(Leak { what: v, line });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_frames_are_caught() {
        let f = scan(r##"fn f() -> String { r#"{"op":"ping"}"#.to_owned() }"##).unwrap();
        assert_eq!(f.frames.len(), 1);
        let f = scan(
            r#"fn f(c: &str) { let _ = serde_json::json!({"op": "publish", "channel": c}); }"#,
        )
        .unwrap();
        assert_eq!(f.frames.len(), 1);
        let f =
            scan(r##"fn f(c: &str) -> String { format!(r#"{{"op":"x","c":"{c}"}}"#) }"##).unwrap();
        assert_eq!(f.frames.len(), 1);
        // Reading a frame's `op` is not writing one.
        let f = scan(r#"fn f(v: &serde_json::Value) -> bool { v["op"] == "welcome" }"#).unwrap();
        assert!(f.frames.is_empty());
        // Test code may.
        let f = scan("#[cfg(test)]\nmod tests { fn f() -> &'static str { r#\"{\"op\":1}\"# } }")
            .unwrap();
        assert!(f.frames.is_empty());
    }

    #[test]
    fn redis_outside_its_crate_is_caught() {
        let f = scan(r#"fn f(p: &mut redis::Pipeline) { p.cmd("XADD"); }"#).unwrap();
        assert_eq!(f.redis.len(), 2, "{:?}", f.redis);
        let f = scan("use redis::aio::MultiplexedConnection;").unwrap();
        assert_eq!(f.redis.len(), 1);
        let f = scan(r#"fn f() -> &'static str { "publish things" }"#).unwrap();
        assert!(f.redis.is_empty());
    }
}
