//! The agent's shape, checked on every test run (ARCHITECTURE.md draws it):
//!
//! - its modules form a DAG: no cycle among the top-level modules (`config`, `sinks`, …), and
//!   none among the children of one folder (`ingest/handlers.rs`, `ingest/openapi.rs`, …), read
//!   from the `crate::` and `super::` paths of every source file, parsed with `syn`;
//! - no product source file (agent and staging) is over 800 lines.
//!
//! A failure names the cycle and, for each step of it, the file and the path that make it, so
//! the fix is to move the shared item down a layer (usually into the module both depend on).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// The largest product source file allowed, in lines.
const MAX_LINES: usize = 800;

/// A module path inside the crate: `[]` for lib.rs, `["ingest", "handlers"]` for
/// `ingest/handlers.rs`.
type ModPath = Vec<String>;

/// One reference from a file to a module: who, where (file), and the path as written.
#[derive(Debug, Clone)]
struct Reference {
    file: PathBuf,
    written: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file is: `lib.rs`/`main.rs` the root, `x/mod.rs` is `x`, `x/y.rs` is `x::y`.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_owned());
    }
    parts
}

/// Collects every path that starts with `crate` or `super`, as written (segments), from `use`
/// trees and from paths in code.
#[derive(Default)]
struct Paths {
    found: Vec<Vec<String>>,
}

