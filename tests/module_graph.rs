//! The module graph's guard (issue 18): the files of `src/` import each
//! other without a circle, and the top-level modules keep the one-way flow
//! that docs/architecture.md promises (source → model ← reconcile → rules,
//! proxy, health, …). Run with `--nocapture` to see the graph.
//!
//! A node is a production source file, reached from `lib.rs` or `main.rs`
//! through `mod x;`; test-only code (`#[cfg(test)]` items and the files
//! declared under them, such as `x/tests.rs`) is left out. An edge is a
//! path that starts with `crate::`, `super::`, `self::` or a child module's
//! name (`kube_uproxy::` in main.rs), in a `use` or inline in code,
//! resolved to the file that defines the item: the longest prefix that
//! names a module file, then through a parent's `pub use child::Item` to
//! the child. Like `mod x;`, a `pub use` whose name the file does not use
//! itself is its facade, not an edge. Method calls are not seen: an
//! `impl` in a child file (reconcile/observe.rs) is the child's edge only.
//! A small scanner, not a parser: comments and literals are dropped, then
//! the tokens are read for paths.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Imports between top-level modules that the architecture forbids.
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "model",
        &["source", "reconcile", "rules", "proxy", "admin"],
        "the model is what sources fill and reconcile reads: it depends on neither end",
    ),
    (
        "source",
        &["reconcile", "rules", "proxy", "admin", "health", "metrics"],
        "a source only translates API objects into model updates",
    ),
    (
        "proxy",
        &["reconcile", "source", "rules", "admin", "metrics"],
        "reconcile drives the data path (Listeners, Balancer::update); \
         it owns its counters (proxy/metrics.rs)",
    ),
    (
        "rules",
        &["reconcile", "proxy"],
        "rules are rendered from the model; reconcile hands them the proxy ports",
    ),
];

type Module = Vec<String>;
/// `from → to` ↦ the first path that makes the edge.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// One production source file.
#[derive(Default)]
struct File {
    path: PathBuf,
    /// `pub use a::B as C;` → `C` ↦ the absolute path of `a::B`.
    reexports: BTreeMap<String, Module>,
    /// The crate-internal paths it names, absolute, with how they are written.
    uses: Vec<(Module, String)>,
}

/// The files reached from the crate roots.
struct Crate {
    src: PathBuf,
    files: BTreeMap<Module, File>,
    test_only: BTreeSet<PathBuf>,
}

/// Identifiers, `::` and single punctuation; comments and literals dropped.
fn tokens(text: &str) -> Vec<String> {
    let c: Vec<char> = text.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let (mut out, mut i) = (Vec::new(), 0);
    let skip_to = |from: usize, end: &str| {
        let end: Vec<char> = end.chars().collect();
        let found = (from..c.len()).find(|&j| c[j..].starts_with(&end));
        found.map_or(c.len(), |j| j + end.len())
    };
    while i < c.len() {
        let (ch, next) = (c[i], at(i + 1));
        if ch == '/' && next == '/' {
            i = skip_to(i, "\n");
        } else if ch == '/' && next == '*' {
            let (mut depth, mut j) = (1, i + 2);
            while j < c.len() && depth > 0 {
                match (c[j], at(j + 1)) {
                    ('/', '*') => (depth, j) = (depth + 1, j + 2),
                    ('*', '/') => (depth, j) = (depth - 1, j + 2),
                    _ => j += 1,
                }
            }
            i = j;
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '\'' && (next == '\\' || at(i + 2) == '\'') {
            i = skip_to(i + 3, "'"); // a char literal; 'a alone is a lifetime
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
            if matches!(&*word, "r" | "br" | "cr") && at(i + hashes) == '"' {
                i = skip_to(i + hashes + 1, &format!("\"{}", "#".repeat(hashes)));
            } else if !(matches!(&*word, "b" | "c") && matches!(at(i), '"' | '\'')) {
                out.push(word);
            }
        } else if ch == ':' && next == ':' {
            out.push("::".into());
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(ch.into());
            }
            i += 1;
        }
    }
    out
}

/// Index just past the group that opens at `i`.
fn close(t: &[String], mut i: usize) -> usize {
    let mut depth = 0;
    while i < t.len() {
        depth += match &*t[i] {
            "{" | "[" | "(" => 1,
            "}" | "]" | ")" => -1,
            _ => 0,
        };
        i += 1;
        if depth == 0 {
            break;
        }
    }
    i
}

