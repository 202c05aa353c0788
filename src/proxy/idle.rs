//! `proxy.idle_timeout` for client connections, and `proxy.response_timeout` for their HTTP/1
//! requests: one sweep per serving thread instead of timers per request.
//!
//! A tokio timer per request and per timeout (a sleep, a timer-wheel entry, clock reads; for
//! hyper's `header_read_timeout` also a box) cost about 2 400 of the ~33 000 instructions the
//! proxy spent on a keep-alive request (callgrind). Here each connection carries a [`Watch`]:
//! counts that requests reset as they go, and that the thread's [`Sweeper`] counts up every
//! tenth of the shorter timeout:
//!
//! - *idle*: no request in flight — waiting for the next request, or for the rest of one's
//!   headers (a client trickling them is cut off). Nothing counts while a request is in flight,
//!   and the count starts over when its response body is done; once idle for the whole
//!   `idle_timeout` the connection is closed (unless a request arrived meanwhile).
//! - *waiting*: a request waiting for an upstream's response headers. Past `response_timeout`
//!   the wait ends (504). An HTTP/1 connection has one request at a time, served inside the
//!   connection's task, so one flag and the task's waker do; HTTP/2 requests run as tasks of
//!   their own and keep a tokio timer each.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU32, Ordering::Relaxed},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use hyper::body::{Body, Frame, SizeHint};

/// One client connection's state, shared by its task, its requests and the sweeper.
#[derive(Default)]
pub struct Watch {
    /// Requests in flight (an HTTP/2 connection may have several).
    busy: AtomicU32,
    /// Sweeps in a row that found the connection idle.
    idle_sweeps: AtomicU32,
    /// Set by the sweeper: the connection's task drops it.
    close: AtomicBool,
    /// Whether a request waits for response headers, for how many sweeps, and whether the
    /// sweeper ended the wait.
    waiting: AtomicBool,
    waiting_sweeps: AtomicU32,
    timed_out: AtomicBool,
    /// Response bodies being sent; whether the last poll of one is waiting for its upstream
    /// (then a slow response is the upstream's doing, not the client's); sweeps in a row
    /// without a poll while hyper holds bytes it could not write; and the sweeper's verdict
    /// that the client stopped reading for `write_timeout` (the connection is then dropped,
    /// busy or not).
    responding: AtomicU32,
    pulling: AtomicBool,
    stalled_sweeps: AtomicU32,
    stalled: AtomicBool,
    /// The connection's task, to wake when `close` is set (a task's waker never changes).
    task: OnceLock<Waker>,
}

impl Watch {
    /// Marks a request in flight until the returned guard (kept by its response body) drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        // No sweep counts while it is in flight; the count restarts when it ends.
        self.busy.fetch_add(1, Relaxed);
        Busy(self.clone())
    }

    /// Resolves when the sweeper has found the connection idle for the whole timeout.
    pub fn closed(&self) -> Closed<'_> {
        Closed(self)
    }

    /// Awaits `future` (an upstream's response headers) for up to `response_timeout`; `None`
    /// when it ran out. Only for a request polled by the connection's own task (HTTP/1).
    pub async fn within_response_timeout<F: Future>(&self, future: F) -> Option<F::Output> {
        /// Ends the wait however the future ends, also when it is dropped.
        struct Waiting<'a>(&'a Watch);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.waiting.store(false, Relaxed);
            }
        }
        self.waiting_sweeps.store(0, Relaxed);
        self.timed_out.store(false, Relaxed);
        self.waiting.store(true, Relaxed);
        let _waiting = Waiting(self);
        let mut future = std::pin::pin!(future);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            if self.timed_out.load(Relaxed) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// One more sweep on `sweeps`; at `limit`, raises `ended` and wakes the connection's task.
    fn count(&self, sweeps: &AtomicU32, limit: u32, ended: &AtomicBool) {
        let counted = sweeps.load(Relaxed) + 1;
        sweeps.store(counted, Relaxed);
        if counted >= limit {
            ended.store(true, Relaxed);
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(task) = self.task.get() {
            task.wake_by_ref();
        }
    }
}

/// A request in flight on a watched connection.
pub struct Busy(Arc<Watch>);

impl Busy {
    /// The connection's watch.
    pub fn watch(&self) -> &Watch {
        &self.0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
        // The idle time counts from the end of the response.
        self.0.idle_sweeps.store(0, Relaxed);
    }
}

