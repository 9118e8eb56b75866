use super::copy::UNSENT_STEPS;
use super::count::FLUSH_EVERY;
use super::pipe::PIPE_SIZE;
use super::*;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// client ⇄ [proxy: relay] ⇄ server, all on loopback.
async fn through_relay(mode: RelayMode, payload: Vec<u8>) -> (Vec<u8>, Transferred) {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    // The server reads to EOF, then answers with the length and a
    // reversed copy: only possible if half-close was passed on.
    let server_task = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got.reverse();
        s.write_all(&got).await.unwrap();
    });
    let proxy_task = tokio::spawn(async move {
        let (c, _) = proxy.accept().await.unwrap();
        let u = TcpStream::connect(server_addr).await.unwrap();
        relay(
            mode.into(),
            &TcpOptions::default(),
            c,
            u,
            &CancellationToken::new(),
            &RelayedBytes::default(),
        )
        .await
        .unwrap()
    });
    let mut client = TcpStream::connect(proxy_addr).await.unwrap();
    let (mut r, mut w) = client.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(send, recv);
    n.unwrap();
    server_task.await.unwrap();
    (back, proxy_task.await.unwrap())
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn splice_keeps_half_close_and_every_byte() {
    let payload = data(3 * 1024 * 1024 + 7);
    let (back, t) = through_relay(RelayMode::Splice, payload.clone()).await;
    let mut want = payload.clone();
    want.reverse();
    assert!(back == want, "payload corrupted through splice");
    assert_eq!(t.client_to_upstream, payload.len() as u64);
    assert_eq!(t.upstream_to_client, payload.len() as u64);
}

/// A small flow ends in the copy steps both ways: the first direction to
/// read EOF half-closes its destination, the second leaves the FIN to the
/// close of both sockets. The server still sees the client's EOF before it
/// answers, and the client reads the whole answer and then a clean EOF
/// (a reset would fail `read_to_end`).
#[tokio::test]
async fn a_small_flow_is_closed_with_a_fin_both_ways() {
    let payload = data(100);
    let (back, t) = tokio::time::timeout(
        Duration::from_secs(10),
        through_relay(RelayMode::Splice, payload.clone()),
    )
    .await
    .expect("the server never saw the client's EOF, or the client the server's");
    let mut want = payload.clone();
    want.reverse();
    assert_eq!(back, want);
    assert_eq!(t.upstream_to_client, payload.len() as u64);
}

#[tokio::test]
async fn copy_keeps_half_close_and_every_byte() {
    let payload = data(1024 * 1024 + 3);
    let (back, _) = through_relay(RelayMode::Copy, payload.clone()).await;
    let mut want = payload;
    want.reverse();
    assert!(back == want, "payload corrupted through copy");
}

