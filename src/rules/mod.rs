//! nftables: what the kernel should do with Service traffic.
//!
//! [`render`] turns the desired destinations into JSON batches (pure);
//! [`RuleTable`] applies them with `nft -j -f -` through the `nftables`
//! crate, remembers what the kernel holds, and sends only changes after the
//! first sync.

pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nftables::helper::NftablesError;
use nftables::schema::Nftables;

pub use render::{Action, Destination, ProxyPort};

/// `nft` refused a batch or could not be run.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("nft failed: {stderr}")]
    Rejected { stderr: String },
    #[error("cannot run nft (is the nftables package installed?): {0}")]
    Exec(String),
}

impl From<NftablesError> for RulesError {
    fn from(e: NftablesError) -> Self {
        match e {
            NftablesError::NftFailed { stderr, .. } => RulesError::Rejected {
                stderr: stderr.trim().to_string(),
            },
            other => RulesError::Exec(other.to_string()),
        }
    }
}

async fn apply(batch: &Nftables<'_>) -> Result<(), RulesError> {
    nftables::helper::apply_ruleset_async(batch).await?;
    Ok(())
}

/// How a sync was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Nothing differed from what the kernel holds.
    Unchanged,
    /// The table was (re)created whole, with every element.
    Full { elements: usize },
    /// Only changed elements were sent.
    Delta { changes: usize },
}

/// The proxy's table in the kernel, and what we know it holds.
#[derive(Debug, Default)]
pub struct RuleTable {
    /// What the kernel holds after the last successful sync.
    applied: BTreeMap<Destination, Action>,
    /// Updates not yet in the kernel (kept for a retry if a sync fails).
    pending: BTreeMap<Destination, Option<Action>>,
    /// Proxy ports the kernel holds, and pending changes (true = add).
    applied_ports: BTreeSet<ProxyPort>,
    pending_ports: BTreeMap<ProxyPort, bool>,
    /// Whether the table has been created by this process.
    installed: bool,
}

impl RuleTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `dest` should now have `action` (`None` = no rule).
    pub fn set(&mut self, dest: Destination, action: Option<Action>) {
        self.pending.insert(dest, action);
    }

    /// Records whether a proxy port is in use (and so guarded).
    pub fn set_proxy_port(&mut self, port: ProxyPort, in_use: bool) {
        self.pending_ports.insert(port, in_use);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.pending_ports.is_empty() || !self.installed
    }

    pub fn applied(&self) -> &BTreeMap<Destination, Action> {
        &self.applied
    }

    /// Brings the kernel up to date in one transaction. The first sync
    /// replaces the whole table (clearing whatever an earlier run left);
    /// later ones send element changes, falling back to a whole replacement
    /// if the kernel's table no longer matches (e.g. someone deleted it).
    pub async fn sync(&mut self) -> Result<(SyncKind, Duration), RulesError> {
        let started = Instant::now();
        let mut next = self.applied.clone();
        for (d, a) in &self.pending {
            match a {
                Some(a) => next.insert(*d, *a),
                None => next.remove(d),
            };
        }
        let mut next_ports = self.applied_ports.clone();
        for (p, in_use) in &self.pending_ports {
            if *in_use {
                next_ports.insert(*p);
            } else {
                next_ports.remove(p);
            }
        }
        let port_changes: Vec<(ProxyPort, bool)> = self
            .pending_ports
            .iter()
            .filter(|(p, in_use)| self.applied_ports.contains(*p) != **in_use)
            .map(|(p, in_use)| (*p, *in_use))
            .collect();
        let kind = if !self.installed {
            apply(&render::full(&next, &next_ports)).await?;
            self.installed = true;
            SyncKind::Full {
                elements: next.len(),
            }
        } else {
            let changes: Vec<render::Change> = self
                .pending
                .iter()
                .map(|(d, a)| render::Change {
                    dest: *d,
                    old: self.applied.get(d).copied(),
                    new: *a,
                })
                .filter(|c| c.old != c.new)
                .collect();
            match render::delta(&changes, &port_changes) {
                None => SyncKind::Unchanged,
                Some(batch) => match apply(&batch).await {
                    Ok(()) => SyncKind::Delta {
                        changes: changes.len() + port_changes.len(),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "incremental rule update failed; replacing the whole table");
                        apply(&render::full(&next, &next_ports)).await?;
                        SyncKind::Full {
                            elements: next.len(),
                        }
                    }
                },
            }
        };
        self.applied = next;
        self.pending.clear();
        self.applied_ports = next_ports;
        self.pending_ports.clear();
        Ok((kind, started.elapsed()))
    }

    /// Removes the table from the kernel (shutdown, `--cleanup`).
    pub async fn delete() -> Result<(), RulesError> {
        apply(&render::delete_table()).await
    }
}
