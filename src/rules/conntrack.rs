//! The conntrack sysctls kube-proxy sets at start, set the same way
//! (`--conntrack-max-per-core`, `--conntrack-min`,
//! `--conntrack-tcp-timeout-established`,
//! `--conntrack-tcp-timeout-close-wait`).
//!
//! Why the proxy needs them at least as much as kube-proxy: every proxied
//! TCP flow holds *two* conntrack entries, the client's (DNATed from the
//! Service address to the proxy address) and the proxy's own connection
//! to the endpoint (from the node), where kube-proxy's DNAT makes one. A
//! node that loses kube-proxy and reboots comes back with the kernel's
//! defaults (`nf_conntrack_max` sized from memory, often 65536; close-wait
//! 60 s), and a full table drops new flows ("nf_conntrack: table full,
//! dropping packet").
//!
//! As kube-proxy: `nf_conntrack_max` = max(per core × CPUs, min), and the
//! hash table (`/sys/module/nf_conntrack/parameters/hashsize`) raised to a
//! quarter of it. Here the maximum and the hash size are only ever
//! raised, never lowered: a node an operator tuned higher keeps its
//! value. The two timeouts are set to their values (kube-proxy's 24 h
//! established is *below* the kernel's 5 days on purpose: entries of flows
//! that died silently go sooner). 0 leaves a setting as it is. Nothing is
//! restored at `--cleanup` (kube-proxy does not either): the values are
//! the node's from then on, until the next boot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

/// Under `--proc-sys-dir`.
const MAX: &str = "net/netfilter/nf_conntrack_max";
const ESTABLISHED: &str = "net/netfilter/nf_conntrack_tcp_timeout_established";
const CLOSE_WAIT: &str = "net/netfilter/nf_conntrack_tcp_timeout_close_wait";
/// Under the sysfs module directory (`/sys/module`).
const HASHSIZE: &str = "nf_conntrack/parameters/hashsize";

/// The four settings, as the flags give them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// 0: leave `nf_conntrack_max` (and the hash size) as they are, and
    /// ignore `min`.
    pub max_per_core: u64,
    pub min: u64,
    /// Zero: leave as it is.
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
}

/// One sysctl the proxy could not read or write.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct ConntrackError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// What was found and what was written, for the log and the tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackReport {
    /// `(file, before, after)` for each value written.
    pub written: Vec<(&'static str, u64, u64)>,
}

impl ConntrackSettings {
    /// The `nf_conntrack_max` wanted on a node with `cpus` CPUs; `None`
    /// when it is left alone (kube-proxy's `getConntrackMax`).
    pub fn max_for(&self, cpus: u64) -> Option<u64> {
        (self.max_per_core > 0).then(|| self.max_per_core.saturating_mul(cpus).max(self.min))
    }

    /// Sets the values under `proc_sys` (`--proc-sys-dir`) and `sys_module`
    /// (`/sys/module`) for a node with `cpus` CPUs. Every setting is tried
    /// even when another fails; the failures are returned with the report
    /// of what was written.
    pub fn apply(
        &self,
        proc_sys: &Path,
        sys_module: &Path,
        cpus: u64,
    ) -> (ConntrackReport, Vec<ConntrackError>) {
        let mut report = ConntrackReport::default();
        let mut errors = Vec::new();
        let mut set = |file: &'static str, path: PathBuf, want: u64, raise_only: bool| {
            match read_u64(&path) {
                Ok(have) if have == want || (raise_only && have > want) => {}
                Ok(have) => match std::fs::write(&path, want.to_string()) {
                    Ok(()) => report.written.push((file, have, want)),
                    Err(source) => errors.push(ConntrackError { path, source }),
                },
                Err(source) => errors.push(ConntrackError { path, source }),
            }
        };
        if let Some(max) = self.max_for(cpus) {
            set(MAX, proc_sys.join(MAX), max, true);
            // The kernel sizes the hash table at boot; kube-proxy raises
            // it to max/4 so that a full table still hashes well.
            set(HASHSIZE, sys_module.join(HASHSIZE), max / 4, true);
        }
        for (file, d) in [
            (ESTABLISHED, self.tcp_established),
            (CLOSE_WAIT, self.tcp_close_wait),
        ] {
            if !d.is_zero() {
                set(file, proc_sys.join(file), d.as_secs(), false);
            }
        }
        (report, errors)
    }
}

fn read_u64(path: &Path) -> Result<u64, std::io::Error> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The CPUs of the node, as kube-proxy counts them: every online CPU
/// (`/sys/devices/system/cpu/online`, "0-3,6"), not the ones this
/// process may run on (a pod limited to one CPU runs on a node with 64,
/// whose conntrack table serves all of them). Falls back to what the
/// process sees.
pub fn node_cpus(sys_devices_cpu_online: &Path) -> u64 {
    let parsed = std::fs::read_to_string(sys_devices_cpu_online)
        .ok()
        .and_then(|s| count_cpu_list(s.trim()));
    parsed.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64))
}