#[tokio::test]
async fn small_messages_go_both_ways_in_order() {
    // Many small writes in both directions at once: the copy phase. The
    // proxy's socket towards the client has a small send buffer and the
    // client a small receive buffer, and the client does not read until
    // the proxy has had to keep bytes back: the `unsent` path runs, and
    // the order must survive it. (A current-thread runtime: the relay
    // runs on this thread, whose step counter the test reads.)
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server_addr, proxy_addr) = (server.local_addr().unwrap(), proxy.local_addr().unwrap());
    tokio::spawn(async move {
        let (c, _) = proxy.accept().await.unwrap();
        socket2::SockRef::from(&c)
            .set_send_buffer_size(4096)
            .unwrap();
        let u = TcpStream::connect(server_addr).await.unwrap();
        relay(
            RelayMode::Splice.into(),
            &TcpOptions::default(),
            c,
            u,
            &CancellationToken::new(),
            &RelayedBytes::default(),
        )
        .await
        .unwrap()
    });
    let echo = tokio::spawn(async move {
        let (s, _) = server.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let client = socket.connect(proxy_addr).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let msgs: Vec<Vec<u8>> = (0..2000u32)
        .map(|i| format!("{i}:{}|", "x".repeat((i % 97) as usize)).into_bytes())
        .collect();
    let want: Vec<u8> = msgs.concat();
    let writer = tokio::spawn(async move {
        for m in msgs {
            w.write_all(&m).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    // The paused reader: wait (bounded) until a copy step kept bytes.
    let kept = || UNSENT_STEPS.with(|c| c.get());
    let paused_until = tokio::time::Instant::now() + Duration::from_secs(10);
    while kept() == 0 && tokio::time::Instant::now() < paused_until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(kept() > 0, "no copy step ever kept bytes in `unsent`");
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    echo.await.unwrap();
    assert!(
        got == want,
        "echoed bytes differ ({} vs {})",
        got.len(),
        want.len()
    );
}

#[tokio::test]
async fn upstream_reset_reaches_client_while_its_bulk_direction_is_idle() {
    // The client sends a bulk burst (its direction moves to a splice
    // task), then only waits. The server reads the burst and resets.
    // The client must learn at once: the idle splice task holding the
    // client socket has to be aborted, not left waiting for more data.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server_addr, proxy_addr) = (server.local_addr().unwrap(), proxy.local_addr().unwrap());
    let burst = data(256 * 1024);
    let relay_task = tokio::spawn(async move {
        let (c, _) = proxy.accept().await.unwrap();
        let u = TcpStream::connect(server_addr).await.unwrap();
        relay(
            RelayMode::Splice.into(),
            &TcpOptions::default(),
            c,
            u,
            &CancellationToken::new(),
            &RelayedBytes::default(),
        )
        .await
    });
    let len = burst.len();
    let server_task = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let mut got = vec![0u8; len];
        s.read_exact(&mut got).await.unwrap();
        reset(&s);
        got
    });
    let mut client = TcpStream::connect(proxy_addr).await.unwrap();
    client.write_all(&burst).await.unwrap();
    let got = server_task.await.unwrap();
    assert!(got == burst, "burst corrupted");
    let mut b = [0u8; 1];
    let outcome = tokio::time::timeout(Duration::from_secs(5), client.read(&mut b)).await;
    match outcome {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("client read {n} unexpected bytes"),
        Err(_) => panic!("client still connected 5 s after the upstream reset"),
    }
    let r = tokio::time::timeout(Duration::from_secs(5), relay_task)
        .await
        .expect("relay did not end")
        .unwrap();
    assert!(r.is_err(), "relay should report the reset, got {r:?}");
}

/// A cut flow ends with a reset on both sides, never a FIN: a peer that
/// reads to EOF must not take a cut stream for a complete one.
async fn cut_resets_both_sides(mode: RelayMode) {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server_addr, proxy_addr) = (server.local_addr().unwrap(), proxy.local_addr().unwrap());
    let cut = CancellationToken::new();
    let relay_cut = cut.clone();
    let relay_task = tokio::spawn(async move {
        let (c, _) = proxy.accept().await.unwrap();
        let u = TcpStream::connect(server_addr).await.unwrap();
        relay(
            mode.into(),
            &TcpOptions::default(),
            c,
            u,
            &relay_cut,
            &RelayedBytes::default(),
        )
        .await
    });
    let mut client = TcpStream::connect(proxy_addr).await.unwrap();
    let (mut server_side, _) = server.accept().await.unwrap();
    // A bulk burst first, so that in splice mode one direction runs in
    // a task of its own when the cut comes.
    let burst = data(256 * 1024);
    client.write_all(&burst).await.unwrap();
    let mut got = vec![0u8; burst.len()];
    server_side.read_exact(&mut got).await.unwrap();
    cut.cancel();
    let r = tokio::time::timeout(Duration::from_secs(5), relay_task)
        .await
        .expect("relay did not end after the cut")
        .unwrap();
    assert_eq!(
        r.map(|_| ()).unwrap_err().kind(),
        io::ErrorKind::ConnectionAborted
    );
    for (who, s) in [("client", &mut client), ("server", &mut server_side)] {
        let mut b = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("{who} still connected 5 s after the cut"));
        match read {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{who}: {e}"),
            Ok(n) => panic!("{who} read Ok({n}) (a FIN or data) instead of a reset"),
        }
    }
}

#[tokio::test]
async fn cut_resets_both_sides_in_splice_mode() {
    cut_resets_both_sides(RelayMode::Splice).await;
}

#[tokio::test]
async fn cut_resets_both_sides_in_copy_mode() {
    cut_resets_both_sides(RelayMode::Copy).await;
}

