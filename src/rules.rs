//! nftables: what the kernel should do with Service traffic.
//!
//! [`render`] turns the desired destinations into JSON batches (pure);
//! [`nft`] runs them and reads the table back; [`RuleTable`] keeps who wants
//! which destination, what the kernel holds, and sends only changes after
//! the first sync.
//!
//! A destination (ClusterIP . protocol . port) belongs to one Service port
//! at a time. Service ports *claim* and *release* destinations; when two
//! claim the same one (a Service renamed within one sync, or two manifests
//! that disagree), the earlier claim holds it, and when it lets go the next
//! takes over: the end state never depends on the order in which Services
//! were reconciled.
//!
//! No input from the API may fail the node's transaction. What goes into
//! interval sets is aggregated first ([`render::normalise`]); and when nft
//! still refuses a batch, the Service ports responsible are found (the
//! table is checked with `nft --check`, bisecting the Service ports), left
//! out with a warning each naming it and nft's words, and every other one
//! is programmed. A left-out Service port is tried again when it changes,
//! and every [`REFUSED_RETRY`].

pub mod alive;
pub mod conntrack;
#[cfg(test)]
pub mod fake;
pub mod host;
pub mod kube_proxy;
pub mod nft;
pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::model::{IpFamily, ServicePortName};
pub use alive::Writer;
pub use nft::{KernelTable, Nft, NftCommand, RulesError};
pub use render::{Action, Destination, Instance, Key, Layout, ProxyPort};

/// How often Service ports nft refused are tried again although they did
/// not change (the refusal may have come from the kernel's state, e.g. a
/// module loaded since). Each try costs a refused transaction and a
/// bisection, hence not every sync period.
pub const REFUSED_RETRY: Duration = Duration::from_secs(300);

/// How a sync was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Nothing differed from what the kernel holds.
    Unchanged,
    /// The table was (re)created whole, with every element.
    Full { elements: usize },
    /// Only changed elements were sent.
    Delta { changes: usize },
    /// Another instance (a newer one, during a rolling update) wrote the
    /// table since our last write; we leave the rules to it.
    Superseded,
}

/// What the drift check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// The kernel holds what we applied.
    Intact,
    /// It does not; the next sync rewrites the whole table. The strings say
    /// what was wrong.
    Drifted(Vec<String>),
    /// Another instance wrote the table, and runs.
    Superseded,
    /// The instance that had taken the table over is gone (killed, crashed,
    /// stopped); this one writes again: the next sync writes the whole
    /// table with its own id.
    TakenBack { writer: u32 },
    /// Nothing applied yet: nothing to check.
    NotApplied,
}

/// What the kernel holds after our last successful sync.
#[derive(Debug, Clone, Default)]
struct Applied {
    elements: BTreeMap<Key, Action>,
    ports: BTreeSet<(IpFamily, ProxyPort)>,
}

/// The proxy's table in the kernel, and what we know it holds.
#[derive(Debug)]
pub struct RuleTable<N: Nft> {
    nft: N,
    layout: Layout,
    /// Who wants each destination, oldest claim first; the first one's
    /// action is what the kernel should have.
    claims: BTreeMap<Key, Vec<(ServicePortName, Action)>>,
    /// Proxy ports in use (guarded), per family (each family's listeners
    /// bind its own proxy address).
    ports: BTreeSet<(IpFamily, ProxyPort)>,
    /// `None` until the first successful sync, and after drift: the next
    /// sync then writes the whole table.
    applied: Option<Applied>,
    /// Destinations and ports changed since the last successful sync.
    dirty: BTreeSet<Key>,
    dirty_ports: BTreeSet<(IpFamily, ProxyPort)>,
    /// The instance that took the table over, while it runs: we leave
    /// the rules to it, and take them back when it is gone (checked at
    /// each [`RuleTable::verify`]).
    superseded: Option<Writer>,
    /// Service ports whose keys nft refused, with nft's words: left out of
    /// the table until they change or [`REFUSED_RETRY`] has passed.
    refused: BTreeMap<ServicePortName, String>,
    /// When the last Service port was left out.
    refused_at: Option<Instant>,
}

impl<N: Nft> RuleTable<N> {
    pub fn new(nft: N, layout: Layout) -> Self {
        RuleTable {
            nft,
            layout,
            claims: BTreeMap::new(),
            ports: BTreeSet::new(),
            applied: None,
            dirty: BTreeSet::new(),
            dirty_ports: BTreeSet::new(),
            superseded: None,
            refused: BTreeMap::new(),
            refused_at: None,
        }
    }

    /// `owner` wants `dest` to have `action`.
    pub fn claim(&mut self, dest: Key, owner: &ServicePortName, action: Action) {
        let claimants = self.claims.entry(dest).or_default();
        let changed = match claimants.iter_mut().find(|(o, _)| o == owner) {
            Some((_, a)) => std::mem::replace(a, action) != action,
            None => {
                if let Some((holder, _)) = claimants.first() {
                    warn!(
                        destination = %dest,
                        holder = %holder,
                        claimant = %owner,
                        "two Service ports claim one destination; the first keeps it until it lets go"
                    );
                }
                // Almost always the only claimant: room for one, not four.
                claimants.reserve_exact(1);
                claimants.push((owner.clone(), action));
                true
            }
        };
        self.dirty.insert(dest);
        if changed {
            self.retry_owner(owner);
        }
    }

    /// `owner` no longer wants `dest`; the next claimant, if any, gets it.
    pub fn release(&mut self, dest: Key, owner: &ServicePortName) {
        if let Some(claimants) = self.claims.get_mut(&dest) {
            let before = claimants.len();
            claimants.retain(|(o, _)| o != owner);
            let changed = claimants.len() != before;
            if claimants.is_empty() {
                self.claims.remove(&dest);
            }
            self.dirty.insert(dest);
            if changed {
                self.retry_owner(owner);
            }
        }
    }

