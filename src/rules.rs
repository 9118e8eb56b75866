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

pub mod alive;
#[cfg(test)]
pub mod fake;
pub mod host;
pub mod nft;
pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::model::{IpFamily, ServicePortName};
pub use alive::Writer;
pub use nft::{KernelTable, Nft, NftCommand, RulesError};
pub use render::{Action, Destination, Instance, Key, Layout, ProxyPort};

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
        }
    }

    /// `owner` wants `dest` to have `action`.
    pub fn claim(&mut self, dest: Key, owner: &ServicePortName, action: Action) {
        let claimants = self.claims.entry(dest).or_default();
        match claimants.iter_mut().find(|(o, _)| o == owner) {
            Some((_, a)) => *a = action,
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
            }
        }
        self.dirty.insert(dest);
    }

    /// `owner` no longer wants `dest`; the next claimant, if any, gets it.
    pub fn release(&mut self, dest: Key, owner: &ServicePortName) {
        if let Some(claimants) = self.claims.get_mut(&dest) {
            claimants.retain(|(o, _)| o != owner);
            if claimants.is_empty() {
                self.claims.remove(&dest);
            }
            self.dirty.insert(dest);
        }
    }

    /// What the kernel should have for `dest`.
    pub fn desired(&self, dest: &Key) -> Option<Action> {
        self.claims
            .get(dest)
            .and_then(|c| c.first())
            .map(|(_, a)| *a)
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

    pub fn is_superseded(&self) -> bool {
        self.superseded.is_some()
    }

    /// The instance that writes the rules instead of this one, if any.
    pub fn writer(&self) -> Option<&Writer> {
        self.superseded.as_ref()
    }

    fn desired_elements(&self) -> BTreeMap<Key, Action> {
        self.claims
            .iter()
            .filter_map(|(d, c)| c.first().map(|(_, a)| (*d, *a)))
            .collect()
    }

    /// Writes the whole table.
    async fn write_full(&mut self) -> Result<SyncKind, RulesError> {
        let elements = self.desired_elements();
        self.nft
            .apply(&render::full(&self.layout, &elements, &self.ports))
            .await?;
        let n = elements.len();
        self.applied = Some(Applied {
            elements,
            ports: self.ports.clone(),
        });
        self.dirty.clear();
        self.dirty_ports.clear();
        Ok(SyncKind::Full { elements: n })
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
        let changes: Vec<render::Change> = self
            .dirty
            .iter()
            .map(|d| render::Change {
                key: *d,
                old: applied.elements.get(d).copied(),
                new: self.desired(d),
            })
            .filter(|c| c.old != c.new)
            .collect();
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
        let want = render::rules_in_chain(name);
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
