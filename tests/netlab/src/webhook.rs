//! A webhook receiver for re-authentication prompts, inside the gateway namespace.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    thread,
    time::Instant,
};

use crate::Lab;

/// Every POST body the receiver got, with when it arrived.
pub type Prompts = Arc<Mutex<Vec<(Instant, String)>>>;

impl Lab {
    /// A webhook receiver inside the gateway namespace: every POST body it got.
    pub fn webhook(&self, port: u16) -> Prompts {
        let listener = self
            .gateway
            .run(move || TcpListener::bind(("127.0.0.1", port)))
            .expect("bind receiver");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let sink = Arc::clone(&sink);
                thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    let mut length = 0usize;
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        line.clear();
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_ok() {
                        sink.lock()
                            .unwrap()
                            .push((Instant::now(), String::from_utf8_lossy(&body).into_owned()));
                    }
                    let _ = reader.get_mut().write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                });
            }
        });
        got
    }
}