    /// A Service port nft refused changed: it is tried again at the next
    /// sync (its keys are sent again).
    fn retry_owner(&mut self, owner: &ServicePortName) {
        if self.refused.remove(owner).is_some() {
            self.mark_owner_dirty(owner);
        }
    }

    fn mark_owner_dirty(&mut self, owner: &ServicePortName) {
        let keys: Vec<Key> = self
            .claims
            .iter()
            .filter(|(_, c)| c.iter().any(|(o, _)| o == owner))
            .map(|(k, _)| *k)
            .collect();
        self.dirty.extend(keys);
    }

    /// What the kernel should have for `dest` (as claimed: an allowed
    /// source range may reach the kernel inside a wider one). A Service
    /// port nft refused has no say.
    pub fn desired(&self, dest: &Key) -> Option<Action> {
        self.wanted(dest, &self.refused)
    }

    /// The action of the first claimant of `dest` not in `left_out`.
    fn wanted(&self, dest: &Key, left_out: &BTreeMap<ServicePortName, String>) -> Option<Action> {
        self.claims
            .get(dest)?
            .iter()
            .find(|(o, _)| !left_out.contains_key(o))
            .map(|(_, a)| *a)
    }

    /// Whether the kernel holds what is wanted for `dest` (an allowed
    /// range: inside one of the ranges applied for its destination).
    pub fn is_applied(&self, dest: &Key) -> bool {
        let Some(applied) = &self.applied else {
            return false;
        };
        match (dest, self.desired(dest)) {
            (Key::Allow(d, net), Some(_)) => {
                allowed_of(&applied.elements, d).any(|n| n.contains(net))
            }
            (_, want) => applied.elements.get(dest).copied() == want,
        }
    }

    /// The Service ports nft refused, with nft's words: left out of the
    /// table (see [`REFUSED_RETRY`]).
    pub fn refused(&self) -> &BTreeMap<ServicePortName, String> {
        &self.refused
    }

    /// Tries the refused Service ports again if [`REFUSED_RETRY`] has
    /// passed since the last was left out (called every sync period).
    pub fn retry_refused(&mut self) {
        if self.refused.is_empty() || self.refused_at.is_some_and(|t| t.elapsed() < REFUSED_RETRY) {
            return;
        }
        for owner in std::mem::take(&mut self.refused).into_keys() {
            self.mark_owner_dirty(&owner);
        }
    }

    /// Records whether a proxy port of `family` is in use (and so guarded).
    pub fn set_proxy_port(&mut self, family: IpFamily, port: ProxyPort, in_use: bool) {
        let port = (family, port);
        let changed = if in_use {
            self.ports.insert(port)
        } else {
            self.ports.remove(&port)
        };
        if changed {
            self.dirty_ports.insert(port);
        }
    }

    /// Whether the kernel may differ from what is wanted.
    pub fn has_pending(&self) -> bool {
        self.superseded.is_none()
            && (self.applied.is_none() || !self.dirty.is_empty() || !self.dirty_ports.is_empty())
    }

