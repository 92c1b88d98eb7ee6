//! The control API: HTTP/JSON on a unix socket that only root can open (mode 0600).
//!
//! | method and path          | does                                              |
//! |--------------------------|---------------------------------------------------|
//! | GET    /v1/health        | liveness, interfaces and modes                    |
//! | GET    /v1/sessions      | every session                                     |
//! | POST   /v1/sessions      | login `{ip, user, idp?, at?}`                     |
//! | GET    /v1/sessions/{ip} | a session and the policies it satisfies           |
//! | DELETE /v1/sessions/{ip} | logout                                            |
//! | POST   /v1/sessions/import | bulk import: the file as the body (`?skip_bad=true`) |
//! | GET    /v1/stats         | verdict, event and per-policy counters            |
//! | GET    /v1/events        | the latest refusals                               |
//! | GET    /v1/events/stream | refusals and prompts before expiry, one JSON object per line |
//! | GET    /v1/policies      | the compiled policy table, as `check` prints it   |
//! | POST   /v1/reload        | re-read the config file and apply it atomically   |
//! | GET    /v1/reload        | how the reloads went                              |
//!
//! The same API is served on `api_listen` (TCP) behind a bearer token (`auth`).
//! Errors are `{"error": message, "code": code}` with a 4xx/5xx status, and change
//! nothing. Every session change is logged with its caller (audit).

use std::{
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
    sync::Arc,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{
        ConnectInfo, DefaultBodyLimit, Path as UrlPath, State, connect_info::Connected,
        rejection::BytesRejection,
    },
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::IncomingStream,
};
use serde::Deserialize;
use serde_json::json;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::broadcast::error::RecvError,
};

use crate::{
    control::{Control, ControlError, ImportError},
    datapath::DatapathError,
    fleet::FleetError,
    input,
    listen::Limited,
    policy,
    sessions::{LoginRequest, SessionError},
    wire::LoginBody,
};

/// Requests are tiny; anything bigger is a mistake or an attack.
const MAX_BODY: usize = 16 * 1024;
/// Bulk imports: room for a few million sessions.
pub const MAX_IMPORT_BODY: usize = 512 * 1024 * 1024;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.message, "code": self.code })),
        )
            .into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::Session(s) => session_status(s),
            ControlError::Datapath(DatapathError::SessionsFull { .. }) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            ControlError::Datapath(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ControlError::Store(FleetError::Session(s)) => session_status(s),
            ControlError::Store(FleetError::Unreachable { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Store(FleetError::Contended { .. }) => StatusCode::CONFLICT,
        };
        let code = match &e {
            ControlError::Session(s) => s.code(),
            ControlError::Datapath(DatapathError::SessionsFull { .. }) => "sessions_full",
            ControlError::Datapath(_) => "datapath_error",
            ControlError::Store(f) => f.code(),
        };
        Self {
            status,
            code,
            message: e.to_string(),
        }
    }
}

const fn session_status(e: &SessionError) -> StatusCode {
    match e {
        SessionError::OtherUser { .. } => StatusCode::CONFLICT,
        SessionError::WrongIdp { .. } => StatusCode::FORBIDDEN,
        SessionError::NotFound { .. } => StatusCode::NOT_FOUND,
        SessionError::InFuture { .. }
        | SessionError::InvalidName { .. }
        | SessionError::NotADevice(_) => StatusCode::BAD_REQUEST,
        SessionError::JournalFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        SessionError::NotRecorded { .. } | SessionError::NotDurable { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        SessionError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A `POST /v1/sessions` body as a login request, or a 400 saying what is wrong.
pub fn login_request(body: &[u8]) -> Result<LoginRequest, ApiError> {
    let body: LoginBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid login request: {e}")))?;
    let ip = parse_ip(&body.ip)?;
    let at = body
        .at
        .as_deref()
        .map(|text| {
            OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
                ApiError::bad_request(format!(
                    "at: {text:?} is not an RFC 3339 time like 2026-11-23T09:30:00Z"
                ))
            })
        })
        .transpose()?;
    Ok(LoginRequest {
        ip,
        user: body.user,
        idp: body.idp,
        at,
        groups: body.groups,
    })
}

/// A device address from a body or a path, by `input`'s rules (IPv4-mapped read as
/// IPv4; no leading zeros; only addresses packets can come from).
fn parse_ip(text: &str) -> Result<IpAddr, ApiError> {
    input::parse_device(text).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Who is calling, for the audit log: the peer's uid and pid on the unix socket, its
/// address on TCP.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

impl Connected<IncomingStream<'_, Limited<UnixListener>>> for Caller {
    fn connect_info(stream: IncomingStream<'_, Limited<UnixListener>>) -> Self {
        match stream.io().io().peer_cred() {
            Ok(cred) => Self(match cred.pid() {
                Some(pid) => format!("unix uid={} pid={pid}", cred.uid()),
                None => format!("unix uid={}", cred.uid()),
            }),
            Err(_) => Self("unix (peer unknown)".into()),
        }
    }
}

impl Connected<IncomingStream<'_, Limited<TcpListener>>> for Caller {
    fn connect_info(stream: IncomingStream<'_, Limited<TcpListener>>) -> Self {
        Self(format!("tcp {}", stream.remote_addr()))
    }
}

