//! The CLI's side of the control API: one HTTP/1.1 request per call over the unix
//! socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {socket}: {source}; is `sessiongate run` running, and is this the socket in its config?"
    )]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("talking to the agent at {socket}: {message}")]
    Protocol { socket: PathBuf, message: String },
}

pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let text = self.call_text(method, path, body).await?;
        serde_json::from_str(&text).map_err(|e| self.protocol(format!("invalid JSON reply: {e}")))
    }

    /// A request whose reply is plain text (`/v1/policies`) or JSON; errors are decoded.
    pub async fn call_text(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<String, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        tokio::spawn(connection);
        let body = body.map(|v| v.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "sessiongate")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e.to_string()))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if status.is_success() {
            return Ok(text);
        }
        let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Err(ClientError::Api {
            status: status.as_u16(),
            code: error["code"].as_str().unwrap_or("error").to_string(),
            message: error["error"]
                .as_str()
                .map_or_else(|| format!("HTTP {status}: {text}"), str::to_string),
        })
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }
}