    /// The elements the kernel holds, as far as we know.
    pub fn applied(&self) -> BTreeMap<Key, Action> {
        self.applied
            .as_ref()
            .map(|a| a.elements.clone())
            .unwrap_or_default()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Changes the layout (what the Node object decides: the node-port
    /// addresses of `primary`, the pod ranges of NodeCIDR). A change is
    /// written by the next sync as a whole table, in one transaction, so
    /// no packet meets half of it; returns whether anything changed.
    pub fn update_layout(&mut self, change: impl FnOnce(&mut Layout)) -> bool {
        let before = self.layout.clone();
        change(&mut self.layout);
        if self.layout == before {
            return false;
        }
        self.applied = None;
        true
    }

    pub fn is_superseded(&self) -> bool {
        self.superseded.is_some()
    }

    /// The instance that writes the rules instead of this one, if any.
    pub fn writer(&self) -> Option<&Writer> {
        self.superseded.as_ref()
    }

    /// The elements the kernel should hold with the Service ports of
    /// `left_out` left out, as the kernel gets them (normalised).
    fn elements_without(
        &self,
        left_out: &BTreeMap<ServicePortName, String>,
    ) -> BTreeMap<Key, Action> {
        render::normalise(
            self.claims
                .keys()
                .filter_map(|d| self.wanted(d, left_out).map(|a| (*d, a)))
                .collect(),
        )
    }

    /// The whole table with the Service ports of `left_out` left out.
    fn full_without(
        &self,
        left_out: &BTreeMap<ServicePortName, String>,
    ) -> nftables::schema::Nftables<'static> {
        render::full(&self.layout, &self.elements_without(left_out), &self.ports)
    }

    /// Writes the whole table. When nft refuses it, finds the Service
    /// ports it is refused for ([`Self::find_refused`]), leaves them out
    /// and writes the rest; a refusal that no Service port explains (the
    /// table itself) is the error.
    async fn write_full(&mut self) -> Result<SyncKind, RulesError> {
        let batch = self.full_without(&self.refused);
        match self.nft.apply(&batch).await {
            Ok(()) => {}
            Err(RulesError::Rejected { stderr }) => {
                let found = self.find_refused().await?;
                if found.is_empty() {
                    return Err(RulesError::Rejected { stderr });
                }
                for (owner, reason) in &found {
                    warn!(
                        service = %owner.service,
                        port = %owner.port,
                        protocol = %owner.protocol,
                        reason = %reason,
                        "nft refuses this Service port's rules; it is left out and every other Service is programmed (tried again when it changes)"
                    );
                }
                self.refused.extend(found);
                self.refused_at = Some(Instant::now());
                let batch = self.full_without(&self.refused);
                self.nft.apply(&batch).await?;
            }
            Err(e) => return Err(e),
        }
        let elements = self.elements_without(&self.refused);
        let n = elements.len();
        self.applied = Some(Applied {
            elements,
            ports: self.ports.clone(),
        });
        self.dirty.clear();
        self.dirty_ports.clear();
        Ok(SyncKind::Full { elements: n })
    }

    /// The Service ports for which nft refuses the table, with nft's
    /// words for each; empty when the table without any Service is refused
    /// too (then no Service is to blame) or when every one passes.
    ///
    /// Adaptive group testing with `nft --check` (nothing reaches the
    /// kernel's ruleset on the way): a group of Service ports is added to
    /// those known good; if the table passes they are good too, if not the
    /// group is halved, down to single Service ports, which are the ones
    /// refused. Those of the keys changed since the last write form their
    /// own group, tried last, so the usual case (one new Service at fault)
    /// costs about two checks per halving of that group. With k Service
    /// ports to blame among n it takes O(k log n) checks, at most 2n.
    async fn find_refused(&mut self) -> Result<BTreeMap<ServicePortName, String>, RulesError> {
        let mut all: BTreeSet<&ServicePortName> = BTreeSet::new();
        let mut changed: BTreeSet<&ServicePortName> = BTreeSet::new();
        for (k, claimants) in &self.claims {
            for (o, _) in claimants
                .iter()
                .filter(|(o, _)| !self.refused.contains_key(o))
            {
                all.insert(o);
                if self.dirty.contains(k) {
                    changed.insert(o);
                }
            }
        }
        let suspects: Vec<ServicePortName> = all.iter().map(|o| (*o).clone()).collect();
        let settled: Vec<ServicePortName> =
            all.difference(&changed).map(|o| (*o).clone()).collect();
        let changed: Vec<ServicePortName> = changed.into_iter().cloned().collect();

        // Everyone out: the good ones are let in, group by group.
        let mut out: BTreeMap<ServicePortName, String> = self.refused.clone();
        for o in &suspects {
            out.insert(o.clone(), String::new());
        }
        let batch = self.full_without(&out);
        if self.nft.check(&batch).await.is_err() {
            return Ok(BTreeMap::new());
        }
        let mut found = BTreeMap::new();
        // A stack of groups still to try: the settled ones first.
        let mut groups: Vec<Vec<ServicePortName>> = [changed, settled]
            .into_iter()
            .filter(|g| !g.is_empty())
            .collect();
        while let Some(group) = groups.pop() {
            for o in &group {
                out.remove(o);
            }
            let batch = self.full_without(&out);
            match self.nft.check(&batch).await {
                Ok(()) => {}
                Err(e) => {
                    for o in &group {
                        out.insert(o.clone(), String::new());
                    }
                    match group.as_slice() {
                        [one] => {
                            let reason = match e {
                                RulesError::Rejected { stderr } => stderr,
                                other => other.to_string(),
                            };
                            found.insert(one.clone(), reason);
                        }
                        _ => {
                            let mut first = group;
                            let second = first.split_off(first.len() / 2);
                            // The first half is tried first.
                            groups.push(second);
                            groups.push(first);
                        }
                    }
                }
            }
        }
        Ok(found)
    }

    /// The other instance that wrote the table, if one did (read from the
    /// kernel; the `ip` table tells, both are written together).
    async fn taken_over(&mut self) -> Option<Writer> {
        match self.nft.read(IpFamily::V4).await {
            Ok(Some(t)) => self.other_writer(&t),
            _ => None,
        }
    }

    /// The writer of `t` when it is not this instance.
    fn other_writer(&self, t: &KernelTable) -> Option<Writer> {
        t.instance
            .filter(|id| *id != self.layout.instance.id)
            .map(|id| Writer::new(id, t.note.as_deref()))
    }

    /// Brings the kernel up to date in one transaction. The first sync
    /// replaces the whole table (what an earlier run left is replaced
    /// atomically); later ones send element changes. When a change is
    /// refused, the table is read: if another instance wrote it we stop
    /// writing ([`SyncKind::Superseded`]) while it runs, otherwise the
    /// whole table is written again. On error nothing is forgotten: the next sync retries.
    pub async fn sync(&mut self) -> Result<(SyncKind, Duration), RulesError> {
        let started = Instant::now();
        if self.superseded.is_some() {
            return Ok((SyncKind::Superseded, started.elapsed()));
        }
        let Some(applied) = &self.applied else {
            let kind = self.write_full().await?;
            return Ok((kind, started.elapsed()));
        };
        let changes = self.changes(applied);
        let port_changes: Vec<((IpFamily, ProxyPort), bool)> = self
            .dirty_ports
            .iter()
            .map(|p| (*p, self.ports.contains(p)))
            .filter(|(p, in_use)| applied.ports.contains(p) != *in_use)
            .collect();
        let Some(batch) = render::delta(&changes, &port_changes) else {
            self.dirty.clear();
            self.dirty_ports.clear();
            return Ok((SyncKind::Unchanged, started.elapsed()));
        };
        let kind = match self.nft.apply(&batch).await {
            Ok(()) => {
                if let Some(applied) = &mut self.applied {
                    for c in &changes {
                        match c.new {
                            Some(a) => applied.elements.insert(c.key, a),
                            None => applied.elements.remove(&c.key),
                        };
                    }
                    for (p, in_use) in &port_changes {
                        if *in_use {
                            applied.ports.insert(*p);
                        } else {
                            applied.ports.remove(p);
                        }
                    }
                }
                self.dirty.clear();
                self.dirty_ports.clear();
                SyncKind::Delta {
                    changes: changes.len() + port_changes.len(),
                }
            }
            Err(e) => match self.taken_over().await {
                Some(writer) if writer.alive() => {
                    info!(
                        writer = format_args!("{:08x}", writer.id),
                        "another kube-uproxy instance wrote the rules since our last write; leaving them to it"
                    );
                    self.superseded = Some(writer);
                    SyncKind::Superseded
                }
                Some(writer) => {
                    info!(
                        writer = format_args!("{:08x}", writer.id),
                        "another kube-uproxy instance wrote the rules since our last write and is gone; writing the whole table"
                    );
                    self.write_full().await?
                }
                None => {
                    warn!(error = %e, "incremental rule update failed; writing the whole table");
                    self.write_full().await?
                }
            },
        };
        Ok((kind, started.elapsed()))
    }

    /// The element changes that take the kernel from `applied` to what is
    /// wanted for the dirty keys. The allowed ranges of a destination one
    /// of whose ranges changed are aggregated before and after, and the
    /// difference is sent: a range inside one already held adds nothing,
    /// the release of a wide one brings back the narrower ones it hid.
    fn changes(&self, applied: &Applied) -> Vec<render::Change> {
        let mut out = Vec::new();
        let mut guarded: BTreeSet<Destination> = BTreeSet::new();
        for k in &self.dirty {
            match k {
                Key::Allow(d, _) => {
                    guarded.insert(*d);
                }
                _ => out.push(render::Change {
                    key: *k,
                    old: applied.elements.get(k).copied(),
                    new: self.desired(k),
                }),
            }
        }
        for d in guarded {
            let want: Vec<ipnet::IpNet> = allowed_of_claims(&self.claims, &d)
                .filter(|k| self.desired(k).is_some())
                .filter_map(|k| match k {
                    Key::Allow(_, net) => Some(net.trunc()),
                    _ => None,
                })
                .collect();
            let want: BTreeSet<ipnet::IpNet> = ipnet::IpNet::aggregate(&want).into_iter().collect();
            let held: BTreeSet<ipnet::IpNet> = allowed_of(&applied.elements, &d).collect();
            for net in held.difference(&want) {
                out.push(render::Change {
                    key: Key::Allow(d, *net),
                    old: Some(Action::Member),
                    new: None,
                });
            }
            for net in want.difference(&held) {
                out.push(render::Change {
                    key: Key::Allow(d, *net),
                    old: None,
                    new: Some(Action::Member),
                });
            }
        }
        out.retain(|c| c.old != c.new);
        out
    }

    /// Compares the kernel's table with what we applied. On a difference
    /// the next sync writes the whole table.
    ///
    /// While superseded, checks instead that the writer still runs (the
    /// one whose id the table holds now, or the one we left it to if the
    /// table is gone); when it does not, this instance takes the rules
    /// back. Called every `--sync-period`: a dead writer is replaced within
    /// one period, well inside the health timeout of two.
    pub async fn verify(&mut self) -> Result<Verified, RulesError> {
        if let Some(writer) = &self.superseded {
            let current = match self.nft.read(IpFamily::V4).await? {
                Some(t) => match t.instance {
                    Some(id) if id == self.layout.instance.id => None,
                    Some(_) => self.other_writer(&t),
                    None => Some(writer.clone()),
                },
                None => Some(writer.clone()),
            };
            match current {
                Some(w) if w.alive() => {
                    self.superseded = Some(w);
                    return Ok(Verified::Superseded);
                }
                gone => {
                    let writer = gone.map_or(writer.id, |w| w.id);
                    info!(
                        writer = format_args!("{writer:08x}"),
                        "the instance that took the rules over is gone; taking them back"
                    );
                    self.superseded = None;
                    self.applied = None;
                    return Ok(Verified::TakenBack { writer });
                }
            }
        }
        let Some(applied) = &self.applied else {
            return Ok(Verified::NotApplied);
        };
        let mut problems = Vec::new();
        for family in self.layout.families() {
            let found = self.nft.read(family).await?;
            match &found {
                None if family == IpFamily::V4 => problems.push("the table is gone".into()),
                None => problems.push("the ip6 table is gone".into()),
                Some(t) if family == IpFamily::V4 && self.other_writer(t).is_some() => {
                    match self.other_writer(t) {
                        Some(w) if w.alive() => {
                            info!(
                                writer = format_args!("{:08x}", w.id),
                                "another kube-uproxy instance wrote the rules; leaving them to it"
                            );
                            self.superseded = Some(w);
                            return Ok(Verified::Superseded);
                        }
                        Some(w) => problems
                            .push(format!("instance {:08x} wrote the table and is gone", w.id)),
                        None => {}
                    }
                }
                Some(t) => problems.extend(
                    differences(&self.layout, family, applied, t)
                        .into_iter()
                        .map(|p| match family {
                            IpFamily::V4 => p,
                            IpFamily::V6 => format!("ip6 table: {p}"),
                        }),
                ),
            }
        }
        if problems.is_empty() {
            return Ok(Verified::Intact);
        }
        // Everything is written again at the next sync.
        self.applied = None;
        Ok(Verified::Drifted(problems))
    }

    /// Reads the table of `family` an earlier instance left, if any.
    pub async fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, RulesError> {
        self.nft.read(family).await
    }
}

/// The first and last possible keys of destination `d`'s allowed ranges.
fn allowed_range(d: &Destination) -> std::ops::RangeInclusive<Key> {
    let lowest = ipnet::IpNet::V4(ipnet::Ipv4Net::default());
    let highest = ipnet::IpNet::V6(
        ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(u128::MAX), 128).unwrap_or_default(),
    );
    Key::Allow(*d, lowest)..=Key::Allow(*d, highest)
}