/// A request body within `MAX_BODY`; anything else is a 400 that changes nothing.
fn body_within_limit(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => ApiError::bad_request(format!(
            "request body too large or unreadable (at most {MAX_BODY} bytes): {e}"
        )),
        other => ApiError::bad_request(other.to_string()),
    })
}

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/sessions", get(list_sessions).post(login))
        .route(
            "/v1/sessions/import",
            post(import_sessions).layer(DefaultBodyLimit::max(MAX_IMPORT_BODY)),
        )
        .route("/v1/sessions/{ip}", get(show_session).delete(logout))
        .route("/v1/stats", get(stats))
        .route("/v1/events", get(recent_events))
        .route("/v1/events/stream", get(stream_events))
        .route("/v1/policies", get(policies))
        .route("/v1/reload", get(reload_status).post(reload))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: "no such endpoint; see the API table in the README".into(),
            }
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(control)
}

type Shared = State<Arc<Control>>;

/// Runs a `Control` call off the async workers: it takes locks that a bulk import or
/// a reload holds for a while, and may write the journal.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn health(State(control): Shared) -> Json<serde_json::Value> {
    let active = control.active();
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "interfaces": control.interfaces(),
        "policies": active.config.policies.len(),
        "generation": active.generation,
        "store": control.store_status(),
    }))
}

async fn list_sessions(State(control): Shared) -> Response {
    Json(blocking(move || control.sessions()).await).into_response()
}