/// The tokens without `#[cfg(test)]` items: test code may import freely.
fn production(t: &[String]) -> Vec<String> {
    const CFG_TEST: [&str; 7] = ["#", "[", "cfg", "(", "test", ")", "]"];
    let (mut out, mut i) = (Vec::new(), 0);
    while i < t.len() {
        if !t[i..].iter().take(7).map(String::as_str).eq(CFG_TEST) {
            out.push(t[i].clone());
            i += 1;
            continue;
        }
        i += CFG_TEST.len();
        while t.get(i).is_some_and(|s| s == "#") {
            i = close(t, i + 1); // further attributes
        }
        while i < t.len() && t[i] != ";" && t[i] != "{" {
            i = if t[i] == "(" || t[i] == "[" {
                close(t, i)
            } else {
                i + 1
            };
        }
        i = if t.get(i).is_some_and(|s| s == "{") {
            close(t, i)
        } else {
            i + 1
        };
    }
    out
}

/// Expands the use tree at `t[*i]` into (path, the name it binds).
fn use_tree(t: &[String], i: &mut usize, mut path: Module, out: &mut Vec<(Module, String)>) {
    while let Some(tok) = t.get(*i).cloned() {
        *i += 1;
        match &*tok {
            "::" => continue,
            "{" => {
                while t.get(*i).is_some_and(|s| s != "}") {
                    use_tree(t, i, path.clone(), out);
                    *i += usize::from(t[*i] == ",");
                }
                *i += 1;
                return;
            }
            "*" => return out.push((path, tok)),
            _ => path.push(tok),
        }
        if t.get(*i).is_some_and(|s| s == "::") {
            continue;
        }
        if path.last().is_some_and(|s| s == "self") {
            path.pop();
        }
        let mut name = path.last().cloned().unwrap_or_default();
        if t.get(*i).is_some_and(|s| s == "as") {
            name = t.get(*i + 1).cloned().unwrap_or_default();
            *i += 2;
        }
        return out.push((path, name));
    }
}

impl Crate {
    /// The library from `src/lib.rs` and, if `bin`, the binary's `main.rs`.
    fn read(src: &Path, bin: bool) -> Crate {
        let (files, test_only) = (BTreeMap::new(), BTreeSet::new());
        let mut krate = Crate {
            src: src.into(),
            files,
            test_only,
        };
        krate.walk(vec![], src.join("lib.rs"), false);
        if bin {
            krate.walk(vec!["<main>".into()], src.join("main.rs"), false);
        }
        krate
    }

    /// Reads the file of `module` and, depth first, the files it declares.
    fn walk(&mut self, module: Module, path: PathBuf, test_only: bool) {
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let (all, prod) = (tokens(&text), production(&tokens(&text)));
        let declared = |t: &[String]| -> BTreeSet<String> {
            let decl = t.windows(3).filter(|w| w[0] == "mod" && w[2] == ";");
            decl.map(|w| w[1].clone()).collect()
        };
        let children = if test_only {
            BTreeSet::new()
        } else {
            declared(&prod)
        };
        let dir = match path.file_name().and_then(|n| n.to_str()) {
            Some("lib.rs" | "main.rs" | "mod.rs") => path.with_file_name(""),
            _ => path.with_extension(""),
        };
        for child in declared(&all) {
            let file = [
                dir.join(format!("{child}.rs")),
                dir.join(&child).join("mod.rs"),
            ]
            .into_iter()
            .find(|f| f.exists())
            .unwrap_or_else(|| panic!("no file for `mod {child};` in {path:?}"));
            let sub = [module.clone(), vec![child.clone()]].concat();
            self.walk(sub, file, !children.contains(&child));
        }
        if test_only {
            self.test_only.insert(path);
        } else {
            let file = scan(&module, &prod, &children, path);
            self.files.insert(module, file);
        }
    }

    /// The file that defines the item of `path`: the longest module
    /// prefix, then through that module's re-exports.
    fn defining(&self, path: &[String]) -> &File {
        let n = (0..=path.len())
            .rev()
            .find(|&n| self.files.contains_key(&path[..n]));
        let n = n.unwrap_or(0); // the crate root
        let file = &self.files[&path[..n]];
        match path.get(n).and_then(|item| file.reexports.get(item)) {
            Some(to) if to[..] != path[..n + 1] => self.defining(&[to, &path[n + 1..]].concat()),
            _ => file,
        }
    }

