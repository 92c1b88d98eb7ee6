//! Hashing for the program's array-backed tables (session table, destination cache,
//! flow table, event limiter). The kernel and the agent must place and check entries
//! identically, so both use these functions. They are cheap on purpose: a BPF hash
//! map lookup costs about 24 ns on the machines we measure, a multiply and an array
//! lookup about 2.
//!
//! Every table entry carries a check word derived from all of its fields with a
//! second, independent mix. Writers (the agent, or another CPU) may be caught half-way
//! through a write; a reader that sees a check that does not match treats the entry as
//! absent and falls back to the hash map or the slow path.

/// Fibonacci hashing's multiplier: spreads consecutive addresses across buckets.
const K1: u64 = 0x9E37_79B9_7F4A_7C15;
/// A second odd multiplier for check words, unrelated to the first.
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// The bucket (or slot) index of a folded key in a table of `mask + 1` entries.
#[inline(always)]
pub const fn bucket(folded: u64, mask: u32) -> u32 {
    // The product's bits 32 and up depend only on the key's bits below them, and the
    // folds put ports and policies in the top bits: fold the high half in first.
    let x = folded ^ (folded >> 32);
    ((x.wrapping_mul(K1) >> 32) as u32) & mask
}

/// The check word of an entry: a mix of its folded key and its other fields.
#[inline(always)]
pub const fn check(folded: u64, fields: u64) -> u64 {
    let x = (folded ^ fields.rotate_left(17)).wrapping_mul(K2);
    // Never zero: a zeroed (empty) entry must not pass its check.
    (x ^ (x >> 31)) | 1
}

/// A flow's 5-tuple as one word: addresses, ports and protocol.
#[inline(always)]
pub const fn fold_flow(saddr: u64, daddr: u64, sport: u16, dport: u16, proto: u8) -> u64 {
    saddr
        ^ daddr.rotate_left(21)
        ^ ((sport as u64) << 16 | dport as u64 | (proto as u64) << 40).rotate_left(42)
}

/// A (destination, port, protocol) triple for the destination cache.
#[inline(always)]
pub const fn fold_dest(daddr: u64, dport: u16, proto: u8) -> u64 {
    daddr ^ ((dport as u64) << 8 | proto as u64).rotate_left(37)
}

/// A (device, policy, family) triple for the event limiter.
#[inline(always)]
pub const fn fold_event(device: u64, policy: u32, family: u8) -> u64 {
    device ^ ((policy as u64) << 8 | family as u64).rotate_left(47)
}

/// The number of buckets for `capacity` entries spread over `ways`-entry buckets at
/// most half full: a power of two, so a mask selects them.
pub const fn buckets_for(capacity: u32, ways: u32) -> u32 {
    let wanted = (capacity as u64 * 2).div_ceil(ways as u64);
    let mut n: u64 = 1;
    while n < wanted {
        n <<= 1;
    }
    if n > 1 << 31 { 1 << 31 } else { n as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_addresses_spread_over_buckets() {
        let mask = (1 << 10) - 1;
        let mut counts = [0u32; 1 << 10];
        for i in 0..(1u32 << 12) {
            let addr = crate::addr::Ip4::from_octets((0xc612_0000u32 + i).to_be_bytes());
            counts[bucket(addr.fold(), mask) as usize] += 1;
        }
        // 4096 keys over 1024 buckets: Fibonacci hashing spreads a run evenly.
        assert!(
            counts.iter().all(|&c| c <= 8),
            "max {:?}",
            counts.iter().max()
        );
    }

    #[test]
    fn ports_and_policies_in_the_top_bits_choose_buckets_too() {
        // One device's flows to one server from consecutive source ports, and its
        // refusals by different policies: keys that differ only in their top bits.
        let (device, server) = (0x0d01_12c6, 0x050a_13c6);
        let mut flows: [u32; 16] = core::array::from_fn(|i| {
            bucket(fold_flow(device, server, 40000 + i as u16, 443, 17), 511)
        });
        flows.sort_unstable();
        let mut distinct = flows.to_vec();
        distinct.dedup();
        assert!(distinct.len() >= 12, "16 flows in buckets {flows:?}");
        let mut slots: [u32; 16] =
            core::array::from_fn(|p| bucket(fold_event(device, p as u32, 4), 0xffff));
        slots.sort_unstable();
        assert!(
            slots.windows(2).all(|w| w[0] != w[1]),
            "event slots {slots:?}"
        );
    }

    #[test]
    fn checks_are_never_zero_and_cover_every_field() {
        let a =
            crate::addr::Ip6::from_octets([0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7])
                .fold();
        assert_ne!(check(0, 0), 0);
        assert_ne!(check(a, 5), check(a, 6));
        assert_ne!(check(a, 5), check(a ^ 1, 5));
        assert_ne!(fold_flow(1, 2, 3, 4, 6), fold_flow(1, 2, 4, 3, 6));
        assert_ne!(fold_flow(1, 2, 3, 4, 6), fold_flow(1, 2, 3, 4, 17));
        assert_ne!(fold_dest(a, 443, 6), fold_dest(a, 443, 17));
        assert_ne!(fold_event(a, 1, 6), fold_event(a, 2, 6));
    }

    #[test]
    fn bucket_counts_are_powers_of_two_at_most_half_full() {
        assert_eq!(buckets_for(1_000_000, 4), 1 << 19);
        assert_eq!(buckets_for(4, 4), 2);
        assert_eq!(buckets_for(1, 1), 2);
        assert!(buckets_for(u32::MAX, 1).is_power_of_two());
    }
}
