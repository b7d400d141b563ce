//! A hint for the compiler, shared by the packet parser and the port search.

/// `v`, which the compiler may no longer reason about (in BPF: an asm
/// statement it must keep where it is), so arithmetic on it stays
/// arithmetic instead of becoming branches the verifier would follow one by
/// one, and a value merged from several paths is set on all of them.
#[inline(always)]
pub fn opaque(v: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    {
        let mut v = v;
        // SAFETY: one register move onto itself: the value passes unchanged
        // (an empty statement would leave two line-info records on one
        // instruction, which the kernel rejects).
        unsafe {
            core::arch::asm!("{0} = {0}", inout(reg) v, options(nomem, nostack, preserves_flags));
        }
        v
    }
    #[cfg(not(target_arch = "bpf"))]
    v
}