/// The four sockets of one flow on loopback: the client's, the proxy's
/// two (accepted from the client, connected to the server), the server's.
struct Flow {
    client: TcpStream,
    proxy_client: TcpStream,
    proxy_upstream: TcpStream,
    server: TcpStream,
}

async fn flow() -> Flow {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(proxy.local_addr().unwrap())
        .await
        .unwrap();
    let (proxy_client, _) = proxy.accept().await.unwrap();
    let proxy_upstream = TcpStream::connect(server.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = server.accept().await.unwrap();
    Flow {
        client,
        proxy_client,
        proxy_upstream,
        server,
    }
}

/// Starts the relay of `f`'s proxy sockets; the rest of the flow is
/// returned as (client, server).
fn start_relay(
    mode: RelayMode,
    f: Flow,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<io::Result<Transferred>>,
) {
    let cut = CancellationToken::new();
    let task = tokio::spawn(async move {
        relay(
            mode.into(),
            &TcpOptions::default(),
            f.proxy_client,
            f.proxy_upstream,
            &cut,
            &RelayedBytes::default(),
        )
        .await
    });
    (f.client, f.server, task)
}

/// Sends `payload` from the client with a half-close; the server reads
/// it to EOF and answers it reversed; the client reads the answer.
async fn reversed_round_trip(client: TcpStream, mut server: TcpStream, payload: &[u8]) {
    let (mut cr, mut cw) = client.into_split();
    let to_send = payload.to_vec();
    let sender = tokio::spawn(async move {
        cw.write_all(&to_send).await.unwrap();
        cw.shutdown().await.unwrap();
    });
    let serve = tokio::spawn(async move {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        let n = got.len();
        got.reverse();
        server.write_all(&got).await.unwrap();
        server.shutdown().await.unwrap();
        n
    });
    let mut back = Vec::new();
    cr.read_to_end(&mut back).await.unwrap();
    sender.await.unwrap();
    assert_eq!(serve.await.unwrap(), payload.len(), "the server got it all");
    let mut want = payload.to_vec();
    want.reverse();
    assert!(back == want, "answer corrupted ({} bytes)", back.len());
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_pipe_that_cannot_be_created_leaves_the_bulk_flow_copying() {
    // In a child process: the open-file limit is lowered so that no fd
    // is left once the flow is connected; both directions turn bulk
    // and cannot get a pipe (EMFILE). The flow must go on by copying.
    use crate::proxy::test_support::{exhaust_fds, isolated, test_name};
    if !isolated(&test_name(
        module_path!(),
        "a_pipe_that_cannot_be_created_leaves_the_bulk_flow_copying",
    )) {
        return;
    }
    current_thread().block_on(async {
        let f = flow().await;
        let (client, server, relay_task) = start_relay(RelayMode::Splice, f);
        let _fillers = exhaust_fds();
        let err = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err, nix::errno::Errno::EMFILE, "fds are not exhausted");
        let payload = data(1024 * 1024 + 13);
        reversed_round_trip(client, server, &payload).await;
        let t = relay_task.await.unwrap().expect("the relay failed");
        assert_eq!(t.client_to_upstream, payload.len() as u64);
        assert_eq!(t.upstream_to_client, payload.len() as u64);
    });
}

#[test]
fn a_refused_pipe_size_is_logged_once() {
    // In a child process that drops root (as a DaemonSet without
    // CAP_SYS_RESOURCE runs) and uses up its user's pipe quota
    // (fs.pipe-user-pages-soft): every bulk direction then gets a
    // small pipe. Flows still work; the log says so once.
    use crate::proxy::test_support::{capture_logs, isolated, test_name};
    if !isolated(&test_name(
        module_path!(),
        "a_refused_pipe_size_is_logged_once",
    )) {
        return;
    }
    let soft = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if soft == 0 || !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: needs root (to drop it) and fs.pipe-user-pages-soft > 0");
        return;
    }
    // A uid nobody else uses, so the quota is ours alone.
    let uid = nix::unistd::Uid::from_raw(54_321);
    let gid = nix::unistd::Gid::from_raw(54_321);
    nix::unistd::setresgid(gid, gid, gid).unwrap();
    nix::unistd::setresuid(uid, uid, uid).unwrap();
    let mut quota = Vec::new();
    let mut refused = false;
    for _ in 0..(soft / 256 + 8) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        refused = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)).is_err();
        quota.push((r, w));
        if refused {
            break;
        }
    }
    assert!(refused, "the pipe quota never ran out");
    let (logs, _guard) = capture_logs();
    current_thread().block_on(async {
        for _ in 0..2 {
            let f = flow().await;
            let (client, server, relay_task) = start_relay(RelayMode::Splice, f);
            reversed_round_trip(client, server, &data(512 * 1024 + 5)).await;
            relay_task.await.unwrap().expect("the relay failed");
        }
    });
    let text = logs.text();
    assert_eq!(
        logs.count("refused a 1 MiB splice pipe"),
        1,
        "want one line about the small pipes; log:\n{text}"
    );
}

