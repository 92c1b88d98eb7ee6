//! The Internet checksum (RFC 1071) of headers the XDP program writes. Words are added
//! as they lie in memory (native loads of network-order bytes): a ones' complement sum
//! is the same in either byte order, so the result is stored back natively with no
//! swapping.

/// A running ones' complement sum.
#[derive(Clone, Copy, Debug, Default)]
pub struct Checksum(u64);

impl Checksum {
    pub const fn new() -> Self {
        Self(0)
    }

    /// Adds a 16-bit word as loaded from memory.
    #[inline(always)]
    pub const fn add16(self, word: u16) -> Self {
        Self(self.0 + word as u64)
    }

    /// Adds two 16-bit words, as one native 32-bit load from memory.
    #[inline(always)]
    pub const fn add32(self, words: u32) -> Self {
        Self(self.0 + (words & 0xffff) as u64 + (words >> 16) as u64)
    }

    /// Adds four 16-bit words, as one native 64-bit load from memory.
    #[inline(always)]
    pub const fn add64(self, words: u64) -> Self {
        self.add32(words as u32).add32((words >> 32) as u32)
    }

    /// The checksum field's value, to store natively.
    #[inline(always)]
    pub const fn finish(self) -> u16 {
        let mut sum = self.0;
        sum = (sum & 0xffff_ffff) + (sum >> 32);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

/// A 16-bit big-endian value as a native load of its bytes reads it.
#[inline(always)]
pub const fn be16(value: u16) -> u16 {
    value.to_be()
}

/// A 32-bit big-endian value as a native load of its bytes reads it.
#[inline(always)]
pub const fn be32(value: u32) -> u32 {
    value.to_be()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 over bytes, as the receiving kernel checks it.
    fn reference(bytes: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in bytes.chunks(2) {
            let hi = pair[0] as u32;
            let lo = *pair.get(1).unwrap_or(&0) as u32;
            sum += (hi << 8) | lo;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn native_word_sums_equal_the_byte_wise_checksum() {
        // An IPv4 header (the RFC 1071 example's style) with its checksum zeroed.
        let header: [u8; 20] = [
            0x45, 0, 0, 0x28, 0, 0, 0x40, 0, 0x40, 6, 0, 0, 198, 19, 10, 10, 198, 18, 0, 7,
        ];
        let mut sum = Checksum::new();
        for w in header.chunks(4) {
            sum = sum.add32(u32::from_ne_bytes(w.try_into().unwrap()));
        }
        let stored = sum.finish();
        let mut with = header;
        with[10..12].copy_from_slice(&stored.to_ne_bytes());
        assert_eq!(u16::from_be_bytes([with[10], with[11]]), reference(&header));
        // A correct header sums to zero.
        assert_eq!(reference(&with), 0);

        // Mixed widths over pseudo-random bytes.
        let bytes: Vec<u8> = (0u32..64).map(|i| (i * 97 + 13) as u8).collect();
        let mut sum = Checksum::new();
        for w in bytes[..32].chunks(8) {
            sum = sum.add64(u64::from_ne_bytes(w.try_into().unwrap()));
        }
        for w in bytes[32..].chunks(2) {
            sum = sum.add16(u16::from_ne_bytes(w.try_into().unwrap()));
        }
        assert_eq!(
            u16::from_be_bytes(sum.finish().to_ne_bytes()),
            reference(&bytes)
        );
        assert_eq!(Checksum::new().add16(be16(0x1234)).finish(), be16(!0x1234));
        assert_eq!(be32(1).to_ne_bytes(), [0, 0, 0, 1]);
    }
}
