//! Packet access for the kernel programs.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{bpf_skb_cgroup_id, bpf_skb_load_bytes},
};
use policy_common::PacketBytes;

/// An skb's bytes: direct packet access when the bytes are in the linear
/// part, `bpf_skb_load_bytes` otherwise (non-linear skbs, e.g. GRO).
pub struct SkbBytes {
    skb: *mut __sk_buff,
    data: usize,
    data_end: usize,
}

impl SkbBytes {
    #[inline(always)]
    pub fn new(skb: *mut __sk_buff) -> Self {
        // SAFETY: the kernel hands every program a valid context.
        let (data, data_end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
        Self { skb, data, data_end }
    }

    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: as in `new`.
        unsafe { (*self.skb).ifindex }
    }

    /// Packet length in bytes.
    #[inline(always)]
    pub fn len(&self) -> u32 {
        // SAFETY: as in `new`.
        unsafe { (*self.skb).len }
    }

    /// `skb->protocol`, network byte order.
    #[inline(always)]
    pub fn protocol(&self) -> u32 {
        // SAFETY: as in `new`.
        unsafe { (*self.skb).protocol }
    }

    #[inline(always)]
    pub fn cgroup_id(&self) -> u64 {
        // SAFETY: the helper only reads the skb's socket.
        unsafe { bpf_skb_cgroup_id(self.skb) }
    }
}

impl PacketBytes for SkbBytes {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.data + offset;
        if start + N <= self.data_end {
            // SAFETY: bounds checked against data_end just above, in a form
            // the verifier follows (packet pointer + offset vs data_end).
            return Some(unsafe { (start as *const [u8; N]).read_unaligned() });
        }
        let mut buf = [0u8; N];
        // SAFETY: buf is N writable bytes.
        let ret = unsafe {
            bpf_skb_load_bytes(self.skb.cast(), offset as u32, buf.as_mut_ptr().cast(), N as u32)
        };
        if ret == 0 { Some(buf) } else { None }
    }
}
