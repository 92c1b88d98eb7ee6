//! HTTPS for the portal's own pages (`portal_tls_cert`, `portal_tls_key`). One
//! listener takes both the redirected application connections, which stay plain HTTP
//! (the device dialled an `http://` application), and connections to the portal's own
//! port, which are TLS when it is configured. The handshake runs inside the
//! connection's own task, on its first read or write, so a slow client never holds up
//! the others; the listener's idle limit applies to it as to any read.

use std::{
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use axum::serve::Listener;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{Accept, TlsAcceptor, server::TlsStream};

use crate::listen::{Limited, Tracked};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("portal_tls_cert {}: {cause}", path.display())]
    Certificate {
        path: std::path::PathBuf,
        cause: String,
    },
    #[error("portal_tls_key {}: {cause}", path.display())]
    Key {
        path: std::path::PathBuf,
        cause: String,
    },
    #[error("portal_tls_cert and portal_tls_key do not go together: {0}")]
    Mismatch(String),
}

/// The portal's TLS settings from its PEM files: the certificate chain, then the key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.to_path_buf(),
            cause: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.to_path_buf(),
            cause: "no certificate in the file".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        cause: e.to_string(),
    })?;
    // ring, as everywhere in the agent (aws-lc-rs would add a C and CMake build).
    // rustls 0.23.48, which the fuzz workspace's lock file already has, deprecates
    // ring's provider for lacking post-quantum key exchange.
    #[allow(
        deprecated,
        reason = "ring is the agent's one TLS backend; deprecated from rustls 0.23.48 on"
    )]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The portal's listener: TLS on `own_port` when an acceptor is given.
pub struct PortalListener {
    pub inner: Limited<TcpListener>,
    pub tls: Option<(TlsAcceptor, u16)>,
}

impl Listener for PortalListener {
    type Io = PortalStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, peer) = self.inner.accept().await;
        // getsockname fails only on a dead socket, whose request never comes.
        let local = io
            .io()
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let state = match &self.tls {
            Some((acceptor, port)) if local.port() == *port => {
                State::Handshake(Box::new(acceptor.accept(io)))
            }
            _ => State::Plain(io),
        };
        (PortalStream { state, local }, peer)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted portal connection, plain or TLS.
pub struct PortalStream {
    state: State,
    /// The address the device dialled (the application's, when redirected).
    pub local: SocketAddr,
}

enum State {
    Plain(Tracked<TcpStream>),
    Handshake(Box<Accept<Tracked<TcpStream>>>),
    Tls(Box<TlsStream<Tracked<TcpStream>>>),
    Failed,
}

impl PortalStream {
    /// Drives the TLS handshake, if one is under way, to its end.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let State::Handshake(accept) = &mut self.state {
            match ready!(Pin::new(accept.as_mut()).poll(cx)) {
                Ok(tls) => self.state = State::Tls(Box::new(tls)),
                Err(e) => {
                    self.state = State::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        match self.state {
            State::Failed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Runs `$call` on the connection underneath, plain or TLS, once it is ready.
macro_rules! on_stream {
    ($self:ident, $cx:ident, |$s:ident| $call:expr) => {{
        let this = $self.get_mut();
        ready!(this.poll_ready($cx))?;
        match &mut this.state {
            State::Plain($s) => $call,
            State::Tls($s) => $call,
            State::Handshake(_) | State::Failed => unreachable!("ready above"),
        }
    }};
}

impl AsyncRead for PortalStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_stream!(self, cx, |s| Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for PortalStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, cx, |s| Pin::new(s).poll_write(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, cx, |s| Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, cx, |s| Pin::new(s).poll_shutdown(cx))
    }
}
