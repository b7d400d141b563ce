//! A deliberately naive reference model of the policy, and the run that
//! sends random traffic through the program entering a container and
//! compares each verdict with the model's (`tests/tests/test_run_model.rs`,
//! for both families).

use policy_agent::Dataplane;
use policy_common::maps::{PairKey, proto};

use crate::test_run::{Fixture, TC_ACT_OK};

/// (source, source port, destination, destination port, protocol).
pub type Tuple<A> = (A, u16, A, u16, u8);

/// The family a reference-model run sends: its ICMP protocol and echo
/// request/reply (as `icmp_port`s), its addresses, how an endpoint is
/// registered and how a packet is framed.
pub struct ModelFamily<A> {
    pub icmp: u8,
    pub echo_request: u16,
    pub echo_reply: u16,
    /// The `i`th address of round `round`.
    pub address: fn(round: u8, i: u8) -> A,
    pub register: fn(&mut Dataplane, A, u32),
    /// The frames of (src, sport, dst, dport, protocol): one packet, or its
    /// fragments; `rng` may vary their shape (IPv6: extension headers,
    /// fragments) but never their meaning. Each gets the model's verdict.
    pub frames: fn(&mut rand::rngs::StdRng, &Tuple<A>) -> Vec<Vec<u8>>,
    /// An ICMP message that is neither a query nor an error (IPv4: router
    /// advertisement; IPv6: neighbour solicitation, here between global
    /// addresses, where it is an ordinary flow), as an `icmp_port`.
    pub one_way: u16,
    /// An ICMP destination unreachable from `from` to `to` quoting the
    /// datagram `about`.
    pub error_frame: fn(from: A, to: A, about: &Tuple<A>) -> Vec<u8>,
}

/// A deliberately naive model of the policy: a list of policies scanned
/// linearly and the open connections, each with the revocation count it
/// was last checked at. It shares no code with the program's decision
/// logic.
struct Model<A> {
    tags: std::collections::HashMap<A, u32>,
    policies: Vec<(u32, u32, u8, u16, u16)>,
    conns: std::collections::HashMap<Tuple<A>, u32>,
    /// How many revocations took something away (the program's epoch).
    epoch: u32,
    /// The ICMP protocol and echo request/reply ports of the family.
    icmp: (u8, u16, u16),
}

impl<A: Copy + Eq + std::hash::Hash> Model<A> {
    fn allowed(&self, src: A, dst: A, protocol: u8, dport: u16) -> bool {
        let (Some(&s), Some(&d)) = (self.tags.get(&src), self.tags.get(&dst)) else {
            return true;
        };
        self.policies.iter().any(|&(ps, pd, pp, lo, hi)| {
            ps == s && pd == d && pp == protocol && lo <= dport && dport <= hi
        })
    }

    /// Takes a policy away (the agent's semantics: the exact range). The
    /// epoch moves when a port it allowed is allowed no more.
    fn revoke(&mut self, (s, d, p, lo, hi): (u32, u32, u8, u16, u16)) {
        self.policies.retain(|&(ps, pd, pp, plo, phi)| {
            !(ps == s && pd == d && pp == p && plo == lo && phi == hi)
        });
        let still = |port: u16| {
            self.policies.iter().any(|&(ps, pd, pp, plo, phi)| {
                ps == s && pd == d && pp == p && plo <= port && port <= phi
            })
        };
        if !(lo..=hi).all(still) {
            self.epoch += 1;
        }
    }

    /// Pass or drop, updating the open connections as a stateful firewall
    /// that re-checks a connection's opening packet would.
    fn deliver(&mut self, src: A, sport: u16, dst: A, dport: u16, protocol: u8) -> bool {
        if !self.tags.contains_key(&src) || !self.tags.contains_key(&dst) {
            return true;
        }
        if protocol == self.icmp.0 {
            return self.deliver_icmp(src, sport, dst, dport);
        }
        for opening in [(src, sport, dst, dport, protocol), (dst, dport, src, sport, protocol)] {
            if self.conns.contains_key(&opening) {
                if self.allowed(opening.0, opening.2, protocol, opening.3) {
                    self.conns.insert(opening, self.epoch);
                    return true;
                }
                self.conns.remove(&opening);
                return false;
            }
        }
        if self.allowed(src, dst, protocol, dport) {
            self.conns.insert((src, sport, dst, dport, protocol), self.epoch);
            return true;
        }
        false
    }

