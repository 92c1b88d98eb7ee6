//! The control API: HTTP/JSON on a unix socket that only root can open (mode 0600).
//!
//! | method and path          | does                                              |
//! |--------------------------|---------------------------------------------------|
//! | GET    /v1/health        | liveness, interfaces and modes                    |
//! | GET    /v1/sessions      | every session                                     |
//! | POST   /v1/sessions      | login `{ip, user, idp?, at?}`                     |
//! | GET    /v1/sessions/{ip} | a session and the policies it satisfies           |
//! | DELETE /v1/sessions/{ip} | logout                                            |
//! | GET    /v1/stats         | verdict, event and per-policy counters            |
//! | GET    /v1/events        | the latest refusals                               |
//! | GET    /v1/policies      | the compiled policy table, as `check` prints it   |
//!
//! Errors are `{"error": message, "code": code}` with a 4xx/5xx status, and change
//! nothing.

use std::{
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
    sync::Arc,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path as UrlPath, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::json;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    control::{Control, ControlError},
    datapath::DatapathError,
    policy,
    sessions::{LoginRequest, SessionError},
};

/// Requests are tiny; anything bigger is a mistake or an attack.
const MAX_BODY: usize = 16 * 1024;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
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
            ControlError::Session(s) => match s {
                SessionError::OtherUser { .. } => StatusCode::CONFLICT,
                SessionError::WrongIdp { .. } => StatusCode::FORBIDDEN,
                SessionError::NotFound { .. } => StatusCode::NOT_FOUND,
                SessionError::InFuture { .. } | SessionError::InvalidName { .. } => {
                    StatusCode::BAD_REQUEST
                }
                SessionError::Io { .. } | SessionError::Corrupt { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            ControlError::Datapath(DatapathError::SessionsFull { .. }) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            ControlError::Datapath(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = match &e {
            ControlError::Session(s) => s.code(),
            ControlError::Datapath(DatapathError::SessionsFull { .. }) => "sessions_full",
            ControlError::Datapath(_) => "datapath_error",
        };
        Self {
            status,
            code,
            message: e.to_string(),
        }
    }
}

/// Body of `POST /v1/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    ip: String,
    user: String,
    idp: Option<String>,
    /// RFC 3339; absent means now.
    at: Option<String>,
}

fn parse_ip(text: &str) -> Result<IpAddr, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not an IP address")))
}

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/sessions", get(list_sessions).post(login))
        .route("/v1/sessions/{ip}", get(show_session).delete(logout))
        .route("/v1/stats", get(stats))
        .route("/v1/events", get(recent_events))
        .route("/v1/policies", get(policies))
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

async fn health(State(control): Shared) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "interfaces": control.interfaces,
        "policies": control.config.policies.len(),
    }))
}

async fn list_sessions(State(control): Shared) -> Response {
    Json(control.sessions()).into_response()
}

async fn login(State(control): Shared, body: Bytes) -> Result<Response, ApiError> {
    let body: LoginBody = serde_json::from_slice(&body)
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
    let request = LoginRequest {
        ip,
        user: body.user,
        idp: body.idp,
        at,
    };
    let view = control.login(&request)?;
    Ok(Json(view).into_response())
}

async fn show_session(
    State(control): Shared,
    UrlPath(ip): UrlPath<String>,
) -> Result<Response, ApiError> {
    let ip = parse_ip(&ip)?;
    Ok(Json(control.session(ip)?).into_response())
}

async fn logout(
    State(control): Shared,
    UrlPath(ip): UrlPath<String>,
) -> Result<Response, ApiError> {
    let ip = parse_ip(&ip)?;
    Ok(Json(control.logout(ip)?).into_response())
}

async fn stats(State(control): Shared) -> Result<Response, ApiError> {
    Ok(Json(control.stats()?).into_response())
}

async fn recent_events(State(control): Shared) -> Response {
    Json(control.recent_refusals()).into_response()
}

async fn policies(State(control): Shared) -> String {
    policy::describe(&control.config, &control.table)
}

/// Binds the API socket with mode 0600, replacing a stale socket file.
pub fn bind(socket: &Path) -> std::io::Result<tokio::net::UnixListener> {
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
    let listener = tokio::net::UnixListener::bind(socket);
    unsafe { libc::umask(old) };
    let listener = listener?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
