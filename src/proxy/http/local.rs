//! The streams of one h2 connection, run inside that connection's own
//! task instead of a task each.
//!
//! hyper's h2 server hands each request (stream) of a connection to an
//! executor. With tokio's executor, each is a task of its own: the
//! work-stealing runtime moves them to whichever worker is idle, the
//! streams of one connection then run on several threads at once and
//! contend for the connection's shared state (h2 keeps its streams behind
//! one lock), every hand-over wakes a task, and every request spawns one.
//! Here the executor only queues the future; [`WithStreams`] polls the
//! queued futures and the connection together, as one task, so that a
//! connection and all its work stay on one thread at a time, as an nginx
//! or HAProxy connection stays on its worker (docs/performance.md,
//! "Request mode: where a stream's CPU goes"). Used for the h2 client
//! connections request mode serves; its h2 connections to the endpoints
//! need none ([`super::h2_upstream`]: each request waits on its stream
//! itself). HTTP/1.1 has no streams: one request at a time runs inside
//! the connection already.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Futures handed over by hyper, waiting to be polled by the task.
#[derive(Default)]
struct Queue {
    new: Mutex<Vec<Stream>>,
    /// The connection's task, woken when a stream is queued while it is
    /// not being polled.
    task: AtomicWaker,
    /// The task is being polled and will look for new futures before it
    /// returns: hyper queues them from inside that poll, and waking the
    /// task then would only poll it once more for nothing.
    polling: AtomicBool,
}

/// hyper's executor for one connection: queues each future for that
/// connection's [`WithStreams`].
#[derive(Clone, Default)]
pub struct ConnExecutor(Arc<Queue>);

impl<F> hyper::rt::Executor<F> for ConnExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0
            .new
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::pin(fut));
        // After the push: a poll that has just ended either sees the
        // future under the lock or has cleared `polling` before it.
        if !self.0.polling.load(Ordering::SeqCst) {
            self.0.task.wake();
        }
    }
}

/// A connection future together with the streams its executor was given:
/// ready when the connection is done and its last stream has finished.
/// The connection future is dropped as soon as it is done, not when its
/// last stream is: a queued future may wait for what the connection
/// holds to be let go of (as hyper's h2 client, used here before,
/// closed its frame I/O only once its dispatch future was dropped).
pub struct WithStreams<C: Future> {
    /// `None` once done.
    conn: Option<Pin<Box<C>>>,
    done: Option<C::Output>,
    streams: FuturesUnordered<Stream>,
    queue: Arc<Queue>,
}

impl<C: Future> WithStreams<C> {
    pub fn new(conn: C, executor: &ConnExecutor) -> Self {
        WithStreams {
            conn: Some(Box::pin(conn)),
            done: None,
            streams: FuturesUnordered::new(),
            queue: Arc::clone(&executor.0),
        }
    }

    /// The connection itself (to ask it to shut down gracefully), while
    /// it runs.
    pub fn conn(&mut self) -> Option<Pin<&mut C>> {
        self.conn.as_mut().map(|c| c.as_mut())
    }

    fn take_new(&mut self) {
        let mut new = self.queue.new.lock().unwrap_or_else(|e| e.into_inner());
        self.streams.extend(new.drain(..));
    }

    fn has_new(&self) -> bool {
        !self
            .queue
            .new
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

impl<C: Future> Unpin for WithStreams<C> {}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        this.queue.task.register(cx.waker());
        this.queue.polling.store(true, Ordering::SeqCst);
        loop {
            this.take_new();
            // Finished streams leave the set; a pending one has
            // registered `cx`'s waker through the set.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            if let Some(conn) = this.conn.as_mut()
                && let Poll::Ready(r) = conn.as_mut().poll(cx)
            {
                this.done = Some(r);
                this.conn = None;
            }
            // Again if the connection handed over new streams meanwhile.
            if !this.has_new() {
                break;
            }
        }
        this.queue.polling.store(false, Ordering::SeqCst);
        // Queued from another thread between the last look and now.
        if this.has_new() {
            cx.waker().wake_by_ref();
        }
        if this.streams.is_empty()
            && let Some(r) = this.done.take()
        {
            return Poll::Ready(r);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Streams queued before and while the connection runs are all run,
    /// and the whole is done only when the connection and every stream
    /// are.
    #[tokio::test]
    async fn every_stream_runs_and_the_connection_waits_for_them() {
        let exec = ConnExecutor::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let conn = {
            let exec = exec.clone();
            let ran = Arc::clone(&ran);
            async move {
                for _ in 0..3 {
                    let ran = Arc::clone(&ran);
                    exec.execute(async move {
                        tokio::task::yield_now().await;
                        ran.fetch_add(1, Ordering::SeqCst);
                    });
                    tokio::task::yield_now().await;
                }
                // A stream that outlives the connection's own future.
                let ran = Arc::clone(&ran);
                exec.execute(async move {
                    let _ = rx.await;
                    ran.fetch_add(1, Ordering::SeqCst);
                });
                7
            }
        };
        let mut all = tokio::spawn(WithStreams::new(conn, &exec));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            futures::poll!(&mut all).is_pending(),
            "done before its last stream"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        tx.send(()).unwrap();
        assert_eq!(all.await.unwrap(), 7);
        assert_eq!(ran.load(Ordering::SeqCst), 4);
    }

    /// A future queued from another thread while the task waits is run:
    /// the task is woken when it is not being polled.
    #[tokio::test]
    async fn a_stream_queued_from_another_thread_while_idle_runs() {
        let exec = ConnExecutor::default();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (ran_tx, ran_rx) = tokio::sync::oneshot::channel::<()>();
        let conn = async move {
            let _ = done_rx.await;
        };
        let all = tokio::spawn(WithStreams::new(conn, &exec));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let from = exec.clone();
        std::thread::spawn(move || {
            from.execute(async move {
                let _ = ran_tx.send(());
            })
        })
        .join()
        .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), ran_rx)
            .await
            .expect("a future queued while the task was idle never ran")
            .unwrap();
        done_tx.send(()).unwrap();
        all.await.unwrap();
    }

    /// A stream that waits for the connection future to be dropped (as
    /// hyper's h2 client's frame I/O waited for its dispatch future) ends:
    /// the connection future is dropped when it is done, not kept until
    /// every stream has finished.
    #[tokio::test]
    async fn a_done_connection_is_dropped_before_its_streams_end() {
        let exec = ConnExecutor::default();
        let (held, mut dropped) = tokio::sync::mpsc::channel::<()>(1);
        exec.execute(async move {
            // Ends when every sender is gone.
            let _ = dropped.recv().await;
        });
        // Done at its second poll, holding the sender until it is
        // dropped (as hyper's dispatch future holds its handles).
        struct Holds<T>(Option<T>, bool);
        impl<T: Unpin> Future for Holds<T> {
            type Output = u32;
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
                if self.1 {
                    return Poll::Ready(5);
                }
                self.1 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        let conn = Holds(Some(held), false);
        let all = tokio::spawn(WithStreams::new(conn, &exec));
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), all)
            .await
            .expect("the connection's future was kept after it was done");
        assert_eq!(r.unwrap(), 5);
    }
}