    /// An ICMP error from `from` to `to` about the TCP or UDP datagram
    /// `about`: it must go back to the datagram's sender, from its
    /// destination or from an address that is no endpoint (a router), and
    /// then passes if its connection was checked since the last revocation,
    /// or if either end is no endpoint.
    fn deliver_error(&self, from: A, to: A, about: &Tuple<A>) -> bool {
        let &(p, ps, q, qs, protocol) = about;
        if to != p || (from != q && self.tags.contains_key(&from)) {
            return false;
        }
        let tracked = [(p, ps, q, qs, protocol), (q, qs, p, ps, protocol)]
            .iter()
            .any(|c| self.conns.get(c) == Some(&self.epoch));
        tracked || !self.tags.contains_key(&from) || !self.tags.contains_key(&to)
    }

    /// ICMP echo request and echo reply (`dport` the type and code) with
    /// identifier `id`: a request a policy allows opens an exchange
    /// (requester, id, responder) whose replies pass while the request is
    /// still allowed; a reply outside any exchange passes only if a policy
    /// allows replies, and opens nothing.
    fn deliver_icmp(&mut self, src: A, id: u16, dst: A, dport: u16) -> bool {
        let (icmp, request, reply) = self.icmp;
        if dport != request && dport != reply {
            // A one-way message: its own policy, nothing to answer.
            return self.allowed(src, dst, icmp, dport);
        }
        let is_request = dport == request;
        let (requester, responder) = if is_request { (src, dst) } else { (dst, src) };
        let exchange = (requester, id, responder, request, icmp);
        if self.conns.contains_key(&exchange) {
            if self.allowed(requester, responder, icmp, request) {
                self.conns.insert(exchange, self.epoch);
                return true;
            }
            self.conns.remove(&exchange);
            return false;
        }
        if !self.allowed(src, dst, icmp, dport) {
            return false;
        }
        if is_request {
            self.conns.insert(exchange, self.epoch);
        }
        true
    }
}

