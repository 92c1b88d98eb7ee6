//! The TC ingress program `sessiongate_portal`, attached next to the XDP program when
//! a portal is configured. It delivers the SYNs the XDP program handed over
//! (`SG_PORTAL_HANDOFF`) to the portal's listening socket (`bpf_sk_assign`), and keeps the
//! later packets of those connections on the local host: a TCP segment to a redirect
//! port whose 4-tuple is a local connection. Both get `PORTAL_MARK`, which policy
//! routing delivers locally although they are addressed to the application. The
//! connection's local address stays the application's, so the client needs no change
//! and the portal sees its real address. Everything else is left to the next program.

use agent_common::{
    logic::is_new_tcp_flow,
    maps::{IPPROTO_TCP, PORTAL_HANDOFF_TTL_NS, PORTAL_MARK, PortalHandoff, Settings, config_set},
    verdict::counter,
};
use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_sock, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{
        bpf_ktime_get_boot_ns, bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::classifier,
    programs::TcContext,
};

use crate::{
    maps::{SG_GENERATION, SG_PORTAL_HANDOFF, SG_SETTINGS},
    packet::{load_u8, load_u16_be, load_u32},
    parse::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPV4_MIN_HLEN, IPV6_HLEN, TCP_MIN_HLEN},
    report::count,
};

// `enum sk_state` values as `bpf_sock.state` reports them.
const TCP_TIME_WAIT: u32 = 6;
const TCP_LISTEN: u32 = 10;

/// A TCP segment's addresses and ports, as `bpf_sock_tuple` wants them (network order).
struct Segment {
    tuple: bpf_sock_tuple,
    /// The TCP header's first word as it is in the packet (both ports).
    ports: u32,
    /// Host order.
    dport: u16,
    /// A bare SYN.
    opens: bool,
    ipv6: bool,
}

#[classifier]
pub fn sessiongate_portal(ctx: TcContext) -> i32 {
    // SAFETY: an all-zero segment is valid.
    let mut s: Segment = unsafe { core::mem::zeroed() };
    if !segment(ctx.data(), ctx.data_end(), &mut s) {
        return TC_ACT_UNSPEC;
    }
    // Every bare SYN is looked up, whatever its port: one handed over just before a
    // reload changed the redirect ports must still not reach the application.
    if s.opens {
        return if handed_over(&s) {
            deliver(&ctx, &mut s)
        } else {
            TC_ACT_UNSPEC
        };
    }
    if redirect_port(s.dport) {
        follow(&ctx, &mut s)
    } else {
        TC_ACT_UNSPEC
    }
}

/// Whether the XDP program handed this SYN over (recently); consumes the hand-over.
#[inline(never)]
fn handed_over(s: &Segment) -> bool {
    let mut key = PortalHandoff {
        ports: s.ports,
        ..PortalHandoff::default()
    };
    // SAFETY: reading the union member `segment` filled in.
    unsafe {
        if s.ipv6 {
            let a = &s.tuple.__bindgen_anon_1.ipv6;
            key.family = 6;
            key.src = a.saddr;
            key.dst = a.daddr;
        } else {
            let a = &s.tuple.__bindgen_anon_1.ipv4;
            key.family = 4;
            key.src[0] = a.saddr;
            key.dst[0] = a.daddr;
        }
    }
    // SAFETY: the value is copied out before the entry is removed.
    let Some(at) = (unsafe { SG_PORTAL_HANDOFF.get(key) }).copied() else {
        return false;
    };
    let _ = SG_PORTAL_HANDOFF.remove(key);
    // SAFETY: a helper without pointer arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    now.wrapping_sub(at) <= PORTAL_HANDOFF_TTL_NS
}

fn unavailable() -> i32 {
    // Fail closed: a handed-over SYN never reaches the application.
    count(counter::PORTAL_UNAVAILABLE);
    TC_ACT_SHOT
}

#[inline(always)]
fn settings() -> Option<&'static Settings> {
    let generation = SG_GENERATION.get(0)?;
    SG_SETTINGS.get(config_set(*generation))
}

#[inline(always)]
fn redirect_port(port: u16) -> bool {
    settings().is_some_and(|s| s.is_redirect_port(port))
}

/// Delivers a handed-over SYN to the portal's listener.
#[inline(never)]
fn deliver(ctx: &TcContext, s: &mut Segment) -> i32 {
    let Some(settings) = settings() else {
        return unavailable();
    };
    // The listener is found by its own address and port; the client's side of the
    // tuple only matters for established sockets, which a listener lookup skips.
    if s.ipv6 {
        s.tuple.__bindgen_anon_1.ipv6.daddr = settings.portal_v6.as_words();
        s.tuple.__bindgen_anon_1.ipv6.dport = settings.portal_port.to_be();
    } else {
        s.tuple.__bindgen_anon_1.ipv4.daddr = settings.portal_v4.0;
        s.tuple.__bindgen_anon_1.ipv4.dport = settings.portal_port.to_be();
    }
    // SAFETY: a valid tuple of `tuple_len` bytes; the socket is released below.
    let sk = unsafe { lookup(bpf_sk_lookup_tcp, ctx, s) };
    if sk.is_null() {
        return unavailable();
    }
    // SAFETY: a referenced socket from the lookup, released once.
    let assigned = unsafe {
        let ok = (*sk).state == TCP_LISTEN && bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0) == 0;
        bpf_sk_release(sk.cast());
        ok
    };
    if !assigned {
        return unavailable();
    }
    ctx.set_mark(PORTAL_MARK);
    count(counter::PORTAL_DELIVERED);
    TC_ACT_OK
}

