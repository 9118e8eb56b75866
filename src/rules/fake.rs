//! An in-memory stand-in for the kernel's ruleset (unit tests only).
//!
//! It interprets the batches [`super::render`] builds the way the kernel
//! does where that matters to the rule layer: a batch is one transaction
//! (all or nothing), deleting a missing element fails, adding a key that a
//! map already holds with another value fails. It can be told to refuse the
//! next batches, to lose the table (`nft flush ruleset`), or to have its
//! table edited behind the proxy's back.

use std::sync::{Arc, Mutex, MutexGuard};

use nftables::schema::Nftables;
use serde_json::Value;

use super::nft::{KernelTable, Nft, RulesError, parse_element};
use super::render::Action;

#[derive(Debug, Default)]
struct State {
    table: Option<KernelTable>,
    fail_next: usize,
    fail_text: String,
    applies: usize,
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

    /// The table as the kernel would list it.
    pub fn table(&self) -> Option<KernelTable> {
        self.lock().table.clone()
    }

    /// Refuse the next `n` batches with `text` on nft's stderr.
    pub fn fail_next(&self, n: usize, text: &str) {
        let mut s = self.lock();
        s.fail_next = n;
        s.fail_text = text.to_string();
    }

    /// `nft flush ruleset`.
    pub fn flush(&self) {
        self.lock().table = None;
    }

    /// Changes the table behind the proxy's back.
    pub fn edit(&self, f: impl FnOnce(&mut KernelTable)) {
        if let Some(t) = self.lock().table.as_mut() {
            f(t);
        }
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

/// Applies one command of a batch to `table`.
fn command(table: &mut Option<KernelTable>, verb: &str, obj: &Value) -> Result<(), RulesError> {
    let (kind, body) = obj
        .as_object()
        .and_then(|o| o.iter().next())
        .ok_or_else(|| refused(format!("bad command {obj}")))?;
    match (verb, kind.as_str()) {
        ("add", "table") => {
            table.get_or_insert_with(KernelTable::default);
        }
        ("delete", "table") => {
            table
                .take()
                .ok_or_else(|| refused("Error: No such file or directory (table)"))?;
        }
        (_, _) => {
            let t = table
                .as_mut()
                .ok_or_else(|| refused("Error: No such file or directory (no table)"))?;
            match (verb, kind.as_str()) {
                ("add", "map" | "set") => t.add_set_object(body)?,
                ("add", "chain") => {
                    let name = body["name"].as_str().unwrap_or_default().to_string();
                    t.chains.entry(name).or_insert(0);
                }
                ("add", "rule") => t.add_rule(body),
                ("add", "element") => {
                    let name = body["name"].as_str().unwrap_or_default();
                    for e in body["elem"].as_array().into_iter().flatten() {
                        // A map key holding another value: the kernel refuses.
                        if let Some((k, a @ Action::Redirect(_))) = parse_element(name, e)?
                            && t.elements.get(&k).is_some_and(|old| *old != a)
                        {
                            return Err(refused("Error: Could not process rule: File exists"));
                        }
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

impl Nft for FakeNft {
    async fn apply(&mut self, batch: &Nftables<'_>) -> Result<(), RulesError> {
        let v = serde_json::to_value(batch).map_err(|e| RulesError::Exec(e.to_string()))?;
        let mut s = self.lock();
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Err(refused(s.fail_text.clone()));
        }
        // One transaction: work on a copy, keep it only if all succeed.
        let mut table = s.table.clone();
        for cmd in v["nftables"].as_array().into_iter().flatten() {
            let Some((verb, obj)) = cmd.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            command(&mut table, verb, obj)?;
        }
        s.table = table;
        s.applies += 1;
        Ok(())
    }

    async fn read(&mut self) -> Result<Option<KernelTable>, RulesError> {
        Ok(self.lock().table.clone())
    }
}
