//! Helpers of the data path's unit tests.
//!
//! - [`isolated`]: runs one test alone in a child process, for tests that
//!   change process-wide state (the open-file limit, the user id) or count
//!   the process's file descriptors, which tests running in parallel in
//!   one process would disturb.
//! - [`capture_logs`]: the log lines written on this thread, to check what
//!   the proxy says (and how often).

use std::io;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set in the child to the name of the test it runs.
const CHILD_ENV: &str = "KU_ISOLATED_TEST";
/// Longest an isolated test may take.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of a test as the harness knows it: `module_path!()` without
/// the crate, then the function name.
pub fn test_name(module_path: &str, function: &str) -> String {
    let module = module_path.split_once("::").map_or("", |(_, m)| m);
    format!("{module}::{function}")
}

/// In the child: `true` (run the test's body). In the parent: runs this
/// test binary again with only `name` selected, waits (bounded), fails
/// with the child's output if the child failed, and returns `false`.
pub fn isolated(name: &str) -> bool {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::env::temp_dir().join(format!(
        "ku-isolated-{}-{}.log",
        std::process::id(),
        name.replace("::", "-")
    ));
    let log = std::fs::File::create(&out).expect("creating the child's log");
    let mut child = Command::new(exe)
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, name)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("cloning the log handle"))
        .stderr(log)
        .spawn()
        .expect("starting the isolated test");
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the isolated test") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    match status {
        Some(s) if s.success() && text.contains("1 passed") => false,
        Some(s) => panic!("isolated run of {name} failed ({s}):\n{text}"),
        None => panic!("isolated run of {name} took over {CHILD_TIMEOUT:?}:\n{text}"),
    }
}

/// Log lines captured by [`capture_logs`].
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Lines that contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }
}

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Captures what is logged (debug and above) on this thread while the guard
/// lives; with a current-thread runtime that includes every task.
pub fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// Pipes this process holds open (its fds that are pipes).
pub fn open_pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Sets the soft open-file limit to the lowest fd number not in use, after
/// filling the holes below it, so that the next fd this process asks for
/// fails with EMFILE. Returns the fds that fill the holes (keep them).
pub fn exhaust_fds() -> Vec<std::fs::File> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let highest = std::fs::read_dir("/proc/self/fd")
        .expect("listing /proc/self/fd")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap_or(2);
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    // The fd read_dir used is closed now; `highest` may be that one, which
    // only leaves one more hole for the loop below to fill.
    setrlimit(Resource::RLIMIT_NOFILE, highest + 1, hard).expect("setrlimit");
    let mut fillers = Vec::new();
    for _ in 0..=highest {
        match std::fs::File::open("/dev/null") {
            Ok(f) => fillers.push(f),
            Err(e) if e.raw_os_error() == Some(nix::libc::EMFILE) => return fillers,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
    panic!("the open-file limit did not take effect");
}
