//! The TCP API's bearer token: read from a file at start, required on every request,
//! compared in constant time so that response timing reveals nothing about it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Router,
    extract::Request,
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq;
use thiserror::Error;

use super::server::ApiError;
use crate::{
    input::file::{self, FileError, SecretError},
    listen::LogThrottle,
};

/// Shortest token accepted: anything shorter is guessable.
const MIN_TOKEN_LEN: usize = 16;
/// A token file holds one word; 4 KiB is generous.
const MAX_TOKEN_FILE: u64 = 4096;

/// Why the token file cannot be used.
#[derive(Debug, Error)]
pub enum TokenError {
    #[error("api_token_file {}: {cause}", path.display())]
    Unreadable { path: PathBuf, cause: FileError },
    #[error("api_token_file {} is readable by group or others (mode {mode:o}); chmod 600 it", path.display())]
    Exposed { path: PathBuf, mode: u32 },
    #[error("api_token_file {}: not UTF-8 text", path.display())]
    NotText { path: PathBuf },
    #[error("api_token_file {}: the token must be one word of at least {MIN_TOKEN_LEN} characters (for example `openssl rand -hex 32`)", path.display())]
    Weak { path: PathBuf },
}

/// Reads the token: the file's content without surrounding whitespace. The file must
/// not be readable by group or others.
pub fn read_token(path: &Path) -> Result<Arc<[u8]>, TokenError> {
    let path_buf = || path.to_path_buf();
    let token = file::read_secret(path, MAX_TOKEN_FILE).map_err(|e| match e {
        SecretError::Unreadable(cause) => TokenError::Unreadable {
            path: path_buf(),
            cause,
        },
        SecretError::Exposed { mode } => TokenError::Exposed {
            path: path_buf(),
            mode,
        },
        SecretError::NotText => TokenError::NotText { path: path_buf() },
    })?;
    if token.len() < MIN_TOKEN_LEN || token.contains(char::is_whitespace) {
        return Err(TokenError::Weak { path: path_buf() });
    }
    Ok(token.as_bytes().into())
}

/// `router`, answering 401 to any request without `Authorization: Bearer <token>`
/// before it reaches a handler.
pub fn require_token(router: Router, token: Arc<[u8]>) -> Router {
    // A scanner or a misconfigured client must not flood the log.
    let refusals = Arc::new(LogThrottle::default());
    router.layer(middleware::from_fn(move |request: Request, next: Next| {
        let token = Arc::clone(&token);
        let refusals = Arc::clone(&refusals);
        async move {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
            let ok = presented.is_some_and(|p| bool::from(p.ct_eq(&token)));
            if ok {
                next.run(request).await
            } else {
                if let Some(refused) = refusals.hit() {
                    tracing::warn!(
                        path = request.uri().path(),
                        refused,
                        "API requests without a valid bearer token refused (logged at most every 10 s)"
                    );
                }
                unauthorized()
            }
        }
    }))
}

fn unauthorized() -> Response {
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this endpoint needs `Authorization: Bearer <token>` with the token in the agent's api_token_file",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_token_file_is_a_small_private_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&*read_token(&path).unwrap(), b"0123456789abcdef0123");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(format!("{:#}", read_token(&path).unwrap_err()).contains("chmod 600"));
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        for (path, needle) in [
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/zero"), "character device"),
        ] {
            let e = format!("{:#}", read_token(path).unwrap_err());
            assert!(
                e.starts_with(&format!("api_token_file {}: it is a", path.display()))
                    && e.contains(needle),
                "{e}"
            );
        }
        std::fs::write(&path, "x".repeat(5000)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(format!("{:#}", read_token(&path).unwrap_err()).contains("larger than 4096"));
    }
}
