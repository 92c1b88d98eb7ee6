//! The agent's listeners, all bound before the kernel is touched: a busy port, an
//! address that is not local or a socket path that cannot be bound stops the start with
//! nothing attached and nothing pinned. Each has connection limits (`listen`).

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UnixListener};

use crate::{
    api,
    config::AgentConfig,
    control::Control,
    listen::{self, Limited, Limits},
    portal,
    signin::SignIn,
};

/// What `run` serves on, bound.
pub(super) struct Listeners {
    api_socket: Limited<UnixListener>,
    /// Removes the socket's file when the agent stops or fails to start.
    _socket_file: SocketFile,
    api_tcp: Option<(Limited<TcpListener>, Arc<[u8]>)>,
    metrics: Option<Limited<TcpListener>>,
    /// The portal's listener, with TLS on its own port when it has a certificate.
    portal: Option<(portal::PortalListener, u16)>,
}

impl Listeners {
    /// Binds every configured listener; `api_token` goes with `api_listen`.
    pub(super) async fn bind(
        agent: &AgentConfig,
        api_token: Option<Arc<[u8]>>,
    ) -> anyhow::Result<Self> {
        raise_open_files_limit();
        let socket = api::server::bind(&agent.api_socket).with_context(|| {
            format!(
                "cannot listen on the API socket {}",
                agent.api_socket.display()
            )
        })?;
        let socket_file = SocketFile(agent.api_socket.clone());
        let api_tcp = bind_tcp(agent.api_listen, "api_listen")
            .await?
            .map(|l| listen::limited(l, API_LISTEN_LIMITS));
        let metrics = bind_tcp(agent.metrics_listen, "metrics_listen")
            .await?
            .map(|l| listen::limited(l, METRICS_LIMITS));
        let portal = match agent.portal_listen {
            Some(addr) => {
                let listener = portal::bind_transparent(addr)
                    .with_context(|| format!("cannot listen on portal_listen {addr}"))?;
                let listener = TcpListener::from_std(listener).context("portal_listen")?;
                let tls = match &agent.portal_tls {
                    Some((cert, key)) => Some((portal::tls::acceptor(cert, key)?, addr.port())),
                    None => None,
                };
                let listener = portal::PortalListener {
                    inner: listen::limited(listener, PORTAL_LIMITS),
                    tls,
                };
                Some((listener, addr.port()))
            }
            None => None,
        };
        Ok(Self {
            api_socket: listen::limited(socket, API_SOCKET_LIMITS),
            _socket_file: socket_file,
            api_tcp: api_tcp.zip(api_token),
            metrics,
            portal,
        })
    }

    /// Starts serving everything bound, until `stopped` resolves; the portal with
    /// `signin` when identity providers are configured.
    pub(super) fn serve<F>(
        self,
        control: &Arc<Control>,
        signin: Option<Arc<SignIn>>,
        stopped: impl Fn() -> F,
    ) -> Servers
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let unix = axum::serve(
            self.api_socket,
            api::server::router(Arc::clone(control))
                .into_make_service_with_connect_info::<api::server::Caller>(),
        )
        .with_graceful_shutdown(stopped());
        let mut servers = vec![tokio::spawn(
            async move { unix.await.context("API server") },
        )];
        if let Some((listener, token)) = self.api_tcp {
            let router = api::auth::require_token(api::server::router(Arc::clone(control)), token);
            let tcp = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<api::server::Caller>(),
            )
            .with_graceful_shutdown(stopped());
            servers.push(tokio::spawn(
                async move { tcp.await.context("TCP API server") },
            ));
        }
        if let Some((listener, own_port)) = self.portal {
            let app = Arc::new(portal::Portal {
                backend: Arc::clone(control) as Arc<dyn portal::Backend>,
                user_portal_url: control.user_portal_url(),
                signin,
                own_port,
            });
            let portal = portal::serve(listener, app, stopped());
            servers.push(tokio::spawn(async move { portal.await.context("portal") }));
        }
        if let Some(listener) = self.metrics {
            let metrics = axum::serve(listener, api::metrics::router(Arc::clone(control)))
                .with_graceful_shutdown(stopped());
            servers.push(tokio::spawn(async move {
                metrics.await.context("metrics server")
            }));
        }
        Servers {
            running: servers,
            _socket_file: self._socket_file,
        }
    }
}

/// The servers running.
pub(super) struct Servers {
    running: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Kept until the agent stops.
    _socket_file: SocketFile,
}

impl Servers {
    /// Waits until every server has stopped; the first error.
    pub(super) async fn join(self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for server in self.running {
            match server.await {
                Ok(Err(e)) if result.is_ok() => result = Err(e),
                _ => {}
            }
        }
        result
    }
}

/// The API socket's file, removed when the agent stops or fails to start.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Connection limits of the listeners (`listen`). The portal is open to every device,
/// so one device may hold only a few connections, and none for long; the others are
/// for operators and monitoring. Together they stay far below the open-files limit the
/// agent raises itself to, so a flood of one never starves another.
const PORTAL_LIMITS: Limits = Limits {
    name: "portal_listen",
    total: 4096,
    per_client: 16,
    idle: Some(std::time::Duration::from_secs(10)),
};
const API_SOCKET_LIMITS: Limits = Limits {
    name: "api_socket",
    total: 256,
    per_client: 0,
    // Root's own socket: event streams stay open as long as their reader.
    idle: None,
};
const API_LISTEN_LIMITS: Limits = Limits {
    name: "api_listen",
    total: 256,
    per_client: 64,
    // Event streams send a keep-alive every 30 s.
    idle: Some(std::time::Duration::from_secs(120)),
};
const METRICS_LIMITS: Limits = Limits {
    name: "metrics_listen",
    total: 64,
    per_client: 16,
    idle: Some(std::time::Duration::from_secs(30)),
};
/// Descriptors the listeners may hold at once, and room for everything else.
const LISTENER_FDS: u64 = (PORTAL_LIMITS.total
    + API_SOCKET_LIMITS.total
    + API_LISTEN_LIMITS.total
    + METRICS_LIMITS.total) as u64;
const OTHER_FDS: u64 = 1024;

/// Raises the soft open-files limit to the hard one, and warns when even that leaves
/// the listeners' limits no room.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    if limit.rlim_cur < LISTENER_FDS + OTHER_FDS {
        tracing::warn!(
            open_files = limit.rlim_cur,
            needed = LISTENER_FDS + OTHER_FDS,
            "the open-files limit is low for the listeners' connection limits: a flood of the portal could starve the API; raise it (LimitNOFILE=)"
        );
    }
}

/// The optional TCP listener configured as `field`.
async fn bind_tcp(
    addr: Option<std::net::SocketAddr>,
    field: &str,
) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {field} {addr}"))?;
    Ok(Some(listener))
}
