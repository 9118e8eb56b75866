//! The data path's system calls that nix and socket2 do not wrap. The only
//! `unsafe` of the proxy lives here, one call per function, each with the
//! reason it is sound.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::libc;

/// Bytes written to a TCP socket that its peer has not acknowledged yet
/// and still may: before a socket is reset, these are the bytes the reset
/// would throw away. 0 for a socket that is closed already (reset by its
/// peer, timed out): nothing more will be delivered on it.
pub fn undelivered_bytes(socket: &impl AsFd) -> io::Result<usize> {
    // One system call in the common case (nothing queued).
    let queued = unacked_bytes(socket)?;
    if queued == 0 || tcp_state(socket)? == TCP_CLOSE {
        return Ok(0);
    }
    Ok(queued)
}

/// `TCP_CLOSE` of the kernel's `tcp_states.h`.
const TCP_CLOSE: u8 = 7;

/// The kernel's TCP state of `socket`: the first byte of `TCP_INFO`
/// (`tcpi_state`), read alone so that no struct layout is assumed.
fn tcp_state(socket: &impl AsFd) -> io::Result<u8> {
    let fd = socket.as_fd();
    let mut state: u8 = 0;
    let mut len: libc::socklen_t = 1;
    // SAFETY: `fd` is valid for the call (borrowed from `socket`); the
    // kernel copies at most `len` (1) bytes of TCP_INFO to the pointer,
    // which points to `state`, a live, writable u8, and writes `len`,
    // which points to a live socklen_t.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut state).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(state)
}

/// Bytes written to a TCP socket that its peer has not acknowledged
/// (`SIOCOUTQ`: unsent plus sent-but-unacknowledged). The kernel keeps
/// counting them after the connection died; see [`undelivered_bytes`].
pub fn unacked_bytes(socket: &impl AsFd) -> io::Result<usize> {
    let fd = socket.as_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: `fd` is a valid descriptor for the whole call (borrowed from
    // `socket`), and SIOCOUTQ (TIOCOUTQ) writes exactly one c_int to the
    // pointer, which points to `queued`, a live, aligned, writable c_int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(queued).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn counts_bytes_the_peer_has_not_taken() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_peer_not_reading, _) = l.accept().unwrap();
        assert_eq!(unacked_bytes(&c).unwrap(), 0);
        // Fill the peer's receive buffer and our send buffer.
        c.set_nonblocking(true).unwrap();
        let chunk = [7u8; 65536];
        let mut written = 0;
        for _ in 0..10_000 {
            match c.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let queued = undelivered_bytes(&c).unwrap();
        assert!(queued > 0 && queued <= written, "{queued} of {written}");
        assert_eq!(unacked_bytes(&c).unwrap(), queued);
    }

    #[test]
    fn a_reset_socket_has_nothing_left_to_deliver() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        c.set_nonblocking(true).unwrap();
        let chunk = [7u8; 65536];
        for _ in 0..10_000 {
            if c.write(&chunk).is_err() {
                break;
            }
        }
        assert!(undelivered_bytes(&c).unwrap() > 0);
        // The peer closes with our bytes unread: its kernel resets.
        drop(peer);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while tcp_state(&c).unwrap() != TCP_CLOSE && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(undelivered_bytes(&c).unwrap(), 0);
    }
}
