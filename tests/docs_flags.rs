//! The docs and the binary agree on the flags and the config file's fields
//! (issue 22, item 8): every `--flag` the docs (README.md, docs/*.md)
//! mention is one of the binary's, or one of another tool's listed below;
//! and every flag and every field of the binary is in docs/operations.md,
//! the reference an operator reads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use kube_uproxy::config::Args;
use kube_uproxy::config::file::{self, KUBE_PROXY_FIELDS, KubeProxyUse};

/// Flags of other tools that the docs name, by tool. A flag of
/// kube-uproxy's that is removed or renamed is not here, so a doc that
/// still names it fails.
const OTHER_TOOLS: &[(&str, &[&str])] = &[
    (
        "kubectl (wait, label)",
        &["--for", "--timeout", "--overwrite"],
    ),
    (
        "docker build, buildx and run; binfmt",
        &[
            "--build-arg",
            "--use",
            "--platform",
            "--push",
            "--privileged",
            "--install",
        ],
    ),
    (
        "cargo build (the image)",
        &["--profile", "--bin", "--target"],
    ),
    ("kubeadm", &["--skip-phases"]),
    ("iptables-restore", &["--noflush"]),
    (
        "cargo and the test harness",
        &[
            "--release",
            "--bench",
            "--test",
            "--all-targets",
            "--no-default-features",
            "--nocapture",
            "--target-dir",
        ],
    ),
    (
        "the datapath benchmark (benches/datapath)",
        &[
            "--phases",
            "--rounds",
            "--secs",
            "--paths",
            "--no-docs",
            "--no-control",
            "--no-memory",
            "--baseline-bin",
            "--short",
            "--json",
            "--scales",
            "--idle-conns",
            "--no-pin",
            "--no-h2load",
            "--log-file",
            "--congestion-control",
        ],
    ),
    ("nft", &["--check"]),
    ("perf record", &["--call-graph"]),
    (
        "kubectl",
        &[
            "--type",
            "--image",
            "--rm",
            "--restart",
            "--from-file",
            "--field-selector",
        ],
    ),
    (
        "iptables (kube-proxy's rules)",
        &[
            "--to-ports",
            "--probability",
            "--mode",
            "--dport",
            "--set",
            "--rcheck",
            "--seconds",
            "--reap",
        ],
    ),
    ("kube-proxy", &["--cluster-cidr", "--ipvs-scheduler"]),
    ("kubernetes-validate", &["--strict"]),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every docs/*.md, with their text.
fn docs() -> Vec<(PathBuf, String)> {
    let mut paths = vec![root().join("README.md")];
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    in_docs.sort();
    paths.extend(in_docs);
    paths
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

/// Every `--name` in `text` that starts a word (not the middle of `a--b`
/// or a `---` rule), with its line number.
fn flags_in(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let b = line.as_bytes();
        let mut i = 0;
        while let Some(at) = line[i..].find("--") {
            let start = i + at;
            i = start + 2;
            let before_ok =
                start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'-');
            let name: String = line[start + 2..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            let name = name.trim_end_matches('-');
            if before_ok && name.starts_with(|c: char| c.is_ascii_lowercase()) {
                out.push((n + 1, format!("--{name}")));
            }
        }
    }
    out
}

/// The binary's long flags and aliases, its subcommands' included.
fn binary_flags() -> BTreeSet<String> {
    let mut cmd = Args::command();
    cmd.build();
    let mut flags = BTreeSet::new();
    let mut add = |c: &clap::Command| {
        for a in c.get_arguments() {
            if let Some(l) = a.get_long() {
                flags.insert(format!("--{l}"));
            }
            for alias in a.get_all_aliases().unwrap_or_default() {
                flags.insert(format!("--{alias}"));
            }
        }
    };
    add(&cmd);
    for sub in cmd.get_subcommands() {
        add(sub);
    }
    flags
}

#[test]
fn every_flag_the_docs_name_exists() {
    let ours = binary_flags();
    let others: BTreeSet<&str> = OTHER_TOOLS
        .iter()
        .flat_map(|(_, f)| f.iter().copied())
        .collect();
    let mut unknown = Vec::new();
    for (path, text) in docs() {
        for (line, flag) in flags_in(&text) {
            if !ours.contains(&flag) && !others.contains(flag.as_str()) {
                let rel = path.strip_prefix(root()).unwrap_or(&path).to_path_buf();
                unknown.push(format!("{}:{line}: {flag}", rel.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the docs name flags the binary does not have (fix the doc, or list another tool's flag in OTHER_TOOLS):\n{}",
        unknown.join("\n")
    );
}

#[test]
fn every_flag_and_field_is_in_the_operations_reference() {
    let ops =
        std::fs::read_to_string(root().join("docs/operations.md")).expect("docs/operations.md");
    let mut missing = Vec::new();
    let named: BTreeSet<String> = flags_in(&ops).into_iter().map(|(_, f)| f).collect();
    for flag in binary_flags() {
        if !named.contains(&flag) {
            missing.push(flag);
        }
    }
    let cmd = Args::command();
    for field in file::own_fields(&cmd).keys() {
        if !ops.contains(&format!("`{field}`")) {
            missing.push(format!("field {field}"));
        }
    }
    for (field, u) in KUBE_PROXY_FIELDS {
        if !matches!(u, KubeProxyUse::Ignored(_)) && !ops.contains(&format!("`{field}`")) {
            missing.push(format!("kube-proxy field {field}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/operations.md does not name: {missing:?}"
    );
}

#[test]
fn the_scanner_finds_flags_and_only_flags() {
    let found: Vec<String> = flags_in("a `--x-y` b --v=2, (--z) c--d e --- f --9 `--long-`")
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    assert_eq!(found, ["--x-y", "--v", "--z", "--long"]);
    assert!(Path::new(&root().join("docs/operations.md")).exists());
}