/// See [`Watch::closed`].
pub struct Closed<'a>(&'a Watch);

impl Future for Closed<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let watch = self.0;
        if watch.task.get().is_none() {
            let _ = watch.task.set(cx.waker().clone());
        }
        if watch.stalled.load(Relaxed) {
            return Poll::Ready(());
        }
        if watch.close.load(Relaxed) {
            if watch.busy.load(Relaxed) == 0 {
                return Poll::Ready(());
            }
            // A request arrived between the sweep and this poll (the connection is polled
            // first): the connection is in use again, and its idle time starts over.
            watch.close.store(false, Relaxed);
        }
        Poll::Pending
    }
}

/// A response body that keeps its request counted as in flight until it is done, and whose
/// polls tell the sweeper that the client is taking the response (`write_timeout`).
pub struct BusyBody<B> {
    body: B,
    busy: Busy,
}

impl<B> BusyBody<B> {
    pub fn new(body: B, busy: Busy) -> Self {
        let watch = busy.watch();
        watch.stalled_sweeps.store(0, Relaxed);
        watch.responding.fetch_add(1, Relaxed);
        Self { body, busy }
    }
}

impl<B> Drop for BusyBody<B> {
    fn drop(&mut self) {
        self.busy.watch().responding.fetch_sub(1, Relaxed);
    }
}

impl<B: Body + Unpin> Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        // hyper polls for more only when it has room to write: a poll is progress.
        let watch = this.busy.watch();
        watch.stalled_sweeps.store(0, Relaxed);
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        watch.pulling.store(frame.is_pending(), Relaxed);
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connections of one serving thread, swept every [`Sweeper::period`].
pub struct Sweeper {
    watches: Vec<Arc<Watch>>,
    /// Sweeps after which an idle connection has been idle for at least `idle_timeout`.
    idle_limit: u32,
    /// Sweeps after which a request has waited for at least `response_timeout`.
    response_limit: u32,
    /// Sweeps after which a response has made no progress for at least `write_timeout`.
    write_limit: u32,
    period: Duration,
}

impl Sweeper {
    pub fn new(
        idle_timeout: Duration,
        response_timeout: Duration,
        write_timeout: Duration,
    ) -> Self {
        let mut sweeper = Self {
            watches: Vec::new(),
            idle_limit: 0,
            response_limit: 0,
            write_limit: 0,
            period: Duration::ZERO,
        };
        sweeper.retime(idle_timeout, response_timeout, write_timeout);
        sweeper
    }

