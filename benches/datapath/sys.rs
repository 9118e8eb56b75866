//! System calls, /proc readers (CPU time, RSS, machine facts) and tool
//! versions. The harness's only `unsafe` lives here.

use std::path::Path;
use std::process::{Command, Stdio};

/// Raises RLIMIT_NOFILE as far as root may (children inherit it): 10 000
/// proxied connections need 20 000 sockets here and up to 60 000 fds in a
/// splice proxy.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let want = nr_open.min(1 << 20);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(0)
}

static PIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns CPU pinning of the client and the backends on or off.
pub fn set_pinning(on: bool) {
    PIN.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// CPU of the client threads (the "client node").
pub const CLIENT_CPU: usize = 0;
/// CPU of the backend servers (the "server node").
pub const BACKEND_CPU: usize = 1;

/// Pins the calling thread (and threads it creates later) to `cpu`, when
/// pinning is on and the machine has more than one CPU.
pub fn pin_current_thread(cpu: usize) {
    if !PIN.load(std::sync::atomic::Ordering::Relaxed)
        || std::thread::available_parallelism().map_or(1, |n| n.get()) < 2
    {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// The current soft RLIMIT_NOFILE (inherited by the proxies).
pub fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(1024)
}

/// Clock ticks per second of /proc/*/stat and /proc/stat.
pub fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as f64)
        .unwrap_or(100.0)
}

/// The fields of /proc/PID/stat after the command name (field 3 = index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of one process, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `pid` and all its descendants (nginx master + workers).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(f) = stat_fields(p)
                && let Some(pp) = f.get(1).and_then(|v| v.parse::<u32>().ok())
            {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        for (p, pp) in &parents {
            if *pp == cur && !out.contains(p) {
                out.push(*p);
            }
        }
        i += 1;
    }
    out
}

/// CPU ticks of a process tree.
pub fn tree_cpu_ticks(pid: u32) -> u64 {
    process_tree(pid).into_iter().filter_map(cpu_ticks).sum()
}

/// A `kB` field of /proc/PID/status (e.g. "VmRSS", "RssAnon").
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident memory of a process tree in KiB (VmRSS summed).
pub fn tree_rss_kib(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| status_kib(p, "VmRSS"))
        .sum()
}

/// Anonymous resident memory (heap, stacks) of a process tree in KiB.
pub fn tree_anon_kib(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| status_kib(p, "RssAnon"))
        .sum()
}

/// Open file descriptors of a process tree.
pub fn tree_fds(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd"))
                .map(|d| d.count() as u64)
                .unwrap_or(0)
        })
        .sum()
}

/// Busy ticks of the whole machine (all CPUs, everything but idle/iowait).
pub fn machine_busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already included in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    total.saturating_sub(idle)
}

/// First line of what `program args` prints (stdout, else stderr).
pub fn tool_version(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        || Path::new(program).is_file()
}

/// Facts about the machine for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("PRETTY_NAME="))
        .map(|l| l["PRETTY_NAME=".len()..].trim_matches('"').to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        cores,
        memory_gib: mem_kib / 1024.0 / 1024.0,
        kernel,
        os,
    }
}

/// Wall-clock seconds since the epoch of a tracing timestamp such as
/// `2025-11-22T00:06:00.123456Z` at the start of a log line.
pub fn parse_log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // days from civil (Howard Hinnant)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// Wall-clock seconds since the epoch, now.
pub fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Lowers this thread's timer slack to 1 ns so that the fixed-rate client's
/// sleeps end on time.
pub fn tight_timers() {
    // SAFETY: prctl(PR_SET_TIMERSLACK, 1) takes plain integers, touches no
    // memory of ours and only changes the calling thread's timer slack.
    unsafe {
        nix::libc::prctl(nix::libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_time() {
        let t = super::parse_log_time("1970-01-02T00:00:01.500000Z  INFO x").unwrap();
        assert!((t - 86_401.5).abs() < 1e-6);
    }
}