/// The allowed ranges of destination `d` in `elements`.
fn allowed_of<'a>(
    elements: &'a BTreeMap<Key, Action>,
    d: &Destination,
) -> impl Iterator<Item = ipnet::IpNet> + 'a {
    elements
        .range(allowed_range(d))
        .filter_map(|(k, _)| match k {
            Key::Allow(_, net) => Some(*net),
            _ => None,
        })
}

/// The allowed-range keys of destination `d` that are claimed.
fn allowed_of_claims<'a>(
    claims: &'a BTreeMap<Key, Vec<(ServicePortName, Action)>>,
    d: &Destination,
) -> impl Iterator<Item = &'a Key> + 'a {
    claims.range(allowed_range(d)).map(|(k, _)| k)
}

/// What differs between what we applied and what the kernel holds, in
/// words for the log. Counts, with a few examples, not every element.
fn differences(
    layout: &Layout,
    family: IpFamily,
    applied: &Applied,
    t: &KernelTable,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, ..) in render::CHAINS {
        let want = render::rules_in_chain(layout, family, name);
        match t.chains.get(name) {
            None => out.push(format!("chain {name} is missing")),
            Some(&n) if n != want => out.push(format!("chain {name} has {n} rules, not {want}")),
            Some(_) => {}
        }
    }
    if t.chains.len() > render::CHAINS.len() {
        out.push(format!(
            "{} chains that we did not write",
            t.chains.len() - render::CHAINS.len()
        ));
    }
    let nodeport_addresses = layout.nodeport_addresses_of(family);
    if t.nodeport_addresses != nodeport_addresses {
        out.push(format!(
            "nodeport-addresses holds {:?}, not {:?}",
            t.nodeport_addresses, nodeport_addresses
        ));
    }
    let proxy_address = layout.proxy_address_of(family);
    if t.proxy_address != proxy_address {
        out.push(format!(
            "the DNAT goes to {:?}, not {:?}",
            t.proxy_address, proxy_address
        ));
    }
    if t.instance.is_none() {
        out.push("the instance set is empty".into());
    }
    let found = &t.elements;
    let mine = || {
        applied
            .elements
            .iter()
            .filter(|(d, _)| d.family() == family)
    };
    let missing: Vec<String> = mine()
        .filter(|(d, a)| found.get(d) != Some(a))
        .map(|(d, _)| d.to_string())
        .collect();
    let extra: Vec<String> = found
        .keys()
        .filter(|d| !applied.elements.contains_key(d))
        .map(|d| d.to_string())
        .collect();
    for (what, list) in [("missing or changed", missing), ("unexpected", extra)] {
        if !list.is_empty() {
            let shown: Vec<&str> = list.iter().take(3).map(String::as_str).collect();
            out.push(format!(
                "{} elements {what} (e.g. {})",
                list.len(),
                shown.join(", ")
            ));
        }
    }
    let ports: BTreeSet<ProxyPort> = applied
        .ports
        .iter()
        .filter(|(f, _)| *f == family)
        .map(|(_, p)| *p)
        .collect();
    if t.proxy_ports != ports {
        out.push(format!(
            "proxy-ports holds {} ports, not {}",
            t.proxy_ports.len(),
            ports.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::fake::FakeNft;
    use super::*;
    use crate::model::{ObjectKey, Protocol};

    fn layout() -> Layout {
        Layout {
            proxy_address: "169.254.42.1".parse().unwrap(),
            proxy_address_v6: None,
            nodeport_addresses: None,
            instance: Instance {
                id: 1,
                note: String::new(),
            },
            upstream_mark: 0x2000,
            local_traffic: None,
            preserve_client_ip_mark: 0x1000,
        }
    }

    fn owner(name: &str) -> ServicePortName {
        ServicePortName {
            service: ObjectKey {
                namespace: "default".into(),
                name: name.into(),
            },
            port: String::new(),
            protocol: Protocol::Tcp,
        }
    }

    fn dest(port: u16) -> Key {
        Key::Service(Destination {
            ip: "10.96.0.10".parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        })
    }

    fn kernel(fake: &FakeNft, port: u16) -> Option<Action> {
        fake.table()?.elements.get(&dest(port)).copied()
    }

    #[tokio::test]
    async fn a_reused_destination_ends_with_its_current_holder_in_either_order() {
        for release_first in [true, false] {
            let fake = FakeNft::default();
            let mut t = RuleTable::new(fake.clone(), layout());
            t.claim(dest(80), &owner("old"), Action::Redirect(20000));
            t.sync().await.unwrap();
            // One sync: "old" goes, "new" takes the same ClusterIP:port.
            if release_first {
                t.release(dest(80), &owner("old"));
                t.claim(dest(80), &owner("new"), Action::Redirect(20001));
            } else {
                t.claim(dest(80), &owner("new"), Action::Redirect(20001));
                t.release(dest(80), &owner("old"));
            }
            t.sync().await.unwrap();
            assert_eq!(
                kernel(&fake, 80),
                Some(Action::Redirect(20001)),
                "release_first={release_first}"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_sync_keeps_its_changes_for_the_next() {
        let fake = FakeNft::default();
        let mut t = RuleTable::new(fake.clone(), layout());
        t.claim(dest(80), &owner("a"), Action::Redirect(20000));
        t.sync().await.unwrap();
        fake.fail_next(2, "Error: simulated");
        t.release(dest(80), &owner("a"));
        let err = t.sync().await.unwrap_err();
        assert!(err.to_string().contains("simulated"), "{err}");
        assert!(t.has_pending());
        assert!(kernel(&fake, 80).is_some());
        t.sync().await.unwrap();
        assert!(kernel(&fake, 80).is_none());
        assert!(!t.has_pending());
    }

    #[tokio::test]
    async fn drift_is_found_named_and_repaired() {
        let fake = FakeNft::default();
        let mut t = RuleTable::new(fake.clone(), layout());
        t.claim(dest(80), &owner("a"), Action::Redirect(20000));
        t.claim(dest(81), &owner("b"), Action::Reject);
        t.sync().await.unwrap();
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);

        fake.flush();
        match t.verify().await.unwrap() {
            Verified::Drifted(p) => assert_eq!(p, ["the table is gone"]),
            v => panic!("{v:?}"),
        }
        assert!(t.has_pending());
        let (kind, _) = t.sync().await.unwrap();
        assert_eq!(kind, SyncKind::Full { elements: 2 });
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);

        fake.edit(|k| {
            k.elements.remove(&dest(80));
        });
        match t.verify().await.unwrap() {
            Verified::Drifted(p) => {
                assert!(p[0].contains("1 elements missing"), "{p:?}");
                assert!(p[0].contains("10.96.0.10:80/TCP"), "{p:?}");
            }
            v => panic!("{v:?}"),
        }
        t.sync().await.unwrap();
        assert_eq!(kernel(&fake, 80), Some(Action::Redirect(20000)));
    }

    #[tokio::test]
    async fn a_newer_instance_takes_the_table_over() {
        let fake = FakeNft::default();
        let mut old = RuleTable::new(fake.clone(), layout());
        old.claim(dest(80), &owner("a"), Action::Redirect(20000));
        old.sync().await.unwrap();
        let mut new_layout = layout();
        new_layout.instance.id = 2;
        let mut new = RuleTable::new(fake.clone(), new_layout);
        new.claim(dest(80), &owner("a"), Action::Redirect(20000));
        new.claim(dest(82), &owner("c"), Action::Redirect(20005));
        new.sync().await.unwrap();
        // The old one's next refused change does not clobber the new table.
        old.claim(dest(82), &owner("c"), Action::Redirect(20009));
        let (kind, _) = old.sync().await.unwrap();
        assert_eq!(kind, SyncKind::Superseded);
        assert!(!old.has_pending());
        assert_eq!(kernel(&fake, 82), Some(Action::Redirect(20005)));
        assert_eq!(fake.table().unwrap().instance, Some(2));
        assert_eq!(old.verify().await.unwrap(), Verified::Superseded);
    }

    fn lb(port: u16) -> Destination {
        Destination {
            ip: "10.200.8.8".parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        }
    }

    fn allowed(fake: &FakeNft, d: Destination) -> Vec<String> {
        fake.table()
            .map(|t| {
                t.elements
                    .keys()
                    .filter_map(|k| match k {
                        Key::Allow(d2, net) if *d2 == d => Some(net.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn overlapping_source_ranges_reach_the_kernel_aggregated_in_full_and_in_deltas() {
        let fake = FakeNft::default();
        let mut t = RuleTable::new(fake.clone(), layout());
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        // One Service's ["10.0.0.0/8", "10.77.0.0/16"], another's the same
        // /8 on the same LB destination, and a normal Service.
        for (o, n) in [
            ("a", "10.0.0.0/8"),
            ("a", "10.77.0.0/16"),
            ("b", "10.0.0.0/8"),
        ] {
            t.claim(Key::Guarded(lb(80)), &owner(o), Action::Member);
            t.claim(Key::Allow(lb(80), net(n)), &owner(o), Action::Member);
        }
        t.claim(dest(80), &owner("c"), Action::Redirect(20000));
        let (kind, _) = t.sync().await.unwrap();
        assert!(matches!(kind, SyncKind::Full { .. }), "{kind:?}");
        assert_eq!(allowed(&fake, lb(80)), ["10.0.0.0/8"]);
        assert_eq!(kernel(&fake, 80), Some(Action::Redirect(20000)));
        assert!(t.refused().is_empty());
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);
        assert!(t.is_applied(&Key::Allow(lb(80), net("10.77.0.0/16"))));

        // A range inside one held adds nothing; one beside it is added.
        t.claim(
            Key::Allow(lb(80), net("10.1.2.0/24")),
            &owner("c"),
            Action::Member,
        );
        t.claim(
            Key::Allow(lb(80), net("192.0.2.0/24")),
            &owner("c"),
            Action::Member,
        );
        assert!(matches!(t.sync().await.unwrap().0, SyncKind::Delta { .. }));
        assert_eq!(allowed(&fake, lb(80)), ["10.0.0.0/8", "192.0.2.0/24"]);
        // The /8 let go by one claimant only: nothing changes.
        t.release(Key::Allow(lb(80), net("10.0.0.0/8")), &owner("a"));
        t.sync().await.unwrap();
        assert_eq!(allowed(&fake, lb(80)), ["10.0.0.0/8", "192.0.2.0/24"]);
        // Let go by both: the narrower ranges it hid come back, in a delta.
        t.release(Key::Allow(lb(80), net("10.0.0.0/8")), &owner("b"));
        assert!(matches!(t.sync().await.unwrap().0, SyncKind::Delta { .. }));
        assert_eq!(
            allowed(&fake, lb(80)),
            ["10.1.2.0/24", "10.77.0.0/16", "192.0.2.0/24"]
        );
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);
        assert!(t.refused().is_empty());
    }

    #[tokio::test]
    async fn overlapping_nodeport_addresses_are_aggregated() {
        let fake = FakeNft::default();
        let mut l = layout();
        l.nodeport_addresses = Some(vec![
            "10.0.0.0/8".parse().unwrap(),
            "10.200.0.0/24".parse().unwrap(),
            "10.200.0.7/32".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ]);
        let mut t = RuleTable::new(fake.clone(), l);
        t.claim(dest(80), &owner("a"), Action::Redirect(20000));
        t.sync().await.unwrap();
        assert_eq!(
            fake.table().unwrap().nodeport_addresses,
            Some(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.0.2.0/24".parse().unwrap()
            ])
        );
        assert_eq!(kernel(&fake, 80), Some(Action::Redirect(20000)));
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);
    }

    /// kube-proxy's `NewNodePortAddresses`: a family without a CIDR of its
    /// own, or with its zero CIDR, catches node ports on all its
    /// addresses (no `nodeport-addresses` set in its table).
    #[tokio::test]
    async fn a_family_without_nodeport_cidrs_of_its_own_serves_every_address() {
        let fake = FakeNft::default();
        let mut l = layout();
        l.proxy_address_v6 = Some("fd6b:7570:7278::1".parse().unwrap());
        l.nodeport_addresses = Some(vec!["10.200.0.0/24".parse().unwrap()]);
        let mut t = RuleTable::new(fake.clone(), l);
        t.claim(dest(80), &owner("a"), Action::Redirect(20000));
        t.sync().await.unwrap();
        let ip = fake.table_of(IpFamily::V4).unwrap();
        assert_eq!(
            ip.nodeport_addresses,
            Some(vec!["10.200.0.0/24".parse().unwrap()])
        );
        assert_eq!(
            fake.table_of(IpFamily::V6).unwrap().nodeport_addresses,
            None
        );
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);

        // The layout follows the Node (`primary`): the next sync writes
        // the whole table with the new set; an unchanged one writes nothing.
        assert!(t.update_layout(|l| {
            l.nodeport_addresses = Some(vec![
                "0.0.0.0/0".parse().unwrap(),
                "fd00:200::1/128".parse().unwrap(),
            ])
        }));
        assert!(t.has_pending());
        assert!(matches!(t.sync().await.unwrap().0, SyncKind::Full { .. }));
        assert_eq!(
            fake.table_of(IpFamily::V4).unwrap().nodeport_addresses,
            None
        );
        assert_eq!(
            fake.table_of(IpFamily::V6).unwrap().nodeport_addresses,
            Some(vec!["fd00:200::1/128".parse().unwrap()])
        );
        assert_eq!(kernel(&fake, 80), Some(Action::Redirect(20000)));
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);
        assert!(!t.update_layout(|_| {}));
        assert!(!t.has_pending());
    }

    #[tokio::test]
    async fn a_service_port_nft_refuses_is_found_left_out_and_named_while_every_other_is_programmed()
     {
        let fake = FakeNft::default();
        let mut t = RuleTable::new(fake.clone(), layout());
        // 40 Service ports; nft refuses the elements of "bad" only.
        for i in 0..40u16 {
            t.claim(
                dest(1000 + i),
                &owner(&format!("svc{i}")),
                Action::Redirect(20000 + i),
            );
        }
        t.claim(dest(80), &owner("bad"), Action::Redirect(21000));
        t.claim(dest(81), &owner("bad"), Action::Reject);
        fake.refuse_key(dest(81), "Error: Could not process rule: simulated");
        let (kind, _) = t.sync().await.unwrap();
        assert_eq!(kind, SyncKind::Full { elements: 40 });
        for i in 0..40u16 {
            assert_eq!(kernel(&fake, 1000 + i), Some(Action::Redirect(20000 + i)));
        }
        assert_eq!(
            kernel(&fake, 80),
            None,
            "the refused Service port is left out whole"
        );
        let refused: Vec<_> = t.refused().iter().collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(*refused[0].0, owner("bad"));
        assert!(refused[0].1.contains("simulated"), "{refused:?}");
        // A bisection, not one check per Service port.
        assert!(fake.checks() <= 16, "{} checks", fake.checks());
        assert!(!t.has_pending());
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);

        // Later changes of the others go on as deltas.
        t.claim(dest(1000), &owner("svc0"), Action::Reject);
        assert!(matches!(t.sync().await.unwrap().0, SyncKind::Delta { .. }));
        assert_eq!(kernel(&fake, 1000), Some(Action::Reject));

        // A second bad Service port arriving later is found among the
        // changed ones; the programmed ones stay.
        t.claim(dest(90), &owner("bad2"), Action::Redirect(21001));
        fake.refuse_key(dest(90), "Error: simulated again");
        let checks = fake.checks();
        assert!(matches!(t.sync().await.unwrap().0, SyncKind::Full { .. }));
        assert!(
            fake.checks() - checks <= 4,
            "{} checks",
            fake.checks() - checks
        );
        assert_eq!(t.refused().len(), 2);
        assert_eq!(kernel(&fake, 90), None);
        assert_eq!(kernel(&fake, 1000), Some(Action::Reject));
        assert_eq!(kernel(&fake, 1039), Some(Action::Redirect(20039)));

        // Unchanged, a refused Service port stays out; once it changes it
        // is tried again (and, the kernel now taking it, programmed).
        t.claim(dest(80), &owner("bad"), Action::Redirect(21000));
        t.sync().await.unwrap();
        assert_eq!(kernel(&fake, 80), None);
        let fake2 = FakeNft::default();
        let mut again = RuleTable::new(fake2.clone(), layout());
        std::mem::swap(&mut again.claims, &mut t.claims);
        again.refused = t.refused.clone();
        again.claim(dest(81), &owner("bad"), Action::Redirect(21002));
        again.sync().await.unwrap();
        assert!(again.refused().contains_key(&owner("bad2")));
        assert!(!again.refused().contains_key(&owner("bad")));
        assert_eq!(
            fake2.table().unwrap().elements.get(&dest(81)),
            Some(&Action::Redirect(21002))
        );
    }

    #[tokio::test]
    async fn a_refusal_no_service_port_explains_is_an_error() {
        let fake = FakeNft::default();
        let mut t = RuleTable::new(fake.clone(), layout());
        t.claim(dest(80), &owner("a"), Action::Redirect(20000));
        // The table itself is refused (every batch, checks too).
        fake.fail_next(100, "Error: table refused");
        let err = t.sync().await.unwrap_err();
        assert!(err.to_string().contains("table refused"), "{err}");
        assert!(t.refused().is_empty());
        assert!(t.has_pending());
    }

    /// An aborted rollout: the newer instance took the table over and
    /// died. The older one takes the rules back at its next check, and
    /// writes them whole with its own id.
    #[tokio::test]
    async fn the_older_instance_takes_the_table_back_when_the_newer_is_gone() {
        let fake = FakeNft::default();
        let mut old = RuleTable::new(fake.clone(), layout());
        old.claim(dest(80), &owner("a"), Action::Redirect(20000));
        old.sync().await.unwrap();
        let new_id = std::process::id() ^ 0x7e57_0000;
        let marker = alive::Marker::hold(new_id).unwrap();
        let mut new_layout = layout();
        new_layout.instance = Instance {
            id: new_id,
            note: format!("{}={}", alive::NOTE_KEY, alive::marker_name(new_id)),
        };
        let mut new = RuleTable::new(fake.clone(), new_layout);
        new.claim(dest(80), &owner("a"), Action::Redirect(20000));
        new.sync().await.unwrap();

        assert_eq!(old.verify().await.unwrap(), Verified::Superseded);
        assert!(old.writer().is_some_and(|w| w.alive()));
        // A change while superseded waits...
        old.claim(dest(81), &owner("b"), Action::Redirect(20001));
        assert_eq!(old.sync().await.unwrap().0, SyncKind::Superseded);
        assert_eq!(old.verify().await.unwrap(), Verified::Superseded);
        assert_eq!(kernel(&fake, 81), None);

        // ...until the newer instance is gone (SIGKILL: its marker too).
        drop(new);
        drop(marker);
        assert_eq!(
            old.verify().await.unwrap(),
            Verified::TakenBack { writer: new_id }
        );
        assert!(!old.is_superseded());
        assert!(old.has_pending());
        let (kind, _) = old.sync().await.unwrap();
        assert_eq!(kind, SyncKind::Full { elements: 2 });
        assert_eq!(fake.table().unwrap().instance, Some(1));
        assert_eq!(kernel(&fake, 81), Some(Action::Redirect(20001)));
        assert_eq!(old.verify().await.unwrap(), Verified::Intact);
    }

    /// The newer instance died before the older one noticed it: the older
    /// one finds a dead writer's id and writes the table again.
    #[tokio::test]
    async fn a_dead_writers_table_is_written_again() {
        let fake = FakeNft::default();
        let mut old = RuleTable::new(fake.clone(), layout());
        old.claim(dest(80), &owner("a"), Action::Redirect(20000));
        old.sync().await.unwrap();
        let new_id = std::process::id() ^ 0x7e58_0000;
        let marker = alive::Marker::hold(new_id).unwrap();
        let mut new_layout = layout();
        new_layout.instance = Instance {
            id: new_id,
            note: format!("{}={}", alive::NOTE_KEY, alive::marker_name(new_id)),
        };
        let mut new = RuleTable::new(fake.clone(), new_layout);
        new.sync().await.unwrap();
        drop(marker);
        match old.verify().await.unwrap() {
            Verified::Drifted(p) => assert!(p[0].contains("is gone"), "{p:?}"),
            v => panic!("{v:?}"),
        }
        assert!(!old.is_superseded());
        old.sync().await.unwrap();
        assert_eq!(fake.table().unwrap().instance, Some(1));
        assert_eq!(kernel(&fake, 80), Some(Action::Redirect(20000)));
    }

    #[tokio::test]
    async fn the_ip6_table_is_written_checked_and_repaired_with_the_ip_one() {
        let fake = FakeNft::default();
        let mut l = layout();
        l.proxy_address_v6 = Some("fd6b:7570:7278::1".parse().unwrap());
        let mut t = RuleTable::new(fake.clone(), l);
        let v6 = Key::Service(Destination {
            ip: "fd00:96::10".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        });
        t.claim(dest(80), &owner("a"), Action::Redirect(20000));
        t.claim(v6, &owner("a"), Action::Redirect(20001));
        t.sync().await.unwrap();
        let ip = fake.table_of(IpFamily::V4).unwrap();
        let ip6 = fake.table_of(IpFamily::V6).unwrap();
        assert_eq!(ip.elements.len(), 1);
        assert_eq!(ip6.elements.get(&v6), Some(&Action::Redirect(20001)));
        assert_eq!(
            ip6.proxy_address,
            Some("fd6b:7570:7278::1".parse().unwrap())
        );
        assert_eq!(ip6.instance, Some(1));
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);

        // A change of an IPv6 destination goes to the ip6 table only.
        t.claim(v6, &owner("a"), Action::Reject);
        assert!(matches!(t.sync().await.unwrap().0, SyncKind::Delta { .. }));
        assert_eq!(
            fake.table_of(IpFamily::V6).unwrap().elements.get(&v6),
            Some(&Action::Reject)
        );
        assert_eq!(fake.table_of(IpFamily::V4).unwrap(), ip);

        // An ip6 table edited behind our back is found and rewritten.
        fake.remove_table(IpFamily::V6);
        match t.verify().await.unwrap() {
            Verified::Drifted(p) => assert_eq!(p, ["the ip6 table is gone"]),
            v => panic!("{v:?}"),
        }
        t.sync().await.unwrap();
        assert_eq!(
            fake.table_of(IpFamily::V6).unwrap().elements.get(&v6),
            Some(&Action::Reject)
        );
        assert_eq!(t.verify().await.unwrap(), Verified::Intact);
    }
}