    /// Takes up new timeouts (a reload): the sweeps counted so far stand, each worth the new
    /// period from now on. Call [`period`](Self::period) again for the sweep interval.
    pub fn retime(
        &mut self,
        idle_timeout: Duration,
        response_timeout: Duration,
        write_timeout: Duration,
    ) {
        let period = (idle_timeout.min(response_timeout).min(write_timeout) / 10)
            .clamp(Duration::from_millis(1), Duration::from_secs(1));
        // The first sweep comes up to one period after the count started, so one more than the
        // timeout's worth: the timeout passes in full, and at most two periods more.
        let limit = |timeout: Duration| {
            let sweeps = timeout.as_nanos().div_ceil(period.as_nanos());
            u32::try_from(sweeps).unwrap_or(u32::MAX - 1) + 1
        };
        self.idle_limit = limit(idle_timeout);
        self.response_limit = limit(response_timeout);
        self.write_limit = limit(write_timeout);
        self.period = period;
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// A new connection's watch; idle from now.
    pub fn watch(&mut self) -> Arc<Watch> {
        let watch = Arc::new(Watch::default());
        self.watches.push(watch.clone());
        watch
    }

    /// Counts the sweeps of idle connections and waiting requests, ends those past their
    /// timeout, and forgets the connections that have ended.
    pub fn sweep(&mut self) {
        let (idle_limit, response_limit, write_limit) =
            (self.idle_limit, self.response_limit, self.write_limit);
        self.watches.retain(|watch| {
            if Arc::strong_count(watch) == 1 {
                return false;
            }
            if watch.waiting.load(Relaxed) && !watch.timed_out.load(Relaxed) {
                watch.count(&watch.waiting_sweeps, response_limit, &watch.timed_out);
            }
            if watch.responding.load(Relaxed) > 0
                && !watch.pulling.load(Relaxed)
                && !watch.stalled.load(Relaxed)
            {
                watch.count(&watch.stalled_sweeps, write_limit, &watch.stalled);
            }
            if watch.busy.load(Relaxed) == 0 && !watch.close.load(Relaxed) {
                watch.count(&watch.idle_sweeps, idle_limit, &watch.close);
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closing(watch: &Watch) -> bool {
        watch.close.load(Relaxed)
    }

    #[test]
    fn idle_connection_is_closed_after_the_timeout_and_not_before() {
        let mut sweeper = Sweeper::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        assert_eq!(sweeper.period(), Duration::from_millis(50));
        let watch = sweeper.watch();
        // 500 ms of sweeps after the one that may come right after it fell idle.
        for _ in 0..10 {
            sweeper.sweep();
            assert!(!closing(&watch));
        }
        sweeper.sweep();
        assert!(closing(&watch));
    }

    #[test]
    fn requests_in_flight_and_just_finished_keep_the_connection_open() {
        let mut sweeper = Sweeper::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let watch = sweeper.watch();
        for _ in 0..9 {
            sweeper.sweep();
        }
        let busy = watch.begin();
        // A long response: no sweep counts while it is in flight.
        for _ in 0..50 {
            sweeper.sweep();
        }
        assert!(!closing(&watch));
        drop(busy);
        for _ in 0..10 {
            sweeper.sweep();
        }
        assert!(
            !closing(&watch),
            "the idle time counts from the response's end"
        );
        sweeper.sweep();
        assert!(closing(&watch));
    }

    #[tokio::test]
    async fn a_request_arriving_after_the_sweep_keeps_the_connection() {
        let mut sweeper = Sweeper::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let watch = sweeper.watch();
        let mut closed = tokio_test::task::spawn(watch.closed());
        assert!(closed.poll().is_pending());
        for _ in 0..11 {
            sweeper.sweep();
        }
        assert!(closed.is_woken(), "the sweeper wakes the connection's task");
        let busy = watch.begin();
        assert!(
            closed.poll().is_pending(),
            "closed under a request in flight"
        );
        drop(busy);
        for _ in 0..10 {
            sweeper.sweep();
        }
        assert!(
            closed.poll().is_pending(),
            "the idle time did not start over"
        );
        sweeper.sweep();
        assert_eq!(closed.poll(), Poll::Ready(()));
    }

    #[tokio::test]
    async fn a_wait_ends_after_the_response_timeout_and_not_before() {
        let mut sweeper = Sweeper::new(
            Duration::from_secs(60),
            Duration::from_millis(300),
            Duration::from_secs(60),
        );
        assert_eq!(sweeper.period(), Duration::from_millis(30));
        let watch = sweeper.watch();
        let _busy = watch.begin();
        let mut wait = tokio_test::task::spawn(async {
            let closed = watch.closed();
            let headers = std::future::pending::<()>();
            tokio::select! {
                biased;
                waited = watch.within_response_timeout(headers) => waited,
                () = closed => panic!("a connection with a request in flight was closed"),
            }
        });
        for _ in 0..10 {
            assert!(wait.poll().is_pending());
            sweeper.sweep();
        }
        assert!(!wait.is_woken());
        sweeper.sweep();
        assert!(wait.is_woken(), "the sweeper wakes the connection's task");
        assert_eq!(wait.poll(), Poll::Ready(None));
        drop(wait);
        assert!(
            !watch.waiting.load(Relaxed),
            "the wait ended with its future"
        );
    }

    #[tokio::test]
    async fn a_response_within_the_timeout_is_awaited() {
        let mut sweeper = Sweeper::new(
            Duration::from_secs(60),
            Duration::from_millis(300),
            Duration::from_secs(60),
        );
        let watch = sweeper.watch();
        let (send, headers) = tokio::sync::oneshot::channel::<u16>();
        let mut wait = tokio_test::task::spawn(watch.within_response_timeout(headers));
        for _ in 0..10 {
            assert!(wait.poll().is_pending());
            sweeper.sweep();
        }
        send.send(200).unwrap();
        assert!(wait.is_woken());
        assert!(matches!(wait.poll(), Poll::Ready(Some(Ok(200)))));
    }

    #[test]
    fn ended_connections_are_forgotten() {
        let mut sweeper = Sweeper::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        assert_eq!(sweeper.period(), Duration::from_secs(1));
        let kept = sweeper.watch();
        drop(sweeper.watch());
        sweeper.sweep();
        assert_eq!(sweeper.watches.len(), 1);
        assert!(Arc::ptr_eq(&sweeper.watches[0], &kept));
    }
}