    fn name(&self, file: &File) -> String {
        let rel = file.path.strip_prefix(&self.src).unwrap_or(&file.path);
        rel.display().to_string()
    }

    /// File → files it uses.
    fn graph(&self) -> Graph {
        let mut graph = Graph::new();
        for file in self.files.values() {
            let from = self.name(file);
            let edges = graph.entry(from.clone()).or_default();
            for (path, written) in &file.uses {
                let to = self.name(self.defining(path));
                if to != from {
                    edges.entry(to).or_insert_with(|| written.clone());
                }
            }
        }
        graph
    }
}

/// The paths that `t`, the production tokens of `module`, names.
fn scan(module: &Module, t: &[String], children: &BTreeSet<String>, path: PathBuf) -> File {
    let bin = module[..] == ["<main>"];
    let absolute = |scope: &Module, p: &[String]| -> Option<Module> {
        let supers = p.iter().take_while(|s| *s == "super").count();
        let (mut abs, rest) = match &*p[0] {
            "kube_uproxy" if bin => (vec![], &p[1..]),
            "crate" | "self" | "super" if bin => return None,
            "crate" => (vec![], &p[1..]),
            "self" => (scope.clone(), &p[1..]),
            "super" => (
                scope[..scope.len().checked_sub(supers)?].to_vec(),
                &p[supers..],
            ),
            head if scope == module && children.contains(head) => (scope.clone(), p),
            _ => return None,
        };
        abs.extend(rest.iter().cloned());
        Some(abs)
    };
    let mut file = File {
        path,
        ..File::default()
    };
    let (mut code, mut reexported) = (BTreeSet::new(), Vec::new());
    // Inline (non-test) modules shift what `self` and `super` mean.
    let (mut scope, mut open, mut depth, mut i) = (module.clone(), Vec::new(), 0, 0);
    while i < t.len() {
        match &*t[i] {
            "mod" if t.get(i + 2).is_some_and(|s| s == "{") => {
                scope.push(t[i + 1].clone());
                open.push(depth + 1);
            }
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if open.last().is_some_and(|&d| d > depth) {
                    open.pop();
                    scope.pop();
                }
            }
            "use" => {
                let public = i > 0 && (t[i - 1] == "pub" || t[i - 1] == ")") && open.is_empty();
                let mut trees = Vec::new();
                i += 1;
                use_tree(t, &mut i, vec![], &mut trees);
                for (p, name) in trees {
                    let Some(abs) = absolute(&scope, &p) else {
                        continue;
                    };
                    if public && name != "*" {
                        file.reexports.insert(name.clone(), abs.clone());
                        reexported.push((abs, format!("use {}", p.join("::")), name));
                    } else {
                        file.uses.push((abs, format!("use {}", p.join("::"))));
                    }
                }
                continue;
            }
            word if t.get(i + 1).is_some_and(|s| s == "::") && (i == 0 || t[i - 1] != "::") => {
                code.insert(word.to_string()); // `Item::new()` uses a re-exported `Item`
                let mut p = vec![word.to_string()];
                while t.get(i + 1).is_some_and(|s| s == "::")
                    && t.get(i + 2)
                        .is_some_and(|s| s.starts_with(|c: char| c.is_alphabetic() || c == '_'))
                {
                    p.push(t[i + 2].clone());
                    i += 2;
                }
                if let Some(abs) = absolute(&scope, &p) {
                    file.uses.push((abs, p.join("::")));
                }
            }
            word => {
                code.insert(word.to_string());
            }
        }
        i += 1;
    }
    let used = reexported
        .into_iter()
        .filter(|(_, _, name)| code.contains(name));
    file.uses.extend(used.map(|(abs, how, _)| (abs, how)));
    file
}

/// The product's `src/`, or the tree `MODULE_GRAPH_SRC` names (to check
/// a scratch copy without building it).
fn product() -> Crate {
    let src = std::env::var_os("MODULE_GRAPH_SRC").map(PathBuf::from);
    Crate::read(
        &src.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src")),
        true,
    )
}

/// The nodes `from` reaches through one edge or more.
fn reach<'g>(graph: &'g Graph, from: &str) -> BTreeSet<&'g str> {
    let (mut seen, mut todo) = (BTreeSet::new(), vec![from]);
    while let Some(v) = todo.pop() {
        for w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
            if seen.insert(w.as_str()) {
                todo.push(w);
            }
        }
    }
    seen
}