impl Paths {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.found.push(prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.found.push(prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.found.push(prefix.clone()),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments
            .first()
            .is_some_and(|s| s == "crate" || s == "super")
        {
            self.found.push(segments);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        // Paths inside macro calls (`tracing::info!(… crate::x::y …)`) are tokens: look for
        // `crate :: a :: b` runs in them too.
        let tokens: Vec<String> = mac
            .tokens
            .clone()
            .into_iter()
            .map(|t| t.to_string())
            .collect();
        for (i, t) in tokens.iter().enumerate() {
            if t == "crate" || t == "super" {
                let mut segments = vec![t.clone()];
                let mut j = i + 1;
                while j + 1 < tokens.len() && tokens[j] == ":" {
                    j += 1;
                    if tokens[j] == ":" {
                        j += 1;
                    }
                    if j < tokens.len()
                        && tokens[j].chars().all(|c| c.is_alphanumeric() || c == '_')
                    {
                        segments.push(tokens[j].clone());
                        j += 1;
                    } else {
                        break;
                    }
                }
                if segments.len() > 1 {
                    self.found.push(segments);
                }
            }
        }
        syn::visit::visit_macro(self, mac);
    }
}

/// Resolves a written path to the longest known module it names, from the module `at`.
fn resolve(at: &ModPath, written: &[String], modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    let mut base: ModPath = Vec::new();
    let mut rest = written;
    match written.first().map(String::as_str) {
        Some("crate") => rest = &written[1..],
        Some("super") => {
            base = at.clone();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    let mut best = None;
    let mut candidate = base.clone();
    if modules.contains(&candidate) {
        best = Some(candidate.clone());
    }
    for segment in rest {
        candidate.push(segment.clone());
        if modules.contains(&candidate) {
            best = Some(candidate.clone());
        } else {
            break;
        }
    }
    best
}

/// Every module's references to other modules: `from -> (to -> [references])`.
type Graph = BTreeMap<ModPath, BTreeMap<ModPath, Vec<Reference>>>;

fn graph() -> Graph {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let at = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let parsed = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
        let mut paths = Paths::default();
        paths.visit_file(&parsed);
        for written in paths.found {
            if let Some(to) = resolve(&at, &written, &modules)
                && to != at
            {
                graph
                    .entry(at.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .push(Reference {
                        file: file.strip_prefix(&src).unwrap().to_path_buf(),
                        written: written.join("::"),
                    });
            }
        }
    }
    graph
}

/// The cycles of a graph given as `node -> nodes it depends on`, one per strongly connected
/// component of more than one node (Tarjan's algorithm), each as the list of its nodes.
fn cycles<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct State<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        on_stack: BTreeSet<N>,
        next: usize,
        out: Vec<Vec<N>>,
    }
    fn visit<N: Ord + Clone>(n: &N, edges: &BTreeMap<N, BTreeSet<N>>, s: &mut State<N>) {
        s.index.insert(n.clone(), s.next);
        s.low.insert(n.clone(), s.next);
        s.next += 1;
        s.stack.push(n.clone());
        s.on_stack.insert(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            if !s.index.contains_key(m) {
                visit(m, edges, s);
                let low = s.low[n].min(s.low[m]);
                s.low.insert(n.clone(), low);
            } else if s.on_stack.contains(m) {
                let low = s.low[n].min(s.index[m]);
                s.low.insert(n.clone(), low);
            }
        }
        if s.low[n] == s.index[n] {
            let mut component = Vec::new();
            loop {
                let m = s.stack.pop().unwrap();
                s.on_stack.remove(&m);
                let done = &m == n;
                component.push(m);
                if done {
                    break;
                }
            }
            if component.len() > 1 {
                component.reverse();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    let nodes: BTreeSet<N> = edges
        .iter()
        .flat_map(|(a, bs)| std::iter::once(a.clone()).chain(bs.iter().cloned()))
        .collect();
    for n in &nodes {
        if !s.index.contains_key(n) {
            visit(n, edges, &mut s);
        }
    }
    s.out
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The graph seen at one level: each module mapped by `group` (or left out when `None`), edges
/// between different groups only; a report of every cycle with the references behind it.
fn cycle_report(graph: &Graph, group: impl Fn(&ModPath) -> Option<ModPath>) -> Vec<String> {
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    let mut why: BTreeMap<(ModPath, ModPath), Vec<String>> = BTreeMap::new();
    for (from, tos) in graph {
        let Some(a) = group(from) else { continue };
        for (to, refs) in tos {
            let Some(b) = group(to) else { continue };
            if a == b {
                continue;
            }
            edges.entry(a.clone()).or_default().insert(b.clone());
            let list = why.entry((a.clone(), b.clone())).or_default();
            for r in refs {
                if list.len() < 3 {
                    list.push(format!("{}: {}", r.file.display(), r.written));
                }
            }
        }
    }
    cycles(&edges)
        .into_iter()
        .map(|component| {
            let members: BTreeSet<&ModPath> = component.iter().collect();
            let mut lines = vec![format!(
                "cycle among {}:",
                component.iter().map(name).collect::<Vec<_>>().join(", ")
            )];
            for ((a, b), refs) in &why {
                if members.contains(a) && members.contains(b) {
                    lines.push(format!("  {} -> {}: {}", name(a), name(b), refs.join("; ")));
                }
            }
            lines.join("\n")
        })
        .collect()
}

#[test]
fn the_top_level_modules_form_a_dag() {
    let graph = graph();
    assert!(graph.len() > 10, "too few modules read: {graph:?}");
    let report = cycle_report(&graph, |m| m.first().map(|s| vec![s.clone()]));
    assert!(
        report.is_empty(),
        "the agent's top-level modules import each other in a cycle; move what both need into a \
         module below them:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_modules_of_each_folder_form_a_dag() {
    let graph = graph();
    let parents: BTreeSet<ModPath> = graph
        .keys()
        .chain(graph.values().flat_map(|tos| tos.keys()))
        .filter(|m| m.len() >= 2)
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    let mut report = Vec::new();
    for parent in &parents {
        // Siblings under `parent`: each module below it maps to its child of `parent`; the
        // parent itself (its mod.rs, which declares and re-exports them) is left out.
        report.extend(cycle_report(&graph, |m| {
            (m.len() > parent.len() && m.starts_with(parent)).then(|| m[..=parent.len()].to_vec())
        }));
    }
    assert!(
        report.is_empty(),
        "modules of one folder import each other in a cycle; move what both need into a \
         module below them:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_cycle_finder_finds_cycles() {
    // The check must be able to fail: a → b → c → a is reported, d → a is not part of it.
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    edges.entry("a").or_default().insert("b");
    edges.entry("b").or_default().insert("c");
    edges.entry("c").or_default().insert("a");
    edges.entry("d").or_default().insert("a");
    assert_eq!(cycles(&edges), vec![vec!["a", "b", "c"]]);
    edges.get_mut("c").unwrap().clear();
    assert!(cycles(&edges).is_empty());
}

#[test]
fn no_product_source_file_is_over_800_lines() {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    rust_files(&src_dir().join("../../staging/src"), &mut files);
    let mut long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{lines:>5} {}", f.display()))
        })
        .collect();
    long.sort();
    assert!(
        long.is_empty(),
        "source files over {MAX_LINES} lines; split them by role:\n{}",
        long.join("\n")
    );
}
