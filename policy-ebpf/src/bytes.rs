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

    /// The context, for helpers and `TcContext`.
    #[inline(always)]
    pub fn skb(&self) -> *mut __sk_buff {
        self.skb
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

    /// The interface the packet entered this host by (`skb->ingress_ifindex`;
    /// for a decapsulated tunnel packet, the tunnel device).
    #[inline(always)]
    pub fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context.
        unsafe { (*self.skb).ingress_ifindex }
    }

    /// `skb->mark`.
    #[inline(always)]
    pub fn mark(&self) -> u32 {
        // SAFETY: reading a field of the context.
        unsafe { (*self.skb).mark }
    }

    /// Sets `skb->mark` (TC programs may write it).
    #[inline(always)]
    pub fn set_mark(&self, mark: u32) {
        // SAFETY: a writable field of the context for TC programs.
        unsafe { (*self.skb).mark = mark };
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

/// One 4-byte packet load at any alignment (x86 and arm64 load unaligned
/// packet data natively; the verifier allows it where the CPU does). Asm,
/// because the compiler splits a misaligned load into bytes.
#[inline(always)]
unsafe fn load32(addr: usize) -> u64 {
    let v: u64;
    // SAFETY: the caller checked addr..addr+4 against data_end.
    unsafe {
        core::arch::asm!("{0} = *(u32 *)({1} + 0)", out(reg) v, in(reg) addr, options(readonly, nostack, preserves_flags));
    }
    v
}

/// One 2-byte packet load at any alignment; see [`load32`].
#[inline(always)]
unsafe fn load16(addr: usize) -> u64 {
    let v: u64;
    // SAFETY: the caller checked addr..addr+2 against data_end.
    unsafe {
        core::arch::asm!("{0} = *(u16 *)({1} + 0)", out(reg) v, in(reg) addr, options(readonly, nostack, preserves_flags));
    }
    v
}

impl SkbBytes {
    /// `N` bytes at `offset` by direct packet access only (one load for 2
    /// and 4 bytes); None where the linear part ends first.
    #[inline(always)]
    pub fn direct<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.data + offset;
        if start + N > self.data_end {
            return None;
        }
        // SAFETY: bounds checked against data_end just above, in a form the
        // verifier follows (packet pointer + offset vs data_end).
        unsafe {
            match N {
                4 => {
                    let mut out = [0u8; N];
                    out.copy_from_slice(&(load32(start) as u32).to_ne_bytes());
                    Some(out)
                }
                2 => {
                    let mut out = [0u8; N];
                    out.copy_from_slice(&(load16(start) as u16).to_ne_bytes());
                    Some(out)
                }
                _ => Some((start as *const [u8; N]).read_unaligned()),
            }
        }
    }
}

impl PacketBytes for SkbBytes {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        match self.direct::<N>(offset) {
            Some(out) => Some(out),
            None => self.read_copy::<N>(offset),
        }
    }

    #[inline(always)]
    fn read_copy<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let mut buf = [0u8; N];
        // SAFETY: buf is N writable bytes.
        let ret = unsafe {
            bpf_skb_load_bytes(self.skb.cast(), offset as u32, buf.as_mut_ptr().cast(), N as u32)
        };
        if ret == 0 { Some(buf) } else { None }
    }
}