/// Random policies, revocations and traffic (new flows, replies, ICMP
/// echo both ways, one-way ICMP messages, ICMP errors quoting earlier
/// datagrams from their far end, from a router or forged by anyone)
/// through the program entering a container, each packet's verdict
/// compared with the model's. Returns how many were checked.
pub fn agrees_with_the_model<A: Copy + Eq + std::hash::Hash + std::fmt::Debug>(
    family: &ModelFamily<A>,
    seed: u64,
) -> u32 {
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};
    let mut f = Fixture::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let edges = [1u16, 2, 79, 80, 81, 443, 8079, 8080, 8090, 8091, 65534, 65535];
    let (icmp, request, reply) = (family.icmp, family.echo_request, family.echo_reply);
    let mut checked = 0u32;
    for round in 0..12u8 {
        // Fresh addresses and tags each round, so earlier rounds' connections
        // cannot interfere.
        let base_tag = 100 * (u32::from(round) + 1);
        let addrs: Vec<A> = (1..=6).map(|i| (family.address)(round, i)).collect();
        let mut model = Model {
            tags: Default::default(),
            policies: Vec::new(),
            conns: Default::default(),
            epoch: 0,
            icmp: (icmp, request, reply),
        };
        for (i, a) in addrs.iter().enumerate().take(5) {
            // Five registered endpoints in three apps; the sixth address is
            // not registered.
            let tag = base_tag + (i as u32 % 3);
            (family.register)(&mut f.dataplane, *a, tag);
            model.tags.insert(*a, tag);
        }
        let mut next_id = 1u32;
        let mut random_policy = |rng: &mut StdRng| {
            let start = *edges.choose(rng).unwrap();
            let end = start.saturating_add(*[0u16, 1, 10, 1000].choose(rng).unwrap());
            let protocol = *[proto::TCP, proto::UDP, icmp].choose(rng).unwrap();
            // ICMP policies: every type, echo requests, echo replies.
            let (start, end) = if protocol == icmp {
                *[(0, u16::MAX), (request, request | 0xff), (reply, reply | 0xff)]
                    .choose(rng)
                    .unwrap()
            } else {
                (start, end)
            };
            let src = base_tag + rng.random_range(0..3);
            let dst = base_tag + rng.random_range(0..3);
            next_id += 1;
            (src, dst, protocol, start, end, next_id)
        };
        for _ in 0..rng.random_range(1..12) {
            let (s, d, p, lo, hi, id) = random_policy(&mut rng);
            f.allow(s, d, p, lo, hi, id);
            model.policies.push((s, d, p, lo, hi));
        }
        let mut sent: Vec<Tuple<A>> = Vec::new();
        for step in 0..300 {
            if step % 75 == 74 && !model.policies.is_empty() {
                // Take a policy away (same semantics as the agent: exact range).
                let i = rng.random_range(0..model.policies.len());
                let (s, d, p, lo, hi) = model.policies[i];
                f.dataplane.maps_mut().revoke(PairKey::new(s, d, p), lo, hi).unwrap();
                model.revoke((s, d, p, lo, hi));
            }
            let quotable: Vec<Tuple<A>> = sent.iter().filter(|t| t.4 != icmp).copied().collect();
            if !quotable.is_empty() && rng.random_bool(0.12) {
                let about = *quotable.choose(&mut rng).unwrap();
                let anyone = *addrs.choose(&mut rng).unwrap();
                let (from, to) = match rng.random_range(0..4) {
                    0 | 1 => (about.2, about.0),
                    2 => (anyone, about.0),
                    _ => (anyone, *addrs.choose(&mut rng).unwrap()),
                };
                if from != to {
                    let want = model.deliver_error(from, to, &about);
                    let frame = (family.error_frame)(from, to, &about);
                    let got = f.entering_container(&frame) == TC_ACT_OK;
                    assert_eq!(
                        got, want,
                        "seed {seed}, round {round}, step {step}: error {from:?} -> {to:?} \
                         about {about:?} as {frame:02x?}"
                    );
                    checked += 1;
                }
                continue;
            }
            let packet = if !sent.is_empty() && rng.random_bool(0.4) {
                let (a, ap, b, bp, p) = *sent.choose(&mut rng).unwrap();
                if p == icmp {
                    // The answer (or, to a reply, a request) with the same id.
                    (b, ap, a, if bp == request { reply } else { request }, p)
                } else {
                    (b, bp, a, ap, p) // a reply
                }
            } else {
                let src = *addrs.choose(&mut rng).unwrap();
                let dst = *addrs.choose(&mut rng).unwrap();
                let protocol = *[proto::TCP, proto::UDP, icmp].choose(&mut rng).unwrap();
                if protocol == icmp {
                    // Echo request or reply, identifier as the source port,
                    // or a one-way message.
                    let dport = *[request, reply, family.one_way].choose(&mut rng).unwrap();
                    (src, rng.random_range(1..4), dst, dport, protocol)
                } else {
                    (
                        src,
                        rng.random_range(30000..30008),
                        dst,
                        *edges.choose(&mut rng).unwrap(),
                        protocol,
                    )
                }
            };
            let (src, sport, dst, dport, protocol) = packet;
            if src == dst {
                continue;
            }
            sent.push(packet);
            let want = model.deliver(src, sport, dst, dport, protocol);
            for frame in (family.frames)(&mut rng, &packet) {
                let got = f.entering_container(&frame) == TC_ACT_OK;
                assert_eq!(
                    got, want,
                    "seed {seed}, round {round}, step {step}: {packet:?} as {frame:02x?}"
                );
                checked += 1;
            }
        }
    }
    checked
}

pub fn model_seed() -> u64 {
    std::env::var("MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x00c0_ffee)
}
