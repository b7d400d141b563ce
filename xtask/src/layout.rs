//! The shape rules `cargo xtask lint` checks besides rustfmt and clippy:
//! no source file over [`MAX_LINES`] lines, and no import cycle between the
//! top-level modules of a crate (a module that imports one that imports it
//! back has no single home).
//!
//! A module's imports are the `crate::NAME` paths in its files (comments
//! left out), `use crate::{a, b::c}` groups included; a name the crate root
//! re-exports (`pub use dataplane::Dataplane`) counts as its module.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// The longest a source file may be.
pub const MAX_LINES: usize = 700;

/// The crates whose modules must not import each other in a cycle.
const CRATES: &[&str] =
    &["policy-common", "policy-ebpf", "policy-api", "policy-agent", "policy-cni", "bench", "xtask"];

/// Every crate's files, for the length rule.
const ALL: &[&str] = &[
    "policy-common",
    "policy-ebpf",
    "policy-api",
    "policy-agent",
    "policy-cni",
    "bench",
    "xtask",
    "tests",
];

pub fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for krate in ALL {
        for file in rust_files(&root.join(krate))? {
            let lines = read(&file)?.lines().count();
            if lines > MAX_LINES {
                let shown = file.strip_prefix(root).unwrap_or(&file).display();
                problems.push(format!(
                    "{shown}: {lines} lines (at most {MAX_LINES}: split it by concern)"
                ));
            }
        }
    }
    for krate in CRATES {
        let src = root.join(krate).join("src");
        for cycle in cycles(&imports(&src)?) {
            problems.push(format!(
                "{krate}: modules import each other in a cycle: {} (move what they share to \
                 one home below both)",
                cycle.join(" ⇄ ")
            ));
        }
    }
    if problems.is_empty() {
        println!("layout: no file over {MAX_LINES} lines, no import cycle");
        return Ok(());
    }
    for p in &problems {
        eprintln!("layout: {p}");
    }
    bail!("{} layout problem(s)", problems.len())
}

fn read(file: &Path) -> Result<String> {
    fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Top-level module → the top-level modules it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn imports(src: &Path) -> Result<Graph> {
    let files = rust_files(src)?;
    let top = |file: &Path| -> Option<String> {
        let rel = file.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_str()?;
        let name = first.strip_suffix(".rs").unwrap_or(first);
        (!matches!(name, "lib" | "main")).then(|| name.to_owned())
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top(f)).collect();
    // Names the crate root re-exports, by the module they come from.
    let mut reexports = BTreeMap::new();
    for root in ["lib.rs", "main.rs"] {
        let Ok(text) = fs::read_to_string(src.join(root)) else { continue };
        for (module, names) in pub_uses(&strip_comments(&text)) {
            for name in names {
                reexports.insert(name, module.clone());
            }
        }
    }
    let mut graph = Graph::new();
    for file in &files {
        let Some(from) = top(file) else { continue };
        let text = strip_comments(&read(file)?);
        let edges = graph.entry(from.clone()).or_default();
        for name in crate_paths(&text) {
            let to =
                if modules.contains(&name) { Some(name) } else { reexports.get(&name).cloned() };
            if let Some(to) = to.filter(|to| *to != from) {
                edges.insert(to);
            }
        }
    }
    Ok(graph)
}

fn strip_comments(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The first name after every `crate::`, and each item of a `crate::{...}`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `my_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            out.extend(group_items(group).into_iter().filter_map(|item| ident(&item)));
        } else if let Some(name) = ident(rest) {
            out.push(name);
        }
    }
    out
}

/// The top-level items of a `{...}` group (`group` starts after the brace).
fn group_items(group: &str) -> Vec<String> {
    let (mut depth, mut items, mut current) = (0usize, Vec::new(), String::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    items
}

fn ident(text: &str) -> Option<String> {
    let name: String =
        text.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty()).then_some(name)
}

/// `pub use MODULE::{A, B}` / `pub use MODULE::A` → (MODULE, [A, B]).
fn pub_uses(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for statement in text.split(';') {
        let Some(path) = statement.trim().strip_prefix("pub use ") else { continue };
        let path = path.trim().trim_start_matches("crate::");
        let Some((module, rest)) = path.split_once("::") else { continue };
        let names = match rest.strip_prefix('{') {
            Some(group) => group_items(group).iter().filter_map(|i| last_name(i)).collect(),
            None => last_name(rest).into_iter().collect(),
        };
        out.push((module.trim().to_owned(), names));
    }
    out
}

/// The name an item is known by: `a::B` → B, `X as Y` → Y.
fn last_name(item: &str) -> Option<String> {
    let item = item.rsplit(" as ").next()?;
    ident(item.rsplit("::").next()?)
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_groups_name_their_top_module() {
        let text = "use crate::{agent::Agent, state::{A, B}, Dataplane};\nlet x = crate::flows::f();\nmy_crate::no";
        assert_eq!(crate_paths(text), ["agent", "state", "Dataplane", "flows"]);
    }

    #[test]
    fn reexports_are_found_by_name() {
        let uses =
            pub_uses("pub use dataplane::{Capacities, Dataplane as Dp};\npub use error::Error;");
        assert_eq!(
            uses[0],
            ("dataplane".to_owned(), vec!["Capacities".to_owned(), "Dp".to_owned()])
        );
        assert_eq!(uses[1], ("error".to_owned(), vec!["Error".to_owned()]));
    }

    #[test]
    fn a_cycle_is_found_and_a_chain_is_not() {
        let graph = |edges: &[(&str, &str)]| {
            let mut g = Graph::new();
            for (a, b) in edges {
                g.entry(a.to_string()).or_default().insert(b.to_string());
                g.entry(b.to_string()).or_default();
            }
            g
        };
        assert!(cycles(&graph(&[("a", "b"), ("b", "c")])).is_empty());
        assert_eq!(
            cycles(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])),
            [["a", "b", "c"]]
        );
    }
}