/// Each circle (nodes that reach each other), with its edges.
fn circles(graph: &Graph) -> Vec<String> {
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for v in graph
        .keys()
        .filter(|v| reach(graph, v).contains(v.as_str()))
    {
        let ring: Vec<&String> = graph
            .keys()
            .filter(|w| {
                reach(graph, v).contains(w.as_str()) && reach(graph, w).contains(v.as_str())
            })
            .collect();
        if done.insert(ring.clone()) {
            let edges = ring.iter().flat_map(|f| {
                graph[*f]
                    .iter()
                    .filter(|(t, _)| ring.contains(t))
                    .map(move |(t, how)| format!("\n    {f} → {t} ({how})"))
            });
            let names: Vec<&str> = ring.iter().map(|s| s.as_str()).collect();
            found.push(format!(
                "{}:{}",
                names.join(", "),
                edges.collect::<String>()
            ));
        }
    }
    found
}

/// The top-level module of a file: `proxy/tcp.rs` → `proxy`.
fn top(file: &str) -> &str {
    file.split(['/', '.']).next().unwrap_or(file)
}

/// The graph between top-level modules; each edge names one file edge.
fn tops(graph: &Graph) -> Graph {
    let mut tops = Graph::new();
    for (from, to) in graph {
        let edges = tops.entry(top(from).to_string()).or_default();
        for (file, how) in to.iter().filter(|(file, _)| top(file) != top(from)) {
            let why = || format!("{from} → {file}: {how}");
            edges.entry(top(file).to_string()).or_insert_with(why);
        }
    }
    tops
}

