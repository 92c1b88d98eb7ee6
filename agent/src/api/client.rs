//! The CLI's side of the control API: one HTTP/1.1 request per call over the unix
//! socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, Response,
    body::{Bytes, Incoming},
};
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
        /// The whole error reply.
        body: Value,
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
        let body = body.map(|v| v.to_string()).unwrap_or_default();
        let request = self
            .request(method, path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)));
        let response = self.send(request).await?;
        self.reply_text(response).await
    }

    /// POSTs `data` in chunks, calling `sent` with the bytes sent so far, and returns the
    /// decoded JSON reply (errors as `ClientError::Api`, with the reply in `body`).
    pub async fn upload(
        &self,
        path: &str,
        data: Bytes,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Value, ClientError> {
        const CHUNK: usize = 1 << 20;
        let total = data.len();
        let chunks = futures_util::stream::iter((0..total.div_ceil(CHUNK)).map(move |i| {
            let end = ((i + 1) * CHUNK).min(total);
            sent(end as u64);
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(data.slice(i * CHUNK..end)))
        }));
        let request = self
            .request(Method::POST, path)
            .header("content-type", "text/plain")
            .header("content-length", total)
            .body(http_body_util::StreamBody::new(chunks));
        let response = self.send(request).await?;
        let text = self.reply_text(response).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Follows a streaming endpoint, calling `each` per line, until the agent ends it.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut each: impl FnMut(&str),
    ) -> Result<(), ClientError> {
        let request = self
            .request(Method::GET, path)
            .body(Full::new(Bytes::new()));
        let response = self.send(request).await?;
        if !response.status().is_success() {
            return Err(self.protocol(format!("HTTP {}", response.status())));
        }
        let mut body = response.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.protocol(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                each(String::from_utf8_lossy(&line[..end]).trim_end());
            }
        }
        Ok(())
    }

    /// A request to the agent, host header set.
    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "sessiongate")
    }

    /// Sends one request on a new connection to the socket.
    async fn send<B>(
        &self,
        request: Result<Request<B>, hyper::http::Error>,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let request = request.map_err(|e| self.protocol(e.to_string()))?;
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
        sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e.to_string()))
    }

    /// The reply's text when it succeeded; else its error, decoded.
    async fn reply_text(&self, response: Response<Incoming>) -> Result<String, ClientError> {
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
            body: error,
        })
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }
}