/// Keeps a later segment of a portal connection on the local host.
#[inline(never)]
fn follow(ctx: &TcContext, s: &mut Segment) -> i32 {
    // SAFETY: as in `deliver`.
    let sk = unsafe { lookup(bpf_skc_lookup_tcp, ctx, s) };
    if sk.is_null() {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: as in `deliver`.
    let state = unsafe {
        let state = (*sk).state;
        bpf_sk_release(sk.cast());
        state
    };
    // A listener matches any address (a local server on this port is not a portal
    // connection); a connection in TIME_WAIT is over, and its tuple may be reused by
    // a new connection to the real application.
    if state == TCP_LISTEN || state == TCP_TIME_WAIT {
        return TC_ACT_UNSPEC;
    }
    ctx.set_mark(PORTAL_MARK);
    count(counter::PORTAL_FOLLOWED);
    TC_ACT_OK
}

type Lookup =
    unsafe fn(*mut core::ffi::c_void, *mut bpf_sock_tuple, u32, u64, u64) -> *mut bpf_sock;

/// # Safety
/// The result must be released.
#[inline(always)]
unsafe fn lookup(helper: Lookup, ctx: &TcContext, s: &mut Segment) -> *mut bpf_sock {
    // The tuple's size says its family; a constant, as the verifier wants.
    let len = if s.ipv6 {
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } else {
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    };
    // SAFETY: the tuple is valid for `len` bytes; by the caller for the rest.
    unsafe {
        helper(
            ctx.skb.skb.cast(),
            &mut s.tuple,
            len as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    }
}

/// Reads the packet's TCP segment into `s`: untagged Ethernet, IPv4 (not a later
/// fragment) or IPv6 with TCP right after its fixed header. False for anything else.
// Out of line, writing through a pointer: returned by value, the compiler mixed the
// result's discriminant into a packet pointer, which the verifier refuses. The packet
// bounds come as words: given the context, the compiler narrowed them to 32 bits.
#[inline(never)]
fn segment(start: usize, end: usize, s: &mut Segment) -> bool {
    if start + ETH_HLEN > end {
        return false;
    }
    // SAFETY (all loads): each range is checked against `end` first.
    let ethertype = unsafe { load_u16_be(start + 12) };
    let ip = start + ETH_HLEN;
    let tuple = &mut s.tuple;
    let (tcp, ipv6) = match ethertype {
        ETH_P_IPV4 => {
            if ip + IPV4_MIN_HLEN > end {
                return false;
            }
            let (version_ihl, frag, proto) =
                unsafe { (load_u8(ip), load_u16_be(ip + 6), load_u8(ip + 9)) };
            if version_ihl >> 4 != 4 || proto != IPPROTO_TCP || frag & 0x1fff != 0 {
                return false;
            }
            let tcp = ip + ((version_ihl & 0x0f) as usize) * 4;
            // SAFETY: the IPv4 member of a zeroed union.
            unsafe {
                tuple.__bindgen_anon_1.ipv4.saddr = load_u32(ip + 12);
                tuple.__bindgen_anon_1.ipv4.daddr = load_u32(ip + 16);
            }
            (tcp, false)
        }
        ETH_P_IPV6 => {
            if ip + IPV6_HLEN > end {
                return false;
            }
            if unsafe { load_u8(ip + 6) } != IPPROTO_TCP {
                return false;
            }
            // SAFETY: the IPv6 member of a zeroed union; 32 address bytes checked.
            unsafe {
                let a = &mut tuple.__bindgen_anon_1.ipv6;
                for i in 0..4 {
                    a.saddr[i] = load_u32(ip + 8 + 4 * i);
                    a.daddr[i] = load_u32(ip + 24 + 4 * i);
                }
            }
            (ip + IPV6_HLEN, true)
        }
        _ => return false,
    };
    if tcp + TCP_MIN_HLEN > end {
        return false;
    }
    // SAFETY: 20 TCP header bytes checked.
    let (ports, dport, flags) = unsafe { (load_u32(tcp), load_u16_be(tcp + 2), load_u8(tcp + 13)) };
    let sport = ports as u16;
    s.ports = ports;
    if ipv6 {
        tuple.__bindgen_anon_1.ipv6.sport = sport;
        tuple.__bindgen_anon_1.ipv6.dport = dport.to_be();
    } else {
        tuple.__bindgen_anon_1.ipv4.sport = sport;
        tuple.__bindgen_anon_1.ipv4.dport = dport.to_be();
    }
    s.dport = dport;
    s.opens = is_new_tcp_flow(flags);
    s.ipv6 = ipv6;
    true
}
