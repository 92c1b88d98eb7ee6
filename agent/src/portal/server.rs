//! The portal's listener and HTTP server. Every request, whatever its method and path,
//! gets `511 Network Authentication Required` (RFC 6585) and the page.

use std::{
    future::{Future, IntoFuture},
    io,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    extract::{ConnectInfo, State, connect_info::Connected},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    serve::IncomingStream,
};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use super::{PageFacts, render};
use crate::listen::Limited;

/// Room for a burst of devices hitting the portal at once.
const BACKLOG: i32 = 1024;
/// After `shutdown`, how long open connections get to finish. Answers take milliseconds;
/// the bound is for devices that send half a request and wait, which would otherwise
/// hold the shutdown forever (`axum::serve` sets no header read timeout).
const DRAIN: Duration = Duration::from_secs(2);

type FactsFn = dyn Fn(SocketAddr, SocketAddr) -> PageFacts + Send + Sync;

/// A TCP listener for the portal: IP_TRANSPARENT (IPv4) / IPV6_TRANSPARENT (IPv6) so
/// that sockets it accepts may use the dialled (non-local) address as their source;
/// SO_REUSEADDR; for `[::]`, IPV6_V6ONLY off so IPv4 is served too; nonblocking, for
/// [`tokio::net::TcpListener::from_std`]. Needs CAP_NET_ADMIN.
pub fn bind_transparent(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    let transparent = match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => socket.set_ip_transparent_v6(true),
    };
    transparent.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "portal {addr}: cannot set IP_TRANSPARENT: {e} (the agent needs CAP_NET_ADMIN)"
            ),
        )
    })?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Serves the portal until `shutdown` resolves. `facts` is called for each request with
/// (peer, local): the client's address and the address it dialled, v4-mapped IPv6
/// addresses turned into IPv4 first. It runs on the blocking pool, so it may take locks.
/// Connections still open [`DRAIN`] after `shutdown` are left behind.
pub async fn serve(
    listener: Limited<TcpListener>,
    facts: Arc<dyn Fn(SocketAddr, SocketAddr) -> PageFacts + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (fired, on_fire) = tokio::sync::oneshot::channel();
    let app = Router::new().fallback(answer).with_state(facts);
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<Ends>())
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = fired.send(());
        })
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        Ok(()) = on_fire => {}
    }
    tokio::time::timeout(DRAIN, server)
        .await
        .unwrap_or_else(|_| {
            tracing::warn!(drain = ?DRAIN, "portal stopped with connections still open");
            Ok(())
        })
}

/// Both ends of an accepted connection: with a transparent listener the local address
/// is the one the device dialled, not one of ours.
#[derive(Clone, Copy, Debug)]
struct Ends {
    peer: SocketAddr,
    local: SocketAddr,
}

impl Connected<IncomingStream<'_, Limited<TcpListener>>> for Ends {
    fn connect_info(stream: IncomingStream<'_, Limited<TcpListener>>) -> Self {
        Self {
            peer: *stream.remote_addr(),
            // getsockname fails only on a dead socket, whose request never comes.
            local: stream
                .io()
                .io()
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }
}

async fn answer(
    State(facts): State<Arc<FactsFn>>,
    ConnectInfo(ends): ConnectInfo<Ends>,
) -> Response {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (peer, local) = (canonical(ends.peer), canonical(ends.local));
    let page = match tokio::task::spawn_blocking(move || facts(peer, local)).await {
        Ok(page) => page,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    tracing::info!(
        device = %page.device,
        destination = %page.destination,
        user = page.user.as_deref().unwrap_or("-"),
        policy = page.policy.as_deref().unwrap_or("-"),
        "re-authentication page served"
    );
    (
        StatusCode::NETWORK_AUTHENTICATION_REQUIRED,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // One answer per connection: `axum::serve` has no idle timeout, so a kept-alive
            // connection would hold a portal socket for as long as the device likes.
            (header::CONNECTION, "close"),
        ],
        render(&page),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use socket2::SockRef;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn test_limits(listener: TcpListener) -> Limited<TcpListener> {
        crate::listen::limited(
            listener,
            crate::listen::Limits {
                name: "portal test",
                total: 64,
                per_client: 64,
                idle: None,
            },
        )
    }

    #[tokio::test]
    async fn every_request_gets_511_and_the_page() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let portal = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let facts: Arc<FactsFn> = Arc::new({
            let seen = seen.clone();
            move |peer: SocketAddr, local: SocketAddr| {
                seen.lock().unwrap().push((peer, local));
                PageFacts {
                    device: peer.ip(),
                    destination: local,
                    user: Some("alice".into()),
                    policy: Some("payroll".into()),
                    session_age: Some(Duration::from_secs(9 * 3600)),
                    max_age: Some(Duration::from_secs(8 * 3600)),
                    reauth_url: Some("https://sso.example.com/".into()),
                }
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(test_limits(listener), facts, async {
            let _ = stopped.await;
        }));

        for request in [
            "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "POST /login?x=1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n",
        ] {
            let mut client = tokio::net::TcpStream::connect(portal).await.unwrap();
            let client_addr = client.local_addr().unwrap();
            client.write_all(request.as_bytes()).await.unwrap();
            let mut reply = String::new();
            tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut reply))
                .await
                .expect("the portal should close the connection after its answer")
                .unwrap();

            let (head, body) = reply.split_once("\r\n\r\n").expect(&reply);
            let head = head.to_ascii_lowercase();
            assert!(
                head.starts_with("http/1.1 511 network authentication required\r\n"),
                "{reply}"
            );
            for line in [
                "content-type: text/html; charset=utf-8",
                "cache-control: no-store",
                "connection: close",
            ] {
                assert!(head.contains(line), "missing {line} in {reply}");
            }
            assert!(body.contains("<dd>alice</dd>"), "{body}");
            assert!(body.contains("href=\"https://sso.example.com/\""), "{body}");
            assert_eq!(seen.lock().unwrap().pop(), Some((client_addr, portal)));
        }

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the portal should stop on shutdown")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_half_sent_request_does_not_hold_the_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let portal = listener.local_addr().unwrap();
        let facts: Arc<FactsFn> = Arc::new(|_, _| unreachable!("no request is complete"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(test_limits(listener), facts, async {
            let _ = stopped.await;
        }));
        let mut client = tokio::net::TcpStream::connect(portal).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;

        stop.send(()).unwrap();
        tokio::time::timeout(DRAIN + Duration::from_secs(3), server)
            .await
            .expect("the portal should stop at most DRAIN after shutdown")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn bind_transparent_sets_the_options() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: IP_TRANSPARENT needs CAP_NET_ADMIN; run as root");
            return;
        }
        let v4 = bind_transparent("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(SockRef::from(&v4).ip_transparent_v4().unwrap());
        assert_eq!(
            v4.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "the listener should be nonblocking"
        );
        match bind_transparent("[::]:0".parse().unwrap()) {
            Ok(v6) => {
                assert!(SockRef::from(&v6).ip_transparent_v6().unwrap());
                assert!(!SockRef::from(&v6).only_v6().unwrap());
            }
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                eprintln!("skipping IPv6: {e}");
            }
            Err(e) => panic!("bind_transparent([::]:0): {e}"),
        }
    }
}
