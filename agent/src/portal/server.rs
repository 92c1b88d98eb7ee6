//! The portal's listener and HTTP server. Every redirected request, whatever its method
//! and path, gets `511 Network Authentication Required` (RFC 6585) and the page; on the
//! portal's own port, `/login` and `/callback` run the sign-in (`signin`).

use std::{
    future::{Future, IntoFuture},
    io,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    extract::{ConnectInfo, RawQuery, State, connect_info::Connected},
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
    serve::IncomingStream,
};
use socket2::{Domain, Socket, Type};

use super::{Backend, captive, render, signin, tls::PortalListener};
use crate::signin::SignIn;

/// Room for a burst of devices hitting the portal at once.
const BACKLOG: i32 = 1024;
/// After `shutdown`, how long open connections get to finish. Answers take milliseconds;
/// the bound is for devices that send half a request and wait, which would otherwise
/// hold the shutdown forever (`axum::serve` sets no header read timeout).
const DRAIN: Duration = Duration::from_secs(2);

/// What the portal serves.
pub struct Portal {
    pub backend: Arc<dyn Backend>,
    /// Sign-in with the identity providers, when any are configured.
    pub signin: Option<Arc<SignIn>>,
    /// The port devices dial to reach the portal itself. Connections to any other port
    /// are redirected application traffic: they only ever get the page.
    pub own_port: u16,
    /// Where users sign in (`{portal_url}/login`, or `reauth_url`), for the
    /// captive-portal API.
    pub user_portal_url: Option<String>,
}

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

/// Serves the portal until `shutdown` resolves. Connections still open [`DRAIN`] after
/// `shutdown` are left behind.
pub async fn serve(
    listener: PortalListener,
    portal: Arc<Portal>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (fired, on_fire) = tokio::sync::oneshot::channel();
    let app = Router::new().fallback(answer).with_state(portal);
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

impl Connected<IncomingStream<'_, PortalListener>> for Ends {
    fn connect_info(stream: IncomingStream<'_, PortalListener>) -> Self {
        Self {
            peer: *stream.remote_addr(),
            local: stream.io().local,
        }
    }
}

/// Addresses as the rest of the agent reads them: v4-mapped IPv6 turned into IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

async fn answer(
    State(portal): State<Arc<Portal>>,
    ConnectInfo(ends): ConnectInfo<Ends>,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    let (peer, local) = (canonical(ends.peer), canonical(ends.local));
    if local.port() == portal.own_port {
        let query = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
        let device = peer.ip();
        match (uri.path(), portal.signin.as_ref()) {
            ("/captive-portal", _) => {
                let url = portal.user_portal_url.as_deref();
                return captive::status(&portal.backend, device, url).await;
            }
            // Re-authenticating at will is signing in again.
            ("/login" | "/refresh-identity", Some(sign)) => {
                return signin::login(&portal.backend, sign, device, &query).await;
            }
            ("/callback", Some(sign)) => {
                return signin::callback(&portal.backend, sign, device, &query).await;
            }
            _ => {}
        }
    }
    let backend = Arc::clone(&portal.backend);
    let page = match tokio::task::spawn_blocking(move || backend.facts(peer.ip(), local)).await {
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
    use tokio::net::TcpListener;

    use crate::{portal::PageFacts, signin::Identity};

    type FactsFn = dyn Fn(SocketAddr, SocketAddr) -> PageFacts + Send + Sync;

    /// A backend that answers the page's facts with `facts` and refuses sign-ins.
    struct Facts(Arc<FactsFn>);

    impl Backend for Facts {
        fn facts(&self, device: std::net::IpAddr, destination: SocketAddr) -> PageFacts {
            (self.0)(SocketAddr::new(device, 0), destination)
        }
        fn enrolled_idp(&self, _: std::net::IpAddr) -> Option<String> {
            None
        }
        fn captive(&self, _: std::net::IpAddr) -> crate::portal::Captive {
            crate::portal::Captive {
                captive: true,
                seconds_remaining: None,
            }
        }
        fn signed_in(
            &self,
            _: std::net::IpAddr,
            _: &str,
            _: &Identity,
        ) -> Result<Vec<(String, String)>, String> {
            Err("no sign-in in this test".into())
        }
    }

    fn app(facts: Arc<FactsFn>) -> Arc<Portal> {
        Arc::new(Portal {
            backend: Arc::new(Facts(facts)),
            signin: None,
            own_port: 8511,
            user_portal_url: None,
        })
    }

    fn test_limits(listener: TcpListener) -> PortalListener {
        let inner = crate::listen::limited(
            listener,
            crate::listen::Limits {
                name: "portal test",
                total: 64,
                per_client: 64,
                idle: None,
            },
        );
        PortalListener { inner, tls: None }
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
                    sign_in_url: None,
                }
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(test_limits(listener), app(facts), async {
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
            assert_eq!(
                seen.lock().unwrap().pop(),
                Some((SocketAddr::new(client_addr.ip(), 0), portal))
            );
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
        let server = tokio::spawn(serve(test_limits(listener), app(facts), async {
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
