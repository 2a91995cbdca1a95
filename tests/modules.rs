//! The crate's top-level modules form no import cycle, and the layers the others build on
//! (`coap`, `config`, `store`, ...) import nothing built on them. Read from
//! the sources: every `crate::<module>` path, in `use` items or inline, in any file under a
//! top-level module counts as an edge from that module (tests inside it too: a test that needs a
//! higher layer belongs to that layer).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules: each `src/<name>.rs` or `src/<name>/`, except the crate roots and the
/// binaries.
fn top_level(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let name = name.strip_suffix(".rs").map(str::to_string).unwrap_or(name);
            (!["lib", "main", "bin"].contains(&name.as_str())).then_some(name)
        })
        .collect()
}

fn rust_files(at: &Path, out: &mut Vec<PathBuf>) {
    if at.is_dir() {
        for e in std::fs::read_dir(at).unwrap().flatten() {
            rust_files(&e.path(), out);
        }
    } else if at.extension().is_some_and(|x| x == "rs") {
        out.push(at.to_path_buf());
    }
}

/// Strips comments, so a doc comment naming `crate::x` is no edge.
fn code_of(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The modules `code` refers to: `crate::a::…` and each name at the start of a path inside
/// `crate::{a::…, b, …}` (nested groups included).
fn referenced(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // A name starts a path at the group's own depth, first or after a comma.
            let (mut depth, mut expect_name) = (0usize, true);
            let mut name = String::new();
            for c in group.chars() {
                if c.is_alphanumeric() || c == '_' {
                    if depth == 0 && expect_name {
                        name.push(c);
                    }
                    continue;
                }
                if !name.is_empty() {
                    out.insert(std::mem::take(&mut name));
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expect_name = true;
                        continue;
                    }
                    c if c.is_whitespace() => continue,
                    _ => {}
                }
                expect_name = false;
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.insert(name);
        }
    }
    out.retain(|m| modules.contains(m));
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = top_level(&src);
    let mut g = BTreeMap::new();
    for m in &modules {
        let mut files = Vec::new();
        let dir = src.join(m);
        rust_files(if dir.is_dir() { &dir } else { &src }, &mut files);
        if !dir.is_dir() {
            files.retain(|f| f.file_stem().is_some_and(|s| s == m.as_str()));
        }
        let mut deps = BTreeSet::new();
        for f in files {
            deps.extend(referenced(&code_of(&std::fs::read_to_string(&f).unwrap()), &modules));
        }
        deps.remove(m);
        g.insert(m.clone(), deps);
    }
    g
}

/// The strongly connected components with more than one module (Tarjan's algorithm).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            for w in &self.g[v] {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let l = self.low[w.as_str()].min(self.low[v]);
                    self.low.insert(v, l);
                } else if self.stack.contains(&w.as_str()) {
                    let l = self.index[w.as_str()].min(self.low[v]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let at = self.stack.iter().rposition(|x| *x == v).unwrap();
                let component: Vec<String> = self.stack.drain(at..).map(str::to_string).collect();
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), found: Vec::new() };
    for v in g.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

/// What each layer the others build on may import: nothing above it.
const LEAVES: [(&str, &[&str]); 9] = [
    ("identity", &[]),
    ("clock", &[]),
    ("sync", &[]),
    ("net", &[]),
    ("telemetry", &[]),
    ("config", &["identity", "net", "store", "telemetry"]),
    ("coap", &["clock", "identity"]),
    ("store", &["auth", "clock", "identity", "telemetry"]),
    // PSK lookup goes through `dtls::psk::Keys`: the DTLS stack knows no registry. Durable
    // sessions seal their keys as the store seals every secret (`store::sealed`).
    ("dtls", &["auth", "clock", "config", "identity", "net", "store"]),
];

#[test]
fn the_top_level_module_graph_is_acyclic_and_leaves_stay_leaves() {
    let g = graph();
    let shown: Vec<String> = g.iter().map(|(m, deps)| format!("{m} -> {deps:?}")).collect();
    // Printed for the record (`cargo test --test modules -- --nocapture`).
    println!("{}", shown.join("\n"));
    let found = cycles(&g);
    println!("cycles: {found:?}");
    assert!(found.is_empty(), "import cycles among top-level modules: {found:?}\n{}", shown.join("\n"));
    for (leaf, allowed) in LEAVES {
        let above: Vec<&String> = g[leaf].iter().filter(|d| !allowed.contains(&d.as_str())).collect();
        assert!(above.is_empty(), "{leaf} imports {above:?}, which build on it");
    }
}

#[test]
fn paths_are_read_from_use_groups_and_inline_uses() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
    let code = "use crate::{a::X, b::{self, Y}};\nfn f() { crate::c::g(); }\n";
    assert_eq!(referenced(code, &modules), ["a", "b", "c"].map(String::from).into());
    assert!(referenced(&code_of("// see crate::d::x\n"), &modules).is_empty());
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["c".to_string()].into()),
        ("c".to_string(), ["a".to_string()].into()),
        ("d".to_string(), ["a".to_string()].into()),
    ]
    .into();
    assert_eq!(cycles(&g).len(), 1);
    assert_eq!(cycles(&g)[0].len(), 3);
}
