//! A bulk phase of one direction: socket → pipe → socket with splice(2),
//! payload never entering user space.
//!
//! Bulk is a phase, not a state for life: a keep-alive connection that once
//! carried a large response goes back to small messages. When the source
//! has sent nothing for [`QUIET`], the phase ends, its pipe goes back to
//! the process's pool (`pipe.rs`) and the direction returns to the copy
//! path; the next large burst starts a new phase. So an idle connection
//! holds its two sockets and nothing else, whatever it carried before.

use std::os::fd::AsFd;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::count::Tally;
use super::direction::{
    Activity, Failure, destination_failure, shutdown_write, source_failure, touch,
};
use super::pipe::{PIPE_SIZE, PooledPipe};

/// How long the source of a bulk phase may send nothing before the phase
/// ends and its pipe is given back. Long against the gaps inside one burst
/// (scheduling, a sender's pauses between writes), short against the idle
/// time of a keep-alive connection; a new phase costs one pipe2 call.
pub const QUIET: Duration = Duration::from_millis(100);

/// How a bulk phase ended.
#[derive(Debug, Clone, Copy)]
pub struct PhaseEnd {
    /// Bytes moved in the phase.
    pub moved: u64,
    /// The source sent EOF (and the destination was half-closed); otherwise
    /// the source went quiet and the direction goes back to copying.
    pub eof: bool,
}

fn splice_flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
}

/// Moves `src` → `dst` through `pipe` until EOF on `src` (then half-closes
/// `dst`) or until `src` has been quiet for [`QUIET`] with the pipe empty.
/// The pipe goes back to its pool when the phase ends (and is closed
/// there if the phase left bytes in it). Counts into `tally` as bytes
/// are written (flushed when it drops, however the phase ends).
pub(super) async fn bulk_phase(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: PooledPipe<'static>,
    activity: &Option<Arc<Activity>>,
    mut tally: Tally,
) -> Result<PhaseEnd, Failure> {
    let mut moved = 0u64;
    let mut last_data = Instant::now();
    // One timer for the whole phase, re-armed only when it fires: waiting
    // for data costs no timer registration per wait.
    let mut quiet = pin!(tokio::time::sleep(QUIET));
    loop {
        // The pipe is empty here.
        tokio::select! {
            biased;
            r = src.readable() => r.map_err(Failure::Flow)?,
            () = &mut quiet => {
                let quiet_since = last_data + QUIET;
                if Instant::now() >= quiet_since {
                    return Ok(PhaseEnd { moved, eof: false });
                }
                quiet.as_mut().reset(quiet_since);
                continue;
            }
        }
        // The pipe is empty, so EAGAIN can only mean "socket has no data",
        // which is what try_io needs to clear the readiness.
        let n = match src.try_io(Interest::READABLE, || {
            splice(
                src.as_fd(),
                None,
                &pipe.write,
                None,
                PIPE_SIZE,
                splice_flags(),
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(source_failure(e)),
        };
        if n == 0 {
            shutdown_write(dst).map_err(destination_failure)?;
            return Ok(PhaseEnd { moved, eof: true });
        }
        last_data = Instant::now();
        touch(activity);
        let mut pending = n;
        while pending > 0 {
            dst.writable().await.map_err(Failure::Flow)?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst.as_fd(), None, pending, splice_flags())
                    .map_err(std::io::Error::from)
            }) {
                Ok(w) => {
                    pending -= w;
                    moved += w as u64;
                    tally.add(w);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(destination_failure(e)),
            }
        }
    }
}
