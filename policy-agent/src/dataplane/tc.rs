//! Legacy TC for host-side veths: a `clsact` qdisc and one direct-action
//! `cls_bpf` filter per direction, at a fixed priority and handle, through
//! rtnetlink.
//!
//! Why not TCX here: every TCX attach and detach waits for an RCU grace
//! period while it holds the kernel's netlink lock (kernel/bpf/tcx.c,
//! `synchronize_rcu` in `tcx_link_release` and friends), about 12 ms each on
//! this kernel, four per container life. A `cls_bpf` filter is added and
//! replaced under RCU without waiting (net/sched/cls_bpf.c) and is freed
//! from a work queue, so a container's two filters cost about 1 ms.
//!
//! The filter is created or replaced in place (`NLM_F_CREATE` without
//! `NLM_F_EXCL`): a replace swaps the program under RCU, so the hook never
//! runs without one.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

/// The filter's priority on both hooks (the first a `tc filter show` lists).
pub const PRIORITY: u16 = 1;
/// The filter's handle.
pub const HANDLE: u32 = 1;

// include/uapi/linux/rtnetlink.h, netlink.h, pkt_sched.h, pkt_cls.h.
const RTM_NEWQDISC: u16 = 36;
const RTM_GETQDISC: u16 = 38;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_ECHO: u16 = 0x8;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `TC_H_CLSACT` (= `TC_H_INGRESS`): the clsact qdisc's parent.
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
/// The clsact qdisc's own handle, `TC_H_MAKE(TC_H_CLSACT, 0)`.
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
const ETH_P_ALL: u16 = 0x0003;

/// One of clsact's two hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    /// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS | TC_H_MIN_EGRESS)`.
    fn parent(self) -> u32 {
        match self {
            Hook::Ingress => 0xFFFF_FFF2,
            Hook::Egress => 0xFFFF_FFF3,
        }
    }
}

/// What sits at our priority and handle on a hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// The BPF program's id.
    pub program_id: u32,
    /// The name it was attached under (the program's name, for ours).
    pub name: String,
}

/// What `add_clsact` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Clsact {
    /// The interface has a `clsact` qdisc (added now or before).
    Ready,
    /// Another qdisc holds its slot (`ingress`, another tool's): filters
    /// put there would all run on ingress.
    Taken(String),
}

/// Adds a `clsact` qdisc to the interface; one already there is fine.
pub fn add_clsact(ifindex: u32) -> io::Result<Clsact> {
    let mut msg = Message::new(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, ifindex);
    msg.tcm(CLSACT_HANDLE, TC_H_CLSACT, 0);
    msg.attr(TCA_KIND, b"clsact\0");
    match request(&msg.finish()) {
        Ok(_) => Ok(Clsact::Ready),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => match ingress_qdisc(ifindex)? {
            Some(kind) if kind != "clsact" => Ok(Clsact::Taken(kind)),
            _ => Ok(Clsact::Ready),
        },
        Err(e) => Err(e),
    }
}

/// The kind of the qdisc in the ingress / clsact slot, if there is one.
fn ingress_qdisc(ifindex: u32) -> io::Result<Option<String>> {
    // The answer is sent to the asker only if it asks for an echo
    // (net/sched/sch_api.c, `tc_get_qdisc` through `qdisc_notify`).
    let mut msg = Message::new(RTM_GETQDISC, NLM_F_ECHO, ifindex);
    msg.tcm(0, TC_H_CLSACT, 0);
    let reply = match request(&msg.finish()) {
        Ok(reply) => reply,
        Err(e) if absent(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let attrs = reply.as_deref().and_then(|r| r.get(TCMSG_LEN..)).unwrap_or_default();
    Ok(attributes(attrs).find(|(ty, _)| *ty == TCA_KIND).map(|(_, kind)| c_string(kind)))
}

fn c_string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// Puts `program` (named `name`) at our priority and handle on `hook`:
/// creates the filter, or swaps the program of the one there.
pub fn set_filter(ifindex: u32, hook: Hook, program: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let mut msg = Message::new(RTM_NEWTFILTER, NLM_F_CREATE, ifindex);
    msg.tcm(HANDLE, hook.parent(), filter_info());
    msg.attr(TCA_KIND, b"bpf\0");
    let options = msg.nest(TCA_OPTIONS);
    msg.attr(TCA_BPF_FD, &(program.as_raw_fd() as u32).to_ne_bytes());
    let mut name = name.as_bytes().to_vec();
    name.push(0);
    msg.attr(TCA_BPF_NAME, &name);
    msg.attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes());
    msg.end_nest(options);
    request(&msg.finish()).map(drop)
}

/// The `bpf` filter at our priority and handle on `hook`, if there is one
/// (none also when the interface or its clsact qdisc is gone).
pub fn filter(ifindex: u32, hook: Hook) -> io::Result<Option<Filter>> {
    let mut msg = Message::new(RTM_GETTFILTER, 0, ifindex);
    msg.tcm(HANDLE, hook.parent(), filter_info());
    msg.attr(TCA_KIND, b"bpf\0");
    let reply = match request(&msg.finish()) {
        Ok(reply) => reply,
        Err(e) if absent(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(payload) = reply else { return Ok(None) };
    let attrs = payload.get(TCMSG_LEN..).unwrap_or_default();
    let Some(options) = attributes(attrs).find(|(ty, _)| *ty == TCA_OPTIONS) else {
        return Ok(None);
    };
    let (mut id, mut name) = (None, String::new());
    for (ty, value) in attributes(options.1) {
        match ty {
            TCA_BPF_ID => id = value.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
            TCA_BPF_NAME => name = c_string(value),
            _ => {}
        }
    }
    Ok(id.map(|program_id| Filter { program_id, name }))
}

/// Removes the filter at our priority and handle on `hook`; none there (or
/// no interface) is fine.
pub fn delete_filter(ifindex: u32, hook: Hook) -> io::Result<()> {
    let mut msg = Message::new(RTM_DELTFILTER, 0, ifindex);
    msg.tcm(HANDLE, hook.parent(), filter_info());
    msg.attr(TCA_KIND, b"bpf\0");
    match request(&msg.finish()) {
        Err(e) if absent(&e) => Ok(()),
        other => other.map(drop),
    }
}

/// What the kernel answers when the interface, its qdisc or the filter is
/// not there.
fn absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL))
}

