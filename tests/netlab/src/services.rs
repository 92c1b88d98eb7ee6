//! The server namespace's services: TCP and UDP echo on every port the tests use, and
//! the lab's DNS zone on port 53. One dual-stack socket per port; stopped on drop.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{Netns, SERVER_ADDRESSES, TCP_PORTS, UDP_PORTS, dns};

const DNS_PORT: u16 = 53;
/// How often blocked service threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

pub(crate) struct Services {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Services {
    pub(crate) fn start(server: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for port in TCP_PORTS {
            let listener: TcpListener = server
                .run(|| dual_stack_listener(port))
                .expect("TCP listener")
                .into();
            listener.set_nonblocking(true).expect("nonblocking");
            let stop = Arc::clone(&stop);
            threads.push(server.spawn(move || serve_tcp(&listener, port, &stop)));
        }
        // UDP sockets are bound per address: a wildcard socket would answer from the
        // address of the outgoing route, not the one the client sent to.
        let mut udp = Vec::new();
        for addr in SERVER_ADDRESSES {
            for port in UDP_PORTS {
                let socket = server
                    .run(|| UdpSocket::bind(SocketAddr::new(addr, port)))
                    .unwrap_or_else(|e| panic!("bind UDP {addr}:{port}: {e}"));
                socket.set_nonblocking(true).expect("nonblocking");
                udp.push((socket, port));
            }
        }
        let udp_stop = Arc::clone(&stop);
        threads.push(server.spawn(move || serve_udp(&udp, &udp_stop)));
        Self { stop, threads }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One listener for IPv4 and IPv6 on every address.
fn dual_stack_listener(port: u16) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
    socket.listen(256)?;
    Ok(socket)
}

fn serve_tcp(listener: &TcpListener, port: u16, stop: &Arc<AtomicBool>) {
    let mut connections = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let stop = Arc::clone(stop);
                connections.push(thread::spawn(move || {
                    if port == DNS_PORT {
                        dns_connection(stream, &stop);
                    } else {
                        echo_connection(stream, &stop);
                    }
                }));
                connections.retain(|c: &JoinHandle<()>| !c.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2))
            }
            Err(_) => break,
        }
    }
    for c in connections {
        let _ = c.join();
    }
}

fn prepare(stream: &TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// What the application answers an HTTP request with (on any echo port), so tests can
/// tell it from the portal.
pub const APP_PAGE: &str = "the real application\n";

fn echo_connection(mut stream: TcpStream, stop: &AtomicBool) {
    prepare(&stream);
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if buf[..n].starts_with(b"GET ") => {
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{APP_PAGE}",
                    APP_PAGE.len()
                );
                let _ = stream.write_all(reply.as_bytes());
                break;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if would_block(&e) => {}
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// DNS over TCP: each message is prefixed by its 2-byte length.
fn dns_connection(mut stream: TcpStream, stop: &AtomicBool) {
    prepare(&stream);
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if would_block(&e) => continue,
            Err(_) => break,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let message: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            if let Some(reply) = dns::answer(&message) {
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if stream.write_all(&framed).is_err() {
                    return;
                }
            }
        }
    }
}

/// Serves every UDP socket from one thread, polling: the lab's traffic is light.
fn serve_udp(sockets: &[(UdpSocket, u16)], stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        for (socket, port) in sockets {
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                idle = false;
                let reply = if *port == DNS_PORT {
                    dns::answer(&buf[..n])
                } else {
                    Some(buf[..n].to_vec())
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, from);
                }
            }
        }
        if idle {
            thread::sleep(Duration::from_millis(1));
        }
    }
}