#[test]
fn a_bulk_direction_that_goes_quiet_gives_its_pipe_back() {
    // A keep-alive connection carries one large response, then idles.
    // Its bulk direction must give the pipe back (an idle connection
    // holds its 2 sockets and nothing else), and the next exchanges,
    // small and large, must still work.
    use crate::proxy::test_support::{isolated, open_pipes, test_name};
    if !isolated(&test_name(
        module_path!(),
        "a_bulk_direction_that_goes_quiet_gives_its_pipe_back",
    )) {
        return;
    }
    current_thread().block_on(async {
        let f = flow().await;
        let (client, mut server, _relay_task) = start_relay(RelayMode::Splice, f);
        let before = open_pipes();
        let (mut cr, mut cw) = client.into_split();
        let burst = data(32 * 1024 * 1024);
        let sent = burst.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&sent).await.unwrap();
            cw
        });
        // Mid-transfer (more is queued than all buffers hold): the
        // direction is bulk and holds a pipe.
        let mut got = vec![0u8; burst.len()];
        server.read_exact(&mut got[..1024 * 1024]).await.unwrap();
        assert!(open_pipes() > before, "no pipe during the bulk transfer");
        server.read_exact(&mut got[1024 * 1024..]).await.unwrap();
        assert!(got == burst, "burst corrupted");
        let mut cw = writer.await.unwrap();
        // Quiet now: the pipe must go back to the pool (bounded wait),
        // which is all the pipes the process still has.
        let end = tokio::time::Instant::now() + Duration::from_secs(3);
        while pipe::PIPES.in_use() > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            pipe::PIPES.in_use(),
            0,
            "an idle connection still holds a pipe"
        );
        // Two fds per pipe.
        assert_eq!(
            open_pipes(),
            before + 2 * pipe::PIPES.open(),
            "pipes open beside the pool's"
        );
        // Still one working connection: small both ways, then bulk.
        cw.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        server.read_exact(&mut b).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        cr.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"pong");
        let again = data(4 * 1024 * 1024 + 1);
        let sent = again.clone();
        let writer = tokio::spawn(async move { cw.write_all(&sent).await.unwrap() });
        let mut got = vec![0u8; again.len()];
        server.read_exact(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == again, "second burst corrupted");
    });
}