/// `tcm_info`: the priority in the upper half, the protocol (network
/// order) in the lower.
fn filter_info() -> u32 {
    (u32::from(PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be())
}

const NLMSG_HDRLEN: usize = 16;
const TCMSG_LEN: usize = 20;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// An rtnetlink request with a `tcmsg` header.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16, ifindex: u32) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN + TCMSG_LEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // tcmsg: family (AF_UNSPEC), padding, ifindex at offset 4.
        buf[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&ifindex.to_ne_bytes());
        Self { buf }
    }

    fn tcm(&mut self, handle: u32, parent: u32, info: u32) {
        let at = NLMSG_HDRLEN + 8;
        self.buf[at..at + 4].copy_from_slice(&handle.to_ne_bytes());
        self.buf[at + 4..at + 8].copy_from_slice(&parent.to_ne_bytes());
        self.buf[at + 8..at + 12].copy_from_slice(&info.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn nest(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.attr(ty | NLA_F_NESTED, &[]);
        at
    }

    fn end_nest(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The attributes in `buf`, as (type without flags, value).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*buf.first()?, *buf.get(1)?]));
        let ty = u16::from_ne_bytes([*buf.get(2)?, *buf.get(3)?]) & NLA_TYPE_MASK;
        let value = buf.get(4..len)?;
        buf = buf.get(align4(len)..).unwrap_or_default();
        Some((ty, value))
    })
}

/// Sends one request on a new rtnetlink socket and waits for its
/// acknowledgement. Returns the payload of the reply message that came
/// before it, if any (a `GET`'s answer).
fn request(msg: &[u8]) -> io::Result<Option<Vec<u8>>> {
    // SAFETY: a new socket, owned below.
    let fd = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl addresses the kernel (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: msg and kernel outlive the call; the lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = None;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut at = &buf[..n as usize];
        while at.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([at[0], at[1], at[2], at[3]]) as usize;
            let kind = u16::from_ne_bytes([at[4], at[5]]);
            if len < NLMSG_HDRLEN || len > at.len() {
                return Err(io::Error::other("truncated rtnetlink reply"));
            }
            let payload = &at[NLMSG_HDRLEN..len];
            if kind == NLMSG_ERROR {
                let code = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| io::Error::other("truncated rtnetlink error"))?;
                return match code {
                    0 => Ok(reply),
                    code => Err(io::Error::from_raw_os_error(-code)),
                };
            }
            reply = Some(payload.to_vec());
            at = &at[align4(len).min(at.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_request_is_laid_out_as_the_kernel_reads_it() {
        let mut msg = Message::new(RTM_NEWTFILTER, NLM_F_CREATE, 7);
        msg.tcm(HANDLE, Hook::Egress.parent(), filter_info());
        msg.attr(TCA_KIND, b"bpf\0");
        let options = msg.nest(TCA_OPTIONS);
        msg.attr(TCA_BPF_FD, &5u32.to_ne_bytes());
        msg.attr(TCA_BPF_NAME, b"abcde\0");
        msg.end_nest(options);
        let buf = msg.finish();
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize, buf.len());
        assert_eq!(buf.len() % 4, 0);
        // tcmsg: ifindex, handle, parent, priority 1 / ETH_P_ALL.
        let word = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
        assert_eq!((word(20), word(24), word(28)), (7, 1, 0xFFFF_FFF3));
        assert_eq!(word(32) >> 16, 1);
        assert_eq!((word(32) & 0xFFFF) as u16, ETH_P_ALL.to_be());
        let attrs: Vec<_> = attributes(&buf[NLMSG_HDRLEN + TCMSG_LEN..]).collect();
        assert_eq!(attrs[0], (TCA_KIND, &b"bpf\0"[..]));
        assert_eq!(attrs[1].0, TCA_OPTIONS);
        let inner: Vec<_> = attributes(attrs[1].1).collect();
        assert_eq!(
            inner,
            vec![(TCA_BPF_FD, &5u32.to_ne_bytes()[..]), (TCA_BPF_NAME, &b"abcde\0"[..])]
        );
    }

    #[test]
    fn truncated_attributes_end_the_walk() {
        assert_eq!(attributes(&[8, 0, 1, 0, 1]).count(), 0);
        assert_eq!(attributes(&[]).count(), 0);
        assert_eq!(attributes(&[5, 0, 1, 0, b'x', 0, 0, 0, 2, 0]).count(), 1);
    }
}
