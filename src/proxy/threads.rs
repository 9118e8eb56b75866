//! The TCP data path's threads: one single-threaded tokio runtime each,
//! as nginx and HAProxy run one event loop per worker.
//!
//! Each TCP Service port gets one listening socket per thread, all bound
//! to the same proxy port with `SO_REUSEPORT` (the kernel spreads new
//! connections over them by their addresses), and each thread accepts
//! only from its own. A flow's two sockets then live on the thread that
//! accepted it, for good: no task moves between threads, no worker wakes
//! another to share work (a `futex` or an eventfd write, and a CPU
//! migration, per connection or message on the work-stealing runtime:
//! issue 21's ledger, docs/performance.md).
//!
//! The rest of the process (the control plane, UDP, the serving
//! endpoints) stays on the main, multi-threaded runtime.
//!
//! Request mode uses the same kind of threads (`--http-threads`, named
//! `http-<i>`) even without `--data-path-threads`: tcp.rs hands each
//! accepted request-mode connection to one of them.
//!
//! Opt-in (`--data-path-threads N`): on the 2-CPU benchmark machine the
//! shared work-stealing runtime accepted 7-17 % more connections per
//! second, with request/response even (docs/performance.md, issue 21's
//! ledger): with the client and servers on the same two CPUs, a thread
//! that is descheduled holds up the connections the kernel gave its
//! socket, where a work-stealing worker would take them.

use std::io;
use std::thread;

use tokio::runtime::{Builder, Handle};

use super::connect::timer_floor;

/// The running data-path threads; they run until the process exits.
#[derive(Debug)]
pub struct DataPathThreads {
    handles: Vec<Handle>,
}

impl DataPathThreads {
    /// Starts `n` threads (at least one), named `data-path-<i>`.
    pub fn start(n: usize) -> io::Result<Self> {
        Self::start_named(n, "data-path")
    }

    /// Starts `n` threads (at least one), named `<name>-<i>`.
    pub fn start_named(n: usize, name: &str) -> io::Result<Self> {
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                // The runtime runs the tasks spawned on its handle while it
                // blocks on this future, which never ends; arming a connect
                // timeout then never wakes this thread's driver.
                .spawn(move || runtime.block_on(timer_floor()))?;
        }
        Ok(DataPathThreads { handles })
    }

    /// One handle per thread, in order.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_runs_what_is_spawned_on_it_on_itself() {
        let threads = DataPathThreads::start(2).unwrap();
        let names: Vec<String> = threads
            .handles()
            .iter()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move {
                    // A task spawned from a task stays on the same thread.
                    let inner = tokio::spawn(async { thread::current().name().map(str::to_owned) });
                    let outer = thread::current().name().map(str::to_owned);
                    let _ = tx.send((outer, inner.await.ok().flatten()));
                });
                let (outer, inner) = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
                assert_eq!(outer, inner);
                outer.unwrap()
            })
            .collect();
        assert_eq!(names, ["data-path-0", "data-path-1"]);
    }
}
