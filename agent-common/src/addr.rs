//! Addresses as the maps store them: the bytes in network order, held in machine
//! words. The memory image is exactly the address bytes (on little-endian hosts, as
//! BPF and x86 are), but the word types give copies and compares in one or two
//! instructions where byte arrays cost one per byte in BPF code.

use bytemuck::{Pod, Zeroable};

/// An IPv4 address.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Ip4(pub u32);

/// An IPv6 address.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Ip6(pub [u64; 2]);

impl Ip4 {
    pub const fn from_octets(o: [u8; 4]) -> Self {
        Self(u32::from_le_bytes(o))
    }

    pub const fn octets(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }

    /// The address as one word, for hashing.
    #[inline(always)]
    pub const fn fold(self) -> u64 {
        self.0 as u64
    }

    /// The 16-byte form events carry: the address, then zeros.
    #[inline(always)]
    pub const fn wide(self) -> Ip6 {
        Ip6([self.0 as u64, 0])
    }
}

impl Ip6 {
    pub const fn from_octets(o: [u8; 16]) -> Self {
        Self([
            u64::from_le_bytes([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]),
            u64::from_le_bytes([o[8], o[9], o[10], o[11], o[12], o[13], o[14], o[15]]),
        ])
    }

    pub const fn octets(self) -> [u8; 16] {
        let a = self.0[0].to_le_bytes();
        let b = self.0[1].to_le_bytes();
        [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5],
            b[6], b[7],
        ]
    }

    /// The memory image as four 32-bit words (`bpf_sock_tuple`'s form).
    #[inline(always)]
    pub const fn as_words(self) -> [u32; 4] {
        [
            self.0[0] as u32,
            (self.0[0] >> 32) as u32,
            self.0[1] as u32,
            (self.0[1] >> 32) as u32,
        ]
    }

    /// The address as one word, for hashing.
    #[inline(always)]
    pub const fn fold(self) -> u64 {
        self.0[0] ^ self.0[1].rotate_left(29)
    }
}

#[cfg(feature = "user")]
mod user {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::{Ip4, Ip6};

    impl From<Ipv4Addr> for Ip4 {
        fn from(a: Ipv4Addr) -> Self {
            Self::from_octets(a.octets())
        }
    }

    impl From<Ip4> for Ipv4Addr {
        fn from(a: Ip4) -> Self {
            Self::from(a.octets())
        }
    }

    impl From<Ipv6Addr> for Ip6 {
        fn from(a: Ipv6Addr) -> Self {
            Self::from_octets(a.octets())
        }
    }

    impl From<Ip6> for Ipv6Addr {
        fn from(a: Ip6) -> Self {
            Self::from(a.octets())
        }
    }

    // SAFETY: plain words, no padding.
    unsafe impl aya::Pod for Ip4 {}
    unsafe impl aya::Pod for Ip6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_image_is_the_address_bytes() {
        let v4 = [198, 18, 0, 7];
        assert_eq!(bytemuck::bytes_of(&Ip4::from_octets(v4)), &v4);
        assert_eq!(Ip4::from_octets(v4).octets(), v4);
        let v6 = [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        assert_eq!(bytemuck::bytes_of(&Ip6::from_octets(v6)), &v6);
        assert_eq!(Ip6::from_octets(v6).octets(), v6);
        assert_eq!(&bytemuck::bytes_of(&Ip4::from_octets(v4).wide())[..4], &v4);
    }
}
