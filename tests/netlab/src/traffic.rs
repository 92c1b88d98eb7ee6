//! Traffic from the client side: TCP connections and UDP flows from a chosen device
//! address, echo exchanges, and DNS lookups through the gateway.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{Lab, SHOULD_FAIL, SHOULD_PASS, dns};

impl Lab {
    /// Opens a TCP connection from device address `src` (in the client namespace).
    pub fn tcp_connect(
        &self,
        src: IpAddr,
        dst: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        self.client.run(|| {
            let to = SocketAddr::new(dst, port);
            let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            socket.connect_timeout(&to.into(), timeout)?;
            let stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(SHOULD_PASS))?;
            Ok(stream)
        })
    }

    /// Whether a new TCP connection from `src` to `dst:port` opens and echoes.
    pub fn tcp_works(&self, src: IpAddr, dst: IpAddr, port: u16) -> bool {
        match self.tcp_connect(src, dst, port, SHOULD_PASS) {
            Ok(mut stream) => echo_tcp(&mut stream, b"hello").is_ok(),
            Err(_) => false,
        }
    }

    /// Whether a new TCP connection from `src` goes unanswered (its SYN was dropped).
    pub fn tcp_blocked(&self, src: IpAddr, dst: IpAddr, port: u16) -> bool {
        match self.tcp_connect(src, dst, port, SHOULD_FAIL) {
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::TimedOut,
        }
    }

    /// A UDP socket bound to device address `src` (a new source port: a new flow).
    pub fn udp_socket(&self, src: IpAddr) -> UdpSocket {
        self.client
            .run(|| UdpSocket::bind(SocketAddr::new(src, 0)))
            .expect("bind UDP socket")
    }

    /// Resolves `name` (A, or AAAA with `ipv6`) at `server` over UDP from `src`.
    pub fn resolve_udp(
        &self,
        src: IpAddr,
        server: IpAddr,
        name: &str,
        ipv6: bool,
    ) -> io::Result<Vec<IpAddr>> {
        let socket = self.udp_socket(src);
        socket.set_read_timeout(Some(SHOULD_FAIL))?;
        let id = 0x5347;
        socket.send_to(&dns::query(id, name, ipv6), SocketAddr::new(server, 53))?;
        let mut buf = [0u8; 1500];
        let (n, _) = socket.recv_from(&mut buf)?;
        dns::addresses(&buf[..n], id).ok_or_else(|| io::Error::other("not a reply to our query"))
    }

    /// Resolves `name` at `server` over TCP from `src`.
    pub fn resolve_tcp(
        &self,
        src: IpAddr,
        server: IpAddr,
        name: &str,
        ipv6: bool,
    ) -> io::Result<Vec<IpAddr>> {
        let mut stream = self.tcp_connect(src, server, 53, SHOULD_FAIL)?;
        let id = 0x5348;
        let query = dns::query(id, name, ipv6);
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&query);
        stream.write_all(&framed)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply)?;
        dns::addresses(&reply, id).ok_or_else(|| io::Error::other("not a reply to our query"))
    }
}

/// Sends `msg` and reads the echo back.
pub fn echo_tcp(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    stream.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf)?;
    if buf != msg {
        return Err(io::Error::other("echo differs"));
    }
    Ok(())
}

/// Sends one datagram to `dst:port` and waits up to `timeout` for its echo.
pub fn echo_udp(
    socket: &UdpSocket,
    dst: IpAddr,
    port: u16,
    msg: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    socket.send_to(msg, SocketAddr::new(dst, port))?;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        let (n, from) = socket.recv_from(&mut buf)?;
        if from == SocketAddr::new(dst, port) && &buf[..n] == msg {
            return Ok(());
        }
    }
}

/// Whether a UDP exchange gets its echo. Tries a few times, since the very first
/// datagram of a lab may wait on neighbour discovery.
pub fn udp_works(socket: &UdpSocket, dst: IpAddr, port: u16) -> bool {
    (0..3).any(|_| echo_udp(socket, dst, port, b"ping", Duration::from_millis(700)).is_ok())
}
