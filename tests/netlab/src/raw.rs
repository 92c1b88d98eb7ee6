//! Raw frames in the client namespace: sent as a device would send them (a packet
//! generator's view), and captured on its interface (`cli0`) as the client receives
//! them.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use crate::Lab;

const ETH_P_ALL: u16 = 0x0003;

/// An AF_PACKET socket bound to an interface of the client namespace.
pub struct RawLink {
    fd: OwnedFd,
}

impl Lab {
    /// A raw socket on the client's interface, in the client namespace.
    pub fn client_link(&self) -> RawLink {
        self.client
            .run(|| RawLink::open("cli0"))
            .expect("AF_PACKET socket on cli0")
    }

    /// A send-only raw socket on `interface` in the client namespace, for a packet
    /// generator: it receives nothing (a receiving one gets a copy of every frame it
    /// sends) and skips the queueing discipline, as pktgen and trafgen do.
    pub fn client_generator(&self, interface: &str) -> RawLink {
        self.client
            .run(|| RawLink::open_sender(interface))
            .unwrap_or_else(|e| panic!("send-only AF_PACKET socket on {interface}: {e}"))
    }
}

impl RawLink {
    fn open(interface: &str) -> io::Result<Self> {
        let link = Self::bound(interface, ETH_P_ALL)?;
        // Room for every frame of a flood and its replies.
        link.set_option(libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20)?;
        Ok(link)
    }

    fn open_sender(interface: &str) -> io::Result<Self> {
        // Protocol 0: bound to the interface for sending, registered for no frames.
        let link = Self::bound(interface, 0)?;
        link.set_option(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)?;
        Ok(link)
    }

    /// An AF_PACKET socket bound to `interface`, receiving frames of `protocol`.
    fn bound(interface: &str, protocol: u16) -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol.to_be())) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd of ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(interface).expect("no NUL");
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol.to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    fn set_option(&self, level: i32, option: i32, value: i32) -> io::Result<()> {
        // SAFETY: an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                option,
                (&raw const value).cast(),
                size_of::<i32>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `frame` up to `copies` times (at most 1024) in one system call; returns
    /// how many went (a full transmit queue takes fewer, as a NIC's would).
    pub fn send_copies(&self, frame: &[u8], copies: usize) -> io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        };
        // SAFETY: all-zero is a valid mmsghdr; each then points at the one iovec.
        let mut messages: Vec<libc::mmsghdr> = (0..copies.min(1024))
            .map(|_| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &raw mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: the messages and the frame they point at live across the call; the
        // kernel only reads the frame.
        let n = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                messages.as_mut_ptr(),
                messages.len() as u32,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Every frame received (or sent) on the interface for `window`.
    pub fn capture(&self, window: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + window;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return frames;
            }
            let timeout = libc::timeval {
                tv_sec: left.as_secs() as i64,
                tv_usec: i64::from(left.subsec_micros().max(1)),
            };
            // SAFETY: a timeval of the right size.
            unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const timeout).cast(),
                    size_of::<libc::timeval>() as u32,
                );
            }
            // SAFETY: the buffer is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                frames.push(buf[..n as usize].to_vec());
            }
        }
    }
}