/// What a client receives from a server that answers early and closes
/// while the client is still sending (an HTTP 413 during an upload):
/// through the relay in `mode`, or directly with `None`.
async fn early_answer(mode: Option<RelayMode>, answer: &'static [u8]) -> Vec<u8> {
    let f = flow().await;
    let (client, mut server, relay_task) = match mode {
        Some(mode) => {
            let (c, s, t) = start_relay(mode, f);
            (c, s, Some(t))
        }
        // Directly: the socket the proxy accepted plays the server.
        None => (f.client, f.proxy_client, None),
    };
    // The server reads the start of the request, answers and closes at
    // once with the rest of the upload unread: its kernel resets the
    // connection right behind the answer.
    let serve = tokio::spawn(async move {
        let mut head = [0u8; 1024];
        server.read_exact(&mut head).await.unwrap();
        server.write_all(answer).await.unwrap();
    });
    let (mut cr, mut cw) = client.into_split();
    let upload = tokio::spawn(async move {
        let chunk = data(64 * 1024);
        for _ in 0..1024 {
            if cw.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the client was never told the end");
    serve.await.unwrap();
    upload.await.unwrap();
    if let Some(t) = relay_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("the relay did not end");
    }
    got
}

async fn an_early_answer_reaches_the_client(mode: RelayMode) {
    static ANSWER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    // Larger than the scratch buffer (a bulk phase starts), smaller
    // than the client's initial receive window: directly, the whole
    // answer is on the wire before the server's reset. (A larger one
    // is cut by the server's own reset, proxy or not.)
    let answer: &'static [u8] = ANSWER.get_or_init(|| {
        let mut a = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 32768\r\n\r\n".to_vec();
        a.extend(data(32768));
        a
    });
    let direct = early_answer(None, answer).await;
    assert!(
        direct == answer,
        "direct: {} of {} bytes",
        direct.len(),
        answer.len()
    );
    for i in 0..20 {
        let proxied = early_answer(Some(mode), answer).await;
        assert!(
            proxied == direct,
            "try {i}: through the relay the client got {} bytes, directly {}",
            proxied.len(),
            direct.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_the_client_in_splice_mode() {
    an_early_answer_reaches_the_client(RelayMode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_the_client_in_copy_mode() {
    an_early_answer_reaches_the_client(RelayMode::Copy).await;
}

/// Reads from `s` until something happens, at most `within`.
async fn outcome(s: &mut TcpStream, within: Duration) -> Option<io::Result<usize>> {
    let mut b = [0u8; 64];
    tokio::time::timeout(within, s.read(&mut b)).await.ok()
}

#[tokio::test]
async fn a_flow_idle_for_the_idle_timeout_is_reset_and_a_busy_one_is_not() {
    let config = RelayConfig {
        mode: RelayMode::Splice,
        idle_timeout: Some(Duration::from_millis(300)),
    };
    // Busy: a message every 100 ms for 1 s (over 3 idle timeouts).
    let f = flow().await;
    let (mut client, mut server) = (f.client, f.server);
    let cut = CancellationToken::new();
    let busy = tokio::spawn(async move {
        relay(
            config,
            &TcpOptions::default(),
            f.proxy_client,
            f.proxy_upstream,
            &cut,
            &RelayedBytes::default(),
        )
        .await
    });
    let mut idle_since = tokio::time::Instant::now();
    for i in 0..10u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).await.unwrap();
        idle_since = tokio::time::Instant::now();
        assert_eq!(b[0], i);
    }
    assert!(!busy.is_finished(), "a busy flow was cut");
    // Idle from now on: both sides are reset soon after 300 ms.
    for (who, s) in [("client", &mut client), ("server", &mut server)] {
        match outcome(s, Duration::from_secs(3)).await {
            Some(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{who}: {e}"),
            Some(Ok(n)) => panic!("{who} read Ok({n}) instead of a reset"),
            None => panic!("{who} still connected 3 s into an idle timeout of 300 ms"),
        }
    }
    assert!(idle_since.elapsed() >= Duration::from_millis(250));
    let r = busy.await.unwrap();
    assert!(r.is_err(), "the relay should report the idle timeout");
}

#[tokio::test]
async fn a_long_lived_flow_gets_keepalive_on_its_upstream_and_a_young_one_not_yet() {
    use crate::proxy::tcp_options::{Keepalive, LONG_LIVED};
    use std::os::fd::AsFd;
    let tcp = TcpOptions {
        keepalive: Some(Keepalive {
            time: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            count: 4,
        }),
        user_timeout: Some(Duration::from_secs(19)),
    };
    let f = flow().await;
    // The same socket as the relay's upstream, to read its options.
    let upstream = f.proxy_upstream.as_fd().try_clone_to_owned().unwrap();
    let upstream = socket2::SockRef::from(&upstream);
    let cut = CancellationToken::new();
    let (_client, _server) = (f.client, f.server);
    let _relay = tokio::spawn(async move {
        relay(
            RelayMode::Splice.into(),
            &tcp,
            f.proxy_client,
            f.proxy_upstream,
            &cut,
            &RelayedBytes::default(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !upstream.keepalive().unwrap(),
        "a young flow paid for keepalive"
    );
    tokio::time::sleep(LONG_LIVED).await;
    assert!(
        upstream.keepalive().unwrap(),
        "no keepalive on a long-lived flow"
    );
    assert_eq!(
        upstream.tcp_keepalive_time().unwrap(),
        Duration::from_secs(7)
    );
    assert_eq!(
        upstream.tcp_user_timeout().unwrap(),
        Some(Duration::from_secs(19))
    );
}

#[tokio::test]
async fn the_relay_future_stays_small() {
    // Every open flow holds this future in its task, so its size is
    // most of the proxy's memory per idle connection (2.25 KiB at
    // f967322, whose relay future was 792 bytes). Rare paths are boxed
    // and futures are lent rather than moved (rust-lang/rust#62958)
    // to keep it there. (1 416: the two directions' shared flag that
    // saves a `shutdown` per FIN-closed flow, 16 bytes.)
    let f = flow().await;
    let (tcp, cut) = (TcpOptions::default(), CancellationToken::new());
    let bytes = RelayedBytes::default();
    let r = relay(
        RelayMode::Splice.into(),
        &tcp,
        f.proxy_client,
        f.proxy_upstream,
        &cut,
        &bytes,
    );
    let size = std::mem::size_of_val(&r);
    assert!(size <= 1416, "the relay future grew to {size} bytes");
}

#[tokio::test]
async fn empty_flow_ends_cleanly() {
    let (back, t) = through_relay(RelayMode::Splice, Vec::new()).await;
    assert!(back.is_empty());
    assert_eq!(t, Transferred::default());
}

/// Waits (at most `within`) until `bytes` holds `want` (to the endpoint,
/// to the client); the last values seen otherwise.
async fn counted(bytes: &RelayedBytes, want: (u64, u64), within: Duration) -> (u64, u64) {
    let end = tokio::time::Instant::now() + within;
    loop {
        let got = (bytes.get(Way::ToEndpoint), bytes.get(Way::ToClient));
        if got == want || tokio::time::Instant::now() >= end {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A long-lived flow: a bulk burst and small messages each way, then the
/// flow stays open. What it moved must show in the port's counters
/// within a few seconds, while it is still open.
async fn an_open_flow_counts_its_bytes_as_they_move(mode: RelayMode) {
    let f = flow().await;
    let (mut client, mut server) = (f.client, f.server);
    let bytes = Arc::new(RelayedBytes::default());
    let counters = Arc::clone(&bytes);
    let cut = CancellationToken::new();
    let relay_cut = cut.clone();
    let relay_task = tokio::spawn(async move {
        relay(
            mode.into(),
            &TcpOptions::default(),
            f.proxy_client,
            f.proxy_upstream,
            &relay_cut,
            &counters,
        )
        .await
    });
    let burst = data(3 * 1024 * 1024 + 7);
    let sent = burst.clone();
    let mut got = vec![0u8; burst.len()];
    let (w, r) = tokio::join!(client.write_all(&sent), server.read_exact(&mut got));
    w.unwrap();
    r.unwrap();
    assert!(got == burst, "burst corrupted");
    server.write_all(b"hello client").await.unwrap();
    let mut b = [0u8; 12];
    client.read_exact(&mut b).await.unwrap();
    // A quiet second and more, then one small message each way: a trickle
    // shows too, not only bulk.
    tokio::time::sleep(FLUSH_EVERY + Duration::from_millis(300)).await;
    client.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    server.read_exact(&mut b).await.unwrap();
    server.write_all(b"pong").await.unwrap();
    client.read_exact(&mut b).await.unwrap();
    let want = (burst.len() as u64 + 4, 12 + 4);
    let got = counted(&bytes, want, Duration::from_secs(3)).await;
    assert_eq!(got, want, "bytes of the open flow not counted ({mode:?})");
    assert!(!relay_task.is_finished(), "the flow ended");
    cut.cancel();
    let _ = relay_task.await;
    assert_eq!(
        counted(&bytes, want, Duration::ZERO).await,
        want,
        "counted twice at the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_flow_counts_its_bytes_as_they_move_in_splice_mode() {
    an_open_flow_counts_its_bytes_as_they_move(RelayMode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_flow_counts_its_bytes_as_they_move_in_copy_mode() {
    an_open_flow_counts_its_bytes_as_they_move(RelayMode::Copy).await;
}

/// A flow that ends with a reset (the server aborts it) still counts
/// every byte it moved, bulk and small.
async fn a_reset_flow_counts_its_bytes(mode: RelayMode) {
    let f = flow().await;
    let (mut client, mut server) = (f.client, f.server);
    let bytes = Arc::new(RelayedBytes::default());
    let counters = Arc::clone(&bytes);
    let relay_task = tokio::spawn(async move {
        relay(
            mode.into(),
            &TcpOptions::default(),
            f.proxy_client,
            f.proxy_upstream,
            &CancellationToken::new(),
            &counters,
        )
        .await
    });
    let up = data(2 * 1024 * 1024 + 3);
    let down = data(1024 * 1024 + 5);
    let mut got_up = vec![0u8; up.len()];
    let (w, r) = tokio::join!(client.write_all(&up), server.read_exact(&mut got_up));
    w.unwrap();
    r.unwrap();
    let mut got_down = vec![0u8; down.len()];
    let (w, r) = tokio::join!(server.write_all(&down), client.read_exact(&mut got_down));
    w.unwrap();
    r.unwrap();
    assert!(got_up == up && got_down == down, "payload corrupted");
    client.write_all(b"last words").await.unwrap();
    let mut b = [0u8; 10];
    server.read_exact(&mut b).await.unwrap();
    // The server aborts: the flow ends with an error.
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);
    let ended = tokio::time::timeout(Duration::from_secs(10), relay_task)
        .await
        .expect("the relay did not end after the reset")
        .unwrap();
    assert!(
        ended.is_err(),
        "a reset flow ended without error: {ended:?}"
    );
    let want = (up.len() as u64 + 10, down.len() as u64);
    assert_eq!(
        counted(&bytes, want, Duration::from_secs(1)).await,
        want,
        "bytes of the reset flow not counted ({mode:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_flow_counts_its_bytes_in_splice_mode() {
    a_reset_flow_counts_its_bytes(RelayMode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_flow_counts_its_bytes_in_copy_mode() {
    a_reset_flow_counts_its_bytes(RelayMode::Copy).await;
}

#[test]
fn with_the_pipe_cap_at_n_more_bulk_flows_all_arrive_intact_and_never_hold_more_pipes() {
    // In a child process: the pool is the process's. Cap 2, six flows
    // bulk both ways at once (12 bulk directions, rounds of them): every
    // byte arrives in order, at most 2 pipes are ever held (or open), the
    // rest copy (counted), and every pipe comes back.
    use crate::proxy::test_support::{isolated, open_pipes, test_name};
    if !isolated(&test_name(
        module_path!(),
        "with_the_pipe_cap_at_n_more_bulk_flows_all_arrive_intact_and_never_hold_more_pipes",
    )) {
        return;
    }
    const CAP: usize = 2;
    pipe::PIPES.set_max(CAP);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let before = open_pipes();
        let mut most_open = 0;
        for round in 0..3 {
            let mut flows = Vec::new();
            // All connected first, then all started at once.
            let go = Arc::new(tokio::sync::Barrier::new(CAP + 4));
            for i in 0..CAP + 4 {
                let f = flow().await;
                let go = Arc::clone(&go);
                // A payload of its own per flow and round: a pipe handed
                // on with another flow's bytes in it would show.
                let payload: Vec<u8> = data(4 * 1024 * 1024 + 17 * i + round)
                    .into_iter()
                    .map(|b| b ^ (i * 31 + round * 7) as u8)
                    .collect();
                flows.push(tokio::spawn(async move {
                    go.wait().await;
                    let (client, server, relay_task) = start_relay(RelayMode::Splice, f);
                    reversed_round_trip(client, server, &payload).await;
                    relay_task.await.unwrap().expect("the relay failed")
                }));
            }
            let watch = async {
                loop {
                    most_open = most_open.max(open_pipes().saturating_sub(before));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            };
            let all = async {
                for f in flows {
                    let t = f.await.unwrap();
                    assert_eq!(t.client_to_upstream, t.upstream_to_client);
                }
            };
            tokio::select! {
                () = all => {}
                () = watch => unreachable!(),
            }
        }
        assert!(
            (1..=CAP).contains(&pipe::PIPES.peak()),
            "pipes held at once: {} (cap {CAP})",
            pipe::PIPES.peak()
        );
        // Two fds per pipe.
        assert!(
            most_open <= 2 * CAP,
            "{most_open} pipe fds open (cap {CAP} pipes)"
        );
        assert!(pipe::PIPES.fallbacks() > 0, "no direction had to copy");
        assert_eq!(pipe::PIPES.in_use(), 0, "a pipe was not given back");
    });
}