/// One line a node: `proxy/tcp.rs → model.rs, proxy.rs`.
fn compact(graph: &Graph) -> String {
    let line = |(v, to): (&String, &BTreeMap<String, String>)| {
        format!(
            "{v} → {}\n",
            to.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    graph.iter().map(line).collect()
}

/// The shape, bottom up: each layer uses only the layers below it (the
/// nodes on or above a circle, which have no layer, come last).
fn layers(graph: &Graph) -> String {
    let (mut placed, mut out) = (BTreeSet::new(), String::new());
    for n in 0.. {
        let ready = |v: &&String| graph[*v].keys().all(|w| placed.contains(w.as_str()));
        let layer: Vec<&str> = graph
            .keys()
            .filter(|v| !placed.contains(v.as_str()))
            .filter(ready)
            .map(|v| v.as_str())
            .collect();
        if layer.is_empty() {
            let rest: Vec<&str> = graph
                .keys()
                .map(|v| v.as_str())
                .filter(|v| !placed.contains(v))
                .collect();
            if !rest.is_empty() {
                out += &format!("on or above a circle: {}\n", rest.join(", "));
            }
            return out;
        }
        out += &format!("{n}: {}\n", layer.join(", "));
        placed.extend(layer);
    }
    out
}

#[test]
fn the_import_graph_between_source_files_has_no_circle() {
    let found = circles(&product().graph());
    assert!(
        found.is_empty(),
        "{} circle(s):\n  {}",
        found.len(),
        found.join("\n  ")
    );
}

#[test]
fn no_top_level_module_imports_from_a_module_that_depends_on_it() {
    let found = circles(&tops(&product().graph()));
    assert!(
        found.is_empty(),
        "{} circle(s):\n  {}",
        found.len(),
        found.join("\n  ")
    );
}

#[test]
fn no_top_level_module_imports_from_one_the_architecture_puts_after_it() {
    let mut broken = Vec::new();
    for (from, to) in &product().graph() {
        for (module, forbidden, why) in FORBIDDEN.iter().filter(|f| f.0 == top(from)) {
            let hits = to.iter().filter(|(t, _)| forbidden.contains(&top(t)));
            broken.extend(hits.map(|(t, how)| format!("{from} → {t} ({how}): {module}: {why}")));
        }
    }
    assert!(
        broken.is_empty(),
        "{} forbidden import(s):\n  {}",
        broken.len(),
        broken.join("\n  ")
    );
}

#[test]
fn a_circle_is_named_and_a_parents_facade_is_not_one() {
    let src = std::env::temp_dir().join(format!("module_graph_{}", std::process::id()));
    let files = [
        ("lib.rs", "mod a; pub mod p; pub use p::Q;"),
        ("a.rs", "use crate::a::b::B; mod b; pub struct A;"),
        ("a/b.rs", "pub struct B(super::A);"),
        ("p.rs", "mod q; pub use q::Q; pub struct P;"),
        ("p/q.rs", "pub struct Q(crate::p::P, crate::Q);"),
    ];
    for (name, text) in files {
        fs::create_dir_all(src.join(name).parent().unwrap()).unwrap();
        fs::write(src.join(name), text).unwrap();
    }
    let graph = Crate::read(&src, false).graph();
    fs::remove_dir_all(&src).unwrap();
    assert_eq!(
        compact(&graph),
        "a.rs → a/b.rs\na/b.rs → a.rs\nlib.rs → \np.rs → \np/q.rs → p.rs\n"
    );
    assert_eq!(
        circles(&graph),
        ["a.rs, a/b.rs:\n    a.rs → a/b.rs (use crate::a::b::B)\n    a/b.rs → a.rs (super::A)"]
    );
}

#[test]
fn every_source_file_is_reached_from_a_crate_root() {
    fn rs(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for path in fs::read_dir(dir)
            .expect("src is readable")
            .flatten()
            .map(|e| e.path())
        {
            if path.is_dir() {
                rs(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.insert(path);
            }
        }
    }
    let krate = product();
    let mut on_disk = BTreeSet::new();
    rs(&krate.src, &mut on_disk);
    let prod = krate.files.values().map(|f| f.path.clone());
    let reached: BTreeSet<PathBuf> = prod.chain(krate.test_only.iter().cloned()).collect();
    assert_eq!(
        on_disk, reached,
        "a file that no `mod` declares is not guarded"
    );
    let test_only = |end: &str| krate.test_only.iter().any(|p| p.ends_with(end));
    assert!(test_only("proxy/test_support.rs") && test_only("rules/fake.rs"));
}

#[test]
fn the_scanner_drops_comments_literals_and_test_only_code() {
    let text = r##"
        // use crate::a::B;
        /* crate::c /* nested */ crate::d */
        const S: &str = "crate::e\""; const R: &str = r#"crate::f "x""#;
        fn f<'a>(x: &'a u8) -> char { let _ = crate::g::h(); '"' }
        #[cfg(test)]
        mod tests { use crate::i; }
        #[cfg(test)]
        #[allow(unused)]
        fn only_in_tests() -> (u8, [u8; 2]) { crate::j::k() }
        static Q: char = '\''; use crate::l::{self as m, n::O};
    "##;
    let joined = production(&tokens(text)).join(" ");
    assert!(
        joined.contains("crate :: g :: h") && joined.contains("crate :: l"),
        "{joined}"
    );
    for gone in ["a ::", ":: c", ":: d", ":: e", ":: f", ":: i", ":: j"] {
        assert!(!joined.contains(gone), "{gone} in {joined}");
    }
    let t: Vec<String> = joined.split(' ').map(String::from).collect();
    let (mut trees, mut i) = (Vec::new(), 1 + t.iter().position(|s| s == "use").unwrap());
    use_tree(&t, &mut i, vec![], &mut trees);
    let p = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    assert_eq!(
        trees,
        [
            (p("crate::l"), "m".into()),
            (p("crate::l::n::O"), "O".into())
        ]
    );
}

#[test]
fn a_name_a_parent_re_exports_resolves_to_its_defining_file() {
    let krate = product();
    let file =
        |p: &str| krate.name(krate.defining(&p.split("::").map(String::from).collect::<Vec<_>>()));
    assert_eq!(file("health::ProxyHealth"), "health/proxy.rs");
    assert_eq!(file("proxy::relay::Transferred"), "proxy/relay.rs");
    assert_eq!(file("proxy::DataPathConfig"), "proxy.rs");
    assert_eq!(file("model::Selection::new"), "model/selection.rs");
}

#[test]
fn the_module_graph_prints_for_the_architecture_doc() {
    let graph = product().graph();
    println!("Files (file → files it uses):\n{}", compact(&graph));
    println!(
        "Top-level modules (module → modules it uses):\n{}",
        compact(&tops(&graph))
    );
    println!("Layers, bottom up:\n{}", layers(&tops(&graph)));
    assert!(graph.contains_key("lib.rs") && graph.contains_key("main.rs"));
}
