//! Raw packets, as an attacker in a container sends them: whole IP packets
//! with whatever headers it likes (`IPPROTO_RAW`, header included), and a
//! capture of what arrives on a container's interface (`AF_PACKET`), which
//! sees a frame whether or not the container's stack would accept it.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// Sends the IP packet `packet` (IPv4 or IPv6, by its version nibble) from
/// `ns` as it is: source address, checksums and all. The kernel routes it
/// by its destination.
pub fn send_ip(ns: &NetNs, packet: &[u8]) {
    let packet = packet.to_vec();
    ns.run(move || {
        let v6 = packet[0] >> 4 == 6;
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: a fresh socket; IPPROTO_RAW includes the IP header (for
        // IPv6 since Linux 4.5).
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: the descriptor is ours.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let sent = if v6 {
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            addr.sin6_addr.s6_addr.copy_from_slice(&packet[24..40]);
            send_to(&socket, &packet, &addr)
        } else {
            // SAFETY: all-zero is a valid sockaddr_in.
            let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr =
                u32::from_ne_bytes([packet[16], packet[17], packet[18], packet[19]]);
            send_to(&socket, &packet, &addr)
        };
        assert_eq!(sent, packet.len() as isize, "raw send: {}", std::io::Error::last_os_error());
    });
}

/// `sendto` with the socket address `addr` (a `sockaddr_in` or `_in6`).
fn send_to<T>(socket: &OwnedFd, packet: &[u8], addr: &T) -> isize {
    // SAFETY: a valid buffer, and an address of the size given.
    unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (addr as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    }
}

/// Every frame arriving on one interface of a namespace, from the moment
/// it is made.
pub struct Capture {
    socket: OwnedFd,
}

impl Capture {
    /// Captures what arrives on `ifname` in `ns`.
    pub fn start(ns: &NetNs, ifname: &str) -> Self {
        let ifname = std::ffi::CString::new(ifname).expect("interface name");
        let socket = ns.run(move || {
            let all = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: a fresh packet socket.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
            assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            // SAFETY: the descriptor is ours.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            assert_ne!(ifindex, 0, "no interface {ifname:?}");
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = all;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: a valid sockaddr_ll.
            let bound = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(bound, 0, "bind packet socket: {}", std::io::Error::last_os_error());
            socket
        });
        Self { socket }
    }

    /// How many frames holding `marker` arrived (incoming only) from the
    /// start until `window` from now.
    pub fn count(&self, marker: &[u8], window: Duration) -> usize {
        let mut found = 0;
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + window;
        while Instant::now() < deadline {
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: a buffer and address of the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &mut len,
                )
            };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let frame = &buf[..n as usize];
            if from.sll_pkttype != libc::PACKET_OUTGOING
                && frame.windows(marker.len()).any(|w| w == marker)
            {
                found += 1;
            }
        }
        found
    }
}
