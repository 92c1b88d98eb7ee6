//! Limits on the agent's listeners, so that no client can take the file descriptors or
//! the workers the others need (devices must be able to reach the portal, and so can
//! flood it): at most `total` connections at once, beyond which new ones wait in the
//! kernel's backlog holding none of our descriptors; at most `per_client` from one
//! address, beyond which new ones are closed at once; and a connection with no traffic
//! either way for `idle` is closed (a half-sent request, a connection opened and left
//! quiet). A limit reached is logged, at most once per listener every 10 seconds, with
//! how many connections it turned away meanwhile.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::serve::Listener;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

/// How often a flood of one kind may write a log line.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Counts events that each deserve a log line and lets a line through at most every
/// `LOG_EVERY`, with the count since the last one: a flood must not flood the log.
#[derive(Default)]
pub struct LogThrottle(Mutex<(Option<Instant>, u64)>);

impl LogThrottle {
    /// Counts one event; `Some(n)` when a line is due, `n` the events it stands for.
    pub fn hit(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state.1 += 1;
        if state.0.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            return None;
        }
        state.0 = Some(Instant::now());
        Some(std::mem::take(&mut state.1))
    }
}

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The listener's name in log lines (`portal_listen`, ...).
    pub name: &'static str,
    pub total: usize,
    /// Ignored where clients have no address (the unix socket).
    pub per_client: usize,
    pub idle: Option<Duration>,
}

/// The address a connection counts against for `per_client`.
pub trait ClientAddr {
    fn client(&self) -> Option<IpAddr>;
}

impl ClientAddr for SocketAddr {
    fn client(&self) -> Option<IpAddr> {
        Some(self.ip().to_canonical())
    }
}

impl ClientAddr for tokio::net::unix::SocketAddr {
    fn client(&self) -> Option<IpAddr> {
        None
    }
}

/// `inner` with `limits` applied to every connection it accepts.
pub fn limited<L: Listener>(inner: L, limits: Limits) -> Limited<L> {
    Limited {
        inner,
        shared: Arc::new(Shared {
            slots: Arc::new(Semaphore::new(limits.total)),
            limits,
            clients: Mutex::new(HashMap::new()),
            warnings: LogThrottle::default(),
        }),
    }
}

pub struct Limited<L> {
    inner: L,
    shared: Arc<Shared>,
}

struct Shared {
    limits: Limits,
    slots: Arc<Semaphore>,
    /// Open connections per client address (entries at zero are removed).
    clients: Mutex<HashMap<IpAddr, usize>>,
    warnings: LogThrottle,
}

impl Shared {
    /// Logs `what`, unless this listener logged less than `LOG_EVERY` ago.
    fn warn(&self, what: std::fmt::Arguments<'_>) {
        let Some(count) = self.warnings.hit() else {
            return;
        };
        tracing::warn!(
            listener = self.limits.name,
            connections_held_back = count,
            "connection limit reached: {what}"
        );
    }

    fn release(&self, client: IpAddr) {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = clients.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&client);
            }
        }
    }
}

