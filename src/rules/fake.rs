//! An in-memory stand-in for the kernel's ruleset (unit tests only).
//!
//! It interprets the batches [`super::render`] builds the way the kernel
//! does where that matters to the rule layer: a batch is one transaction
//! (all or nothing), deleting a missing element fails, adding a key that a
//! map already holds with another value fails, an interval set refuses a
//! range that overlaps one it holds (`lb-allowed`, `nodeport-addresses`).
//! It can be told to refuse the next batches, to refuse every batch that
//! adds a given key (a Service the kernel will not take), to lose the
//! table (`nft flush ruleset`), or to have its table edited behind the
//! proxy's back. `check` is `apply` without keeping the result.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nftables::schema::Nftables;
use serde_json::Value;

use ipnet::IpNet;

use super::nft::{KernelTable, Nft, RulesError, parse_element};
use super::render::{Action, Key, SET_LB_ALLOWED, SET_NODEPORT_ADDRESSES};
use crate::model::IpFamily;

#[derive(Debug, Default)]
struct State {
    tables: BTreeMap<IpFamily, KernelTable>,
    fail_next: usize,
    fail_text: String,
    applies: usize,
    checks: usize,
    /// Keys whose element the kernel refuses, with what nft says.
    refused_keys: BTreeMap<Key, String>,
}

/// Cloning shares the state, so a test keeps a handle to what the rule
/// layer under test owns.
#[derive(Debug, Default, Clone)]
pub struct FakeNft {
    state: Arc<Mutex<State>>,
}

impl FakeNft {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `ip` table as the kernel would list it.
    pub fn table(&self) -> Option<KernelTable> {
        self.table_of(IpFamily::V4)
    }

    /// The table of `family`.
    pub fn table_of(&self, family: IpFamily) -> Option<KernelTable> {
        self.lock().tables.get(&family).cloned()
    }

    /// Refuse the next `n` batches with `text` on nft's stderr.
    pub fn fail_next(&self, n: usize, text: &str) {
        let mut s = self.lock();
        s.fail_next = n;
        s.fail_text = text.to_string();
    }

    /// `nft flush ruleset`.
    pub fn flush(&self) {
        self.lock().tables.clear();
    }

    /// `nft delete table` of one family.
    pub fn remove_table(&self, family: IpFamily) {
        self.lock().tables.remove(&family);
    }

    /// Changes the `ip` table behind the proxy's back.
    pub fn edit(&self, f: impl FnOnce(&mut KernelTable)) {
        if let Some(t) = self.lock().tables.get_mut(&IpFamily::V4) {
            f(t);
        }
    }

    /// Refuse every batch (applied or checked) that adds an element of
    /// `key`, with `text` on nft's stderr.
    pub fn refuse_key(&self, key: Key, text: &str) {
        self.lock().refused_keys.insert(key, text.to_string());
    }

    /// Batches checked (`nft --check`) so far.
    pub fn checks(&self) -> usize {
        self.lock().checks
    }

    /// Batches applied successfully so far.
    pub fn applies(&self) -> usize {
        self.lock().applies
    }
}

fn refused(text: impl Into<String>) -> RulesError {
    RulesError::Rejected {
        stderr: text.into(),
    }
}