async fn login(
    State(control): Shared,
    ConnectInfo(caller): ConnectInfo<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = login_request(&body_within_limit(body)?)?;
    let ip = request.ip;
    let view = blocking(move || control.login(&request)).await.inspect_err(|e| {
        tracing::info!(target: "audit", caller = %caller.0, action = "login", device = %ip, outcome = %e, "session change refused");
    })?;
    tracing::info!(target: "audit", caller = %caller.0, action = "login", device = %view.ip, user = view.user.as_str(), idp = view.idp.as_str(), authenticated_at = %view.authenticated_at, "session changed");
    Ok(Json(view).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    #[serde(default)]
    skip_bad: bool,
}

/// `POST /v1/sessions/import[?skip_bad=true]`: the file's text as the body.
async fn import_sessions(
    State(control): Shared,
    ConnectInfo(caller): ConnectInfo<Caller>,
    query: Result<axum::extract::Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let skip_bad = query
        .map_err(|e| ApiError::bad_request(e.body_text()))?
        .skip_bad;
    let body = body.map_err(|e| {
        ApiError::bad_request(format!(
            "import body too large or unreadable (at most {MAX_IMPORT_BODY} bytes): {e}"
        ))
    })?;
    // Checked in place: a copy of a large file would double the memory it takes.
    std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request(format!("the import file is not UTF-8: {e}")))?;
    let result = tokio::task::spawn_blocking(move || {
        let text = std::str::from_utf8(&body).expect("checked above");
        control.import(text, skip_bad)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match result {
        Ok(report) => {
            tracing::info!(target: "audit", caller = %caller.0, action = "import", imported = report.imported, new_devices = report.new_devices, reset_devices = report.reset_devices, skipped_lines = report.skipped_lines, "sessions imported");
            Ok(Json(report).into_response())
        }
        Err(ImportError::Rejected {
            error_count,
            errors,
        }) => {
            tracing::info!(target: "audit", caller = %caller.0, action = "import", bad_lines = error_count, "import refused; nothing changed");
            let message = ImportError::Rejected {
                error_count,
                errors: Vec::new(),
            }
            .to_string();
            Ok((
                StatusCode::BAD_REQUEST,
                Json(json!({
                    "error": message,
                    "code": "import_rejected",
                    "error_count": error_count,
                    "errors": errors,
                })),
            )
                .into_response())
        }
        Err(ImportError::Partial { recorded, error }) => {
            tracing::info!(target: "audit", caller = %caller.0, action = "import", recorded, outcome = %error, "import stopped part-way");
            let message = format!(
                "import stopped after {recorded} device(s) were recorded in the fleet's store: {error}"
            );
            let mut api = ApiError::from(*error);
            api.message = message;
            Err(api)
        }
        Err(ImportError::Control(e)) => Err(e.into()),
    }
}

async fn show_session(
    State(control): Shared,
    UrlPath(ip): UrlPath<String>,
) -> Result<Response, ApiError> {
    let ip = parse_ip(&ip)?;
    Ok(Json(blocking(move || control.session(ip)).await?).into_response())
}

async fn logout(
    State(control): Shared,
    ConnectInfo(caller): ConnectInfo<Caller>,
    UrlPath(ip): UrlPath<String>,
) -> Result<Response, ApiError> {
    let ip = parse_ip(&ip)?;
    let view = blocking(move || control.logout(ip)).await.inspect_err(|e| {
        tracing::info!(target: "audit", caller = %caller.0, action = "logout", device = %ip, outcome = %e, "session change refused");
    })?;
    tracing::info!(target: "audit", caller = %caller.0, action = "logout", device = %ip, user = view.user.as_str(), "session changed");
    Ok(Json(view).into_response())
}

async fn stats(State(control): Shared) -> Result<Response, ApiError> {
    Ok(Json(blocking(move || control.stats()).await?).into_response())
}

async fn recent_events(State(control): Shared) -> Response {
    Json(control.recent_refusals()).into_response()
}

async fn policies(State(control): Shared) -> String {
    let active = control.active();
    policy::describe(&active.config, &active.table)
}

/// How often an event stream with nothing to say sends a blank line, so that idle
/// limits (`listen`) and proxies see it alive.
const EVENT_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// Refusals and prompts before expiry as they happen (`events::Event`), as JSON lines,
/// until the client goes away. A client too slow to keep up gets `{"lagged": n}` for
/// the `n` it missed; a blank line every `EVENT_KEEPALIVE` without events says the
/// stream is alive.
async fn stream_events(State(control): Shared) -> Response {
    let receiver = control.subscribe();
    let lines = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let next = tokio::time::timeout(EVENT_KEEPALIVE, receiver.recv()).await;
        let line = match next {
            Ok(Ok(refusal)) => serde_json::to_string(&refusal).unwrap_or_default(),
            Ok(Err(RecvError::Lagged(n))) => json!({ "lagged": n }).to_string(),
            Ok(Err(RecvError::Closed)) => return None,
            // A blank line when nothing happened: the connection is not idle.
            Err(_) => String::new(),
        };
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(line + "\n")),
            receiver,
        ))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

async fn reload(
    State(control): Shared,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Result<Response, ApiError> {
    tracing::info!(target: "audit", caller = %caller.0, action = "reload", "reload requested");
    let result = tokio::task::spawn_blocking(move || control.reload())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match result {
        Ok(done) => Ok(Json(done).into_response()),
        Err(rejected) => Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({
                "error": rejected.to_string(),
                "code": "reload_rejected",
                "problems": rejected.problems,
            })),
        )
            .into_response()),
    }
}

async fn reload_status(State(control): Shared) -> Response {
    Json(control.reload_status()).into_response()
}

/// Binds the API socket with mode 0600, replacing a stale socket file.
pub fn bind(socket: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = socket.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created with no access for group and others from the first instant.
    // SAFETY: umask has no memory-safety preconditions.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(socket);
    unsafe { libc::umask(old) };
    let listener = listener?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