impl<L> Listener for Limited<L>
where
    L: Listener,
    L::Addr: ClientAddr,
{
    type Io = Tracked<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let permit = match Arc::clone(&self.shared.slots).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let total = self.shared.limits.total;
                    self.shared.warn(format_args!(
                        "{total} connections open, the most allowed: new ones wait"
                    ));
                    Arc::clone(&self.shared.slots)
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed")
                }
            };
            let (io, addr) = self.inner.accept().await;
            let client = addr.client();
            if let Some(ip) = client {
                let per_client = self.shared.limits.per_client;
                let mut clients = self
                    .shared
                    .clients
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let open = clients.entry(ip).or_default();
                if *open >= per_client {
                    drop(clients);
                    self.shared.warn(format_args!(
                        "{ip} already has {per_client} connections open, the most one client may: closing new ones"
                    ));
                    continue;
                }
                *open += 1;
            }
            let idle = self.shared.limits.idle;
            return (
                Tracked {
                    io,
                    _permit: permit,
                    client,
                    shared: Arc::clone(&self.shared),
                    idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection: counted until dropped, and closed (its reads and writes
/// fail) once idle for too long.
pub struct Tracked<Io> {
    io: Io,
    _permit: OwnedSemaphorePermit,
    client: Option<IpAddr>,
    shared: Arc<Shared>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl<Io> Tracked<Io> {
    /// The connection underneath.
    pub fn io(&self) -> &Io {
        &self.io
    }

    /// Err once the connection has been idle too long; restarts the clock on progress.
    fn check_idle(&mut self, cx: &mut Context<'_>, progressed: bool) -> io::Result<()> {
        let Some((limit, sleep)) = &mut self.idle else {
            return Ok(());
        };
        if progressed {
            sleep.as_mut().reset(tokio::time::Instant::now() + *limit);
            return Ok(());
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{}: idle for {limit:?}", self.shared.limits.name),
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<Io> Drop for Tracked<Io> {
    fn drop(&mut self) {
        if let Some(client) = self.client {
            self.shared.release(client);
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Tracked<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let progressed = matches!(polled, Poll::Ready(_)) && buf.filled().len() > before;
        if let Err(e) = this.check_idle(cx, progressed) {
            return Poll::Ready(Err(e));
        }
        polled
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Tracked<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, data);
        let progressed = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        if let Err(e) = this.check_idle(cx, progressed) {
            return Poll::Ready(Err(e));
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    async fn listener(limits: Limits) -> (Limited<TcpListener>, SocketAddr) {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        (limited(inner, limits), addr)
    }

    fn limits(total: usize, per_client: usize, idle: Option<Duration>) -> Limits {
        Limits {
            name: "test",
            total,
            per_client,
            idle,
        }
    }

    /// Whether the server end of `client` was closed (EOF or reset) within a second.
    async fn closed(client: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), client.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[test]
    fn a_throttled_log_lets_the_first_line_through_and_counts_the_rest() {
        let throttle = LogThrottle::default();
        assert_eq!(throttle.hit(), Some(1));
        assert_eq!((throttle.hit(), throttle.hit()), (None, None));
        // Due again: the line stands for the two held back and this one.
        throttle.0.lock().unwrap().0 = Some(Instant::now() - LOG_EVERY);
        assert_eq!(throttle.hit(), Some(3));
    }

    #[tokio::test]
    async fn one_client_gets_at_most_its_share_and_its_slots_come_back() {
        let (mut l, addr) = listener(limits(100, 2, None)).await;
        let a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        let first = l.accept().await;
        let second = l.accept().await;
        // The third is closed by the listener, which then waits for the next one.
        let pending = tokio::spawn(async move {
            let accepted = l.accept().await;
            (l, accepted)
        });
        assert!(closed(&mut third).await, "a third connection was kept");
        drop(first);
        let fourth = TcpStream::connect(addr).await.unwrap();
        let (_l, accepted) = tokio::time::timeout(Duration::from_secs(1), pending)
            .await
            .expect("a slot came back when a connection ended")
            .unwrap();
        drop((a, b, second, fourth, accepted));
    }

    #[tokio::test]
    async fn beyond_the_total_new_connections_wait() {
        let (mut l, addr) = listener(limits(1, 10, None)).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let first = l.accept().await;
        let _b = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::spawn(async move { l.accept().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "accepted beyond the total");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("accepted once a slot was free")
            .unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let (mut l, addr) = listener(limits(10, 10, Some(Duration::from_millis(300)))).await;
        let mut quiet = TcpStream::connect(addr).await.unwrap();
        let (mut server_io, _) = l.accept().await;
        let served = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut got = 0;
            loop {
                match server_io.read(&mut buf).await {
                    Ok(0) => return (got, None),
                    Ok(n) => got += n,
                    Err(e) => return (got, Some(e.kind())),
                }
            }
        });
        // Traffic keeps it open past the idle limit...
        for _ in 0..5 {
            quiet.write_all(b"x").await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // ...and silence ends it.
        let (got, error) = tokio::time::timeout(Duration::from_secs(2), served)
            .await
            .expect("the idle connection was closed")
            .unwrap();
        assert_eq!((got, error), (5, Some(io::ErrorKind::TimedOut)));
    }
}
