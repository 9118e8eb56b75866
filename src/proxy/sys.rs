//! The data path's system calls that nix and socket2 do not wrap. The only
//! `unsafe` of the proxy lives here, one call per function, each with the
//! reason it is sound.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
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

/// A UDP socket registered with the current runtime's reactor for reading
/// only: its sends go straight to the kernel, and a registration for
/// writing would wake the reactor after every datagram sent (a UDP
/// socket signals write space each time a sent datagram is freed).
pub fn register_udp(
    socket: std::net::UdpSocket,
) -> io::Result<tokio::io::unix::AsyncFd<std::net::UdpSocket>> {
    // SAFETY: a `std::net::UdpSocket` owns its descriptor: it stays open
    // and the same for as long as the socket lives, which the `AsyncFd`
    // owns until it is dropped, and `as_raw_fd` always returns it.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)
    };
    Ok(fd?)
}

/// Datagrams [`recv_datagrams`] takes in one call at most.
pub const DATAGRAMS_PER_CALL: usize = 2;

/// Receives up to [`DATAGRAMS_PER_CALL`] datagrams in one `recvmmsg(2)`,
/// without waiting, one into each buffer; for each, its length and
/// sender. Fewer than asked for means the socket's queue was empty when
/// the call returned, or that an error (an ICMP error on a connected
/// socket) stopped the batch and is kept for the next call, which the
/// error's own wake-up brings: either way a reader of an edge-triggered
/// socket may wait for the next edge without another call that would
/// only say `EAGAIN`.
/// `Err(WouldBlock)` when no datagram is queued.
pub fn recv_datagrams(
    socket: &impl AsFd,
    bufs: &mut [Box<[u8]>; DATAGRAMS_PER_CALL],
    got: &mut [(usize, Option<SocketAddr>); DATAGRAMS_PER_CALL],
) -> io::Result<usize> {
    let fd = socket.as_fd();
    // SAFETY: all-zero bytes are a valid `sockaddr_storage` (plain integers).
    let mut names: [libc::sockaddr_storage; DATAGRAMS_PER_CALL] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; DATAGRAMS_PER_CALL] = std::array::from_fn(|_| libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    });
    for (iov, buf) in iovs.iter_mut().zip(bufs.iter_mut()) {
        iov.iov_base = buf.as_mut_ptr().cast();
        iov.iov_len = buf.len();
    }
    // SAFETY: all-zero bytes are a valid `mmsghdr` (null pointers, zero
    // lengths); every field the kernel reads is set below.
    let mut msgs: [libc::mmsghdr; DATAGRAMS_PER_CALL] = unsafe { std::mem::zeroed() };
    for ((m, iov), name) in msgs.iter_mut().zip(iovs.iter_mut()).zip(names.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
        m.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
        // Set on every call: the kernel shrinks it to the sender's length.
        m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    }
    // SAFETY: `fd` is valid for the call (borrowed from `socket`); `msgs`
    // holds DATAGRAMS_PER_CALL live headers whose `msg_iov` point to live
    // iovecs, each describing a live, writable buffer of `bufs` of its
    // length, and whose `msg_name` point to live `sockaddr_storage`s of
    // the `msg_namelen` given; no control buffer; a null timeout. All of
    // them outlive the call, which writes nothing else.
    let r = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            DATAGRAMS_PER_CALL as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(r).unwrap_or(0).min(DATAGRAMS_PER_CALL);
    for i in 0..n {
        got[i] = (
            msgs[i].msg_len as usize,
            socket_addr(&names[i], msgs[i].msg_hdr.msg_namelen),
        );
    }
    Ok(n)
}

/// The address the kernel wrote to `name` (`len` bytes of it), if IPv4 or IPv6.
fn socket_addr(name: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(name.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            let sin: libc::sockaddr_in = read_as(name);
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            let sin6: libc::sockaddr_in6 = read_as(name);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The first bytes of `name` as a `sockaddr_in` or `sockaddr_in6`.
fn read_as<T: SockaddrIn>(name: &libc::sockaddr_storage) -> T {
    const { assert!(size_of::<T>() <= size_of::<libc::sockaddr_storage>()) };
    // SAFETY: `T` is `sockaddr_in` or `sockaddr_in6` (the sealed trait
    // below), plain integers for which every bit pattern is valid, and no
    // larger than `sockaddr_storage` (checked at compile time): the read
    // stays inside `name`, a live, initialized value; `read_unaligned`
    // assumes no alignment.
    unsafe { std::ptr::read_unaligned((name as *const libc::sockaddr_storage).cast::<T>()) }
}

/// The socket address types [`read_as`] may read.
trait SockaddrIn: Copy {}
impl SockaddrIn for libc::sockaddr_in {}
impl SockaddrIn for libc::sockaddr_in6 {}

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
    fn datagrams_arrive_whole_with_their_senders_and_a_short_batch_means_an_empty_queue() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let six = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut bufs = [
            vec![0u8; 65536].into_boxed_slice(),
            vec![0u8; 65536].into_boxed_slice(),
        ];
        let mut got = [(0, None); DATAGRAMS_PER_CALL];
        let e = recv_datagrams(&rx, &mut bufs, &mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let big: Vec<u8> = (0..65507u32).map(|i| (i % 251) as u8).collect();
        a.send_to(&big, rx.local_addr().unwrap()).unwrap();
        b.send_to(b"two", rx.local_addr().unwrap()).unwrap();
        a.send_to(b"three", rx.local_addr().unwrap()).unwrap();
        assert_eq!(recv_datagrams(&rx, &mut bufs, &mut got).unwrap(), 2);
        assert_eq!(got[0], (big.len(), Some(a.local_addr().unwrap())));
        assert_eq!(&bufs[0][..big.len()], &big[..]);
        assert_eq!(got[1], (3, Some(b.local_addr().unwrap())));
        assert_eq!(&bufs[1][..3], b"two");
        // One left: a batch of one, the queue now empty.
        assert_eq!(recv_datagrams(&rx, &mut bufs, &mut got).unwrap(), 1);
        assert_eq!(got[0], (5, Some(a.local_addr().unwrap())));
        // An IPv6 sender after an IPv4 one: the whole address, not one
        // cut to the length of the last.
        let c = std::net::UdpSocket::bind("[::1]:0").unwrap();
        c.send_to(b"six", six.local_addr().unwrap()).unwrap();
        assert_eq!(recv_datagrams(&six, &mut bufs, &mut got).unwrap(), 1);
        assert_eq!(got[0], (3, Some(c.local_addr().unwrap())));
        let e = recv_datagrams(&six, &mut bufs, &mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
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
