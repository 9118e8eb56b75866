//! One direction of a flow, as every way of moving its bytes sees it: how
//! it fails ([`Failure`], which decides what happens to the other
//! direction), when it last moved a byte ([`Activity`], for
//! `--tcp-idle-timeout`), and the half-close that passes its EOF on.
//!
//! Below the copy path (`copy.rs`), the bulk phases (`splice.rs`) and the
//! relay that runs both directions (`relay.rs`): each of them speaks this
//! vocabulary, and this file imports none of them.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// How one direction failed, which decides what happens to the other.
#[derive(Debug)]
pub(super) enum Failure {
    /// Ends both directions (an error that leaves the flow unusable).
    Flow(io::Error),
    /// Reading the source failed because its connection is dead (reset,
    /// timed out): ends both directions, and that socket has nothing left
    /// to deliver.
    SourceGone(io::Error),
    /// The destination's peer went away (reset, broken pipe): ends this
    /// direction only; the other one still delivers what that peer sent.
    PeerGone(io::Error),
}

impl Failure {
    pub(super) fn into_error(self) -> io::Error {
        match self {
            Failure::Flow(e) | Failure::SourceGone(e) | Failure::PeerGone(e) => e,
        }
    }
}

/// Classifies an error reading from the source.
pub(super) fn source_failure(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::TimedOut => {
            Failure::SourceGone(e)
        }
        _ => Failure::Flow(e),
    }
}

/// Classifies an error writing to (or half-closing) the destination.
pub(super) fn destination_failure(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Failure::PeerGone(e),
        _ => Failure::Flow(e),
    }
}

/// What one direction returns: the bytes it moved, until EOF.
pub(super) type DirectionResult = Result<u64, Failure>;

/// When the flow last moved a byte, for `--tcp-idle-timeout`: shared by
/// both directions and their bulk phases.
#[derive(Debug)]
pub(super) struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last read that returned data.
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Bytes were read just now.
    pub(super) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub(super) fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Marks `activity`, if the flow has an idle timeout.
pub(super) fn touch(activity: &Option<Arc<Activity>>) {
    if let Some(a) = activity {
        a.touch();
    }
}

/// Half-closes `stream` (EOF for its peer).
pub(super) fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        // The peer is already gone; the other direction will find out.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}