/// Counts a kernel CPU list ("0-3,6,8-9" → 7); `None` if malformed.
fn count_cpu_list(s: &str) -> Option<u64> {
    let mut n = 0u64;
    for part in s.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => part.parse::<u64>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

/// [`ConntrackSettings::apply`] on this node, logged: each value written,
/// and a warning per failure (the proxy works without them; a table too
/// small drops new flows under load, which the warning names).
pub fn apply_and_log(settings: &ConntrackSettings, proc_sys: &Path) {
    let cpus = node_cpus(Path::new("/sys/devices/system/cpu/online"));
    let (report, errors) = settings.apply(proc_sys, Path::new("/sys/module"), cpus);
    for (file, before, after) in &report.written {
        info!(sysctl = file, before, after, "conntrack setting written");
    }
    for e in &errors {
        warn!(error = %e, "cannot set a conntrack setting; each proxied TCP flow holds two conntrack entries, so a small table drops new flows under load (--conntrack-max-per-core 0 and the timeouts at 0 leave them alone)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ku-conntrack-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("net/netfilter")).unwrap();
        std::fs::create_dir_all(d.join("nf_conntrack/parameters")).unwrap();
        d
    }

    fn kube_proxy_defaults() -> ConntrackSettings {
        ConntrackSettings {
            max_per_core: 32768,
            min: 131072,
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_close_wait: Duration::from_secs(3600),
        }
    }

    fn write(d: &Path, file: &str, v: u64) {
        std::fs::write(d.join(file), format!("{v}\n")).unwrap();
    }

    fn read(d: &Path, file: &str) -> u64 {
        read_u64(&d.join(file)).unwrap()
    }

    #[test]
    fn the_kernels_defaults_become_kube_proxys() {
        let d = dir("defaults");
        // A 2-CPU node with the kernel's defaults.
        write(&d, MAX, 65536);
        write(&d, HASHSIZE, 16384);
        write(&d, ESTABLISHED, 432000);
        write(&d, CLOSE_WAIT, 60);
        let (report, errors) = kube_proxy_defaults().apply(&d, &d, 2);
        assert!(errors.is_empty(), "{errors:?}");
        // 2 x 32768 is below the minimum: 131072.
        assert_eq!(read(&d, MAX), 131072);
        assert_eq!(read(&d, HASHSIZE), 32768);
        assert_eq!(read(&d, ESTABLISHED), 86400);
        assert_eq!(read(&d, CLOSE_WAIT), 3600);
        assert_eq!(report.written.len(), 4);
        // 8 CPUs: per core wins.
        let (_, errors) = kube_proxy_defaults().apply(&d, &d, 8);
        assert!(errors.is_empty());
        assert_eq!(read(&d, MAX), 262144);
        assert_eq!(read(&d, HASHSIZE), 65536);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_larger_table_is_kept_and_zero_leaves_things_alone() {
        let d = dir("keep");
        write(&d, MAX, 1 << 20);
        write(&d, HASHSIZE, 1 << 18);
        write(&d, ESTABLISHED, 432000);
        write(&d, CLOSE_WAIT, 60);
        let (report, errors) = kube_proxy_defaults().apply(&d, &d, 2);
        assert!(errors.is_empty());
        assert_eq!(read(&d, MAX), 1 << 20, "never lowered");
        assert_eq!(read(&d, HASHSIZE), 1 << 18, "never lowered");
        assert_eq!(report.written.len(), 2, "{report:?}");
        write(&d, ESTABLISHED, 432000);
        write(&d, CLOSE_WAIT, 60);
        write(&d, MAX, 65536);
        let off = ConntrackSettings {
            max_per_core: 0,
            min: 1 << 30,
            tcp_established: Duration::ZERO,
            tcp_close_wait: Duration::ZERO,
        };
        assert_eq!(off.max_for(64), None, "0 per core ignores min");
        let (report, errors) = off.apply(&d, &d, 2);
        assert!(errors.is_empty() && report.written.is_empty());
        assert_eq!(
            (read(&d, MAX), read(&d, ESTABLISHED), read(&d, CLOSE_WAIT)),
            (65536, 432000, 60)
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_missing_file_is_an_error_and_the_others_are_still_set() {
        let d = dir("missing");
        write(&d, CLOSE_WAIT, 60);
        let (report, errors) = kube_proxy_defaults().apply(&d, &d, 2);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].to_string().contains("nf_conntrack_max"));
        assert_eq!(report.written, vec![(CLOSE_WAIT, 60, 3600)]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn cpus_are_counted_from_the_kernels_list() {
        assert_eq!(count_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert!(node_cpus(Path::new("/nonexistent")) >= 1);
    }
}