/// Applies one command of a batch to `tables`.
fn command(
    tables: &mut BTreeMap<IpFamily, KernelTable>,
    refused_keys: &BTreeMap<Key, String>,
    verb: &str,
    obj: &Value,
) -> Result<(), RulesError> {
    let (kind, body) = obj
        .as_object()
        .and_then(|o| o.iter().next())
        .ok_or_else(|| refused(format!("bad command {obj}")))?;
    let family = match body["family"].as_str() {
        Some("ip") => IpFamily::V4,
        Some("ip6") => IpFamily::V6,
        other => return Err(refused(format!("fake nft: family {other:?} not modelled"))),
    };
    match (verb, kind.as_str()) {
        ("add", "table") => {
            tables
                .entry(family)
                .or_insert_with(|| KernelTable::new(family));
        }
        ("delete", "table") => {
            tables
                .remove(&family)
                .ok_or_else(|| refused("Error: No such file or directory (table)"))?;
        }
        (_, _) => {
            let t = tables
                .get_mut(&family)
                .ok_or_else(|| refused("Error: No such file or directory (no table)"))?;
            match (verb, kind.as_str()) {
                ("add", "map" | "set") => {
                    let name = body["name"].as_str().unwrap_or_default();
                    for e in body["elem"].as_array().into_iter().flatten() {
                        admit(t, refused_keys, name, e)?;
                        t.add_element(name, e)?;
                    }
                    t.add_set_object(&without_elements(body))?;
                }
                ("add", "chain") => {
                    let name = body["name"].as_str().unwrap_or_default().to_string();
                    t.chains.entry(name).or_insert(0);
                }
                ("add", "rule") => t.add_rule(body),
                ("add", "element") => {
                    let name = body["name"].as_str().unwrap_or_default();
                    for e in body["elem"].as_array().into_iter().flatten() {
                        // A map key holding another value: the kernel refuses.
                        if let Some((k, a @ Action::Redirect(_))) = parse_element(family, name, e)?
                            && t.elements.get(&k).is_some_and(|old| *old != a)
                        {
                            return Err(refused("Error: Could not process rule: File exists"));
                        }
                        admit(t, refused_keys, name, e)?;
                        t.add_element(name, e)?;
                    }
                }
                ("delete", "element") => {
                    let name = body["name"].as_str().unwrap_or_default();
                    for e in body["elem"].as_array().into_iter().flatten() {
                        if !t.remove_element(name, e)? {
                            return Err(refused(
                                "Error: Could not process rule: No such file or directory",
                            ));
                        }
                    }
                }
                _ => return Err(refused(format!("fake nft: {verb} {kind} not modelled"))),
            }
        }
    }
    Ok(())
}

/// A set or map object without its elements (they are added one by one,
/// each checked by [`admit`]).
fn without_elements(body: &Value) -> Value {
    let mut b = body.clone();
    if let Some(o) = b.as_object_mut() {
        o.remove("elem");
    }
    b
}

/// Whether the kernel takes element `e` of set `name` into `t`: not a key
/// it was told to refuse, not a range overlapping one an interval set
/// holds (what nft says to each).
fn admit(
    t: &KernelTable,
    refused_keys: &BTreeMap<Key, String>,
    name: &str,
    e: &Value,
) -> Result<(), RulesError> {
    if name == SET_NODEPORT_ADDRESSES {
        let mut probe = KernelTable::new(t.family);
        probe.add_element(name, e)?;
        let new = probe.nodeport_addresses.unwrap_or_default();
        let held = t.nodeport_addresses.as_deref().unwrap_or_default();
        if new.iter().any(|n| held.iter().any(|h| overlap(n, h))) {
            return Err(refused("Error: conflicting intervals specified"));
        }
        return Ok(());
    }
    let Some((key, _)) = parse_element(t.family, name, e)? else {
        return Ok(());
    };
    if let Some(text) = refused_keys.get(&key) {
        return Err(refused(text.clone()));
    }
    if let Key::Allow(d, net) = key
        && name == SET_LB_ALLOWED
        && t.elements
            .keys()
            .any(|k| matches!(k, Key::Allow(d2, n2) if *d2 == d && overlap(&net, n2)))
    {
        return Err(refused("Error: Could not process rule: File exists"));
    }
    Ok(())
}

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl FakeNft {
    /// Runs `batch` as one transaction on a copy of the tables; the copy
    /// is kept when `commit`.
    fn transaction(&self, batch: &Nftables<'_>, commit: bool) -> Result<(), RulesError> {
        let v = serde_json::to_value(batch).map_err(|e| RulesError::Exec(e.to_string()))?;
        let mut s = self.lock();
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Err(refused(s.fail_text.clone()));
        }
        // One transaction: work on a copy, keep it only if all succeed.
        let mut tables = s.tables.clone();
        for cmd in v["nftables"].as_array().into_iter().flatten() {
            let Some((verb, obj)) = cmd.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            command(&mut tables, &s.refused_keys, verb, obj)?;
        }
        if commit {
            s.tables = tables;
            s.applies += 1;
        } else {
            s.checks += 1;
        }
        Ok(())
    }
}

impl Nft for FakeNft {
    async fn apply(&mut self, batch: &Nftables<'_>) -> Result<(), RulesError> {
        self.transaction(batch, true)
    }

    async fn check(&mut self, batch: &Nftables<'_>) -> Result<(), RulesError> {
        self.transaction(batch, false)
    }

    async fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, RulesError> {
        Ok(self.lock().tables.get(&family).cloned())
    }
}
