//! A tiny authoritative DNS zone for the lab (`app.corp`, `open.corp`, `dns.corp`), so
//! tests and the demo resolve real names through the gateway, over UDP and TCP.

use std::net::IpAddr;

use simple_dns::{
    CLASS, Name, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, ResourceRecord, TYPE,
    rdata::{A, AAAA, RData},
};

use crate::{APP, APP_DNS, APP6, OPEN, OPEN6};

/// Names the lab's DNS server answers, with their addresses.
pub const ZONE: [(&str, IpAddr); 5] = [
    ("app.corp", APP),
    ("app.corp", APP6),
    ("open.corp", OPEN),
    ("open.corp", OPEN6),
    ("dns.corp", APP_DNS),
];

/// The reply to a query, or `None` for something that is not a query.
pub fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let query = Packet::parse(query).ok()?;
    let mut reply = Packet::new_reply(query.id());
    for question in &query.questions {
        let name = question.qname.to_string();
        reply.questions.push(question.clone());
        for (zone_name, addr) in ZONE {
            let rdata = match (addr, question.qtype) {
                (IpAddr::V4(a), QTYPE::TYPE(TYPE::A)) => RData::A(A { address: a.into() }),
                (IpAddr::V6(a), QTYPE::TYPE(TYPE::AAAA)) => RData::AAAA(AAAA { address: a.into() }),
                _ => continue,
            };
            if zone_name == name.trim_end_matches('.') {
                reply.answers.push(ResourceRecord::new(
                    Name::new_unchecked(zone_name),
                    CLASS::IN,
                    60,
                    rdata,
                ));
            }
        }
    }
    if reply.answers.is_empty() {
        *reply.rcode_mut() = RCODE::NameError;
    }
    reply.build_bytes_vec().ok()
}

/// A query for the A (or AAAA) records of `name`.
pub fn query(id: u16, name: &str, ipv6: bool) -> Vec<u8> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    let qtype = if ipv6 { TYPE::AAAA } else { TYPE::A };
    packet.questions.push(Question::new(
        Name::new_unchecked(name),
        qtype.into(),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    packet.build_bytes_vec().expect("a valid query")
}

/// The addresses in a reply to query `id`; `None` if it is not such a reply.
pub fn addresses(reply: &[u8], id: u16) -> Option<Vec<IpAddr>> {
    let packet = Packet::parse(reply).ok()?;
    if packet.id() != id || !packet.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    Some(
        packet
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(IpAddr::from(std::net::Ipv4Addr::from(a.address))),
                RData::AAAA(a) => Some(IpAddr::from(std::net::Ipv6Addr::from(a.address))),
                _ => None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_known_names_and_refuses_others() {
        let reply = answer(&query(7, "app.corp", false)).unwrap();
        assert_eq!(addresses(&reply, 7), Some(vec![APP]));
        let reply = answer(&query(8, "open.corp", true)).unwrap();
        assert_eq!(addresses(&reply, 8), Some(vec![OPEN6]));
        let reply = answer(&query(9, "nope.corp", false)).unwrap();
        assert_eq!(addresses(&reply, 9), Some(vec![]));
        assert_eq!(addresses(&reply, 10), None, "another id");
        assert_eq!(answer(b"junk"), None);
    }
}
