//! Whole-map reads in batches (`BPF_MAP_LOOKUP_BATCH`): a hash map of a
//! million entries read in a few hundred syscalls, where walking it key by
//! key (`BPF_MAP_GET_NEXT_KEY`, then a lookup) takes two million. The
//! restart's reconcile and the counters read whole maps so.
//!
//! Entries written while a batch read runs may or may not be seen, as with
//! a walk; the kernel never returns a bucket half-read.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::MapData;

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`, the same enum.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries asked for per syscall (grown when a bucket holds more).
const BATCH: u32 = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of a hash map (plain or LRU; not per-CPU), as `K` and `V`,
/// read in batches (every kernel with TCX, which the agent needs, has
/// them: 5.6 and later).
pub(super) fn read_all<K: aya::Pod, V: aya::Pod>(map: &MapData) -> std::io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let batched = read_raw(map, size_of::<K>(), size_of::<V>(), |key, value| {
        // SAFETY: `key` and `value` are `size_of::<K>()` and
        // `size_of::<V>()` bytes of the map's entry; both are `Pod`.
        let entry = unsafe {
            (key.as_ptr().cast::<K>().read_unaligned(), value.as_ptr().cast::<V>().read_unaligned())
        };
        out.push(entry);
    });
    batched.map(|()| out)
}

/// How many entries a hash map holds (batches, as [`read_all`]).
pub(super) fn count(map: &MapData) -> std::io::Result<usize> {
    let info = map.info().map_err(std::io::Error::other)?;
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    let mut n = 0;
    read_raw(map, key_size, value_size, |_, _| n += 1)?;
    Ok(n)
}

/// Calls `f` with each entry's key and value bytes.
fn read_raw(
    map: &MapData,
    key_size: usize,
    value_size: usize,
    mut f: impl FnMut(&[u8], &[u8]),
) -> std::io::Result<()> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut capacity = BATCH;
    let mut keys = vec![0u8; key_size * capacity as usize];
    let mut values = vec![0u8; value_size * capacity as usize];
    // The position between calls: a bucket index for hash maps (u32), kept
    // in a u64 so that any token the kernel writes fits.
    let (mut token, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw mut token) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: capacity,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and
        // values and at two tokens, all live across the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (ret < 0).then(std::io::Error::last_os_error);
        match err.as_ref().and_then(std::io::Error::raw_os_error) {
            // A bucket with more entries than asked for: ask for more.
            Some(libc::ENOSPC) => {
                capacity *= 2;
                keys.resize(key_size * capacity as usize, 0);
                values.resize(value_size * capacity as usize, 0);
                continue;
            }
            Some(libc::ENOENT) | None => {}
            Some(_) => return Err(err.expect("an error")),
        }
        for i in 0..attr.count as usize {
            f(&keys[i * key_size..][..key_size], &values[i * value_size..][..value_size]);
        }
        if err.is_some() {
            return Ok(()); // ENOENT: the last batch.
        }
        token = next;
        first = false;
    }
}

/// A batch write that stopped: how many entries it wrote, and why.
#[derive(Debug)]
pub(super) struct Stopped {
    pub(super) written: usize,
    pub(super) error: std::io::Error,
}

/// Writes every entry (`BPF_ANY`) in one syscall, in order; on error the
/// first `written` are in the map (the kernel stops at the first failure:
/// `E2BIG` when the map is full).
pub(super) fn update_all<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    entries: &[(K, V)],
) -> Result<(), Stopped> {
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    write_batch(map, BPF_MAP_UPDATE_BATCH, keys.as_ptr() as u64, values.as_ptr() as u64, keys.len())
}

/// Deletes every key in one syscall, in order (each must be present: the
/// kernel stops at the first that is not).
pub(super) fn delete_all<K: aya::Pod>(map: &MapData, keys: &[K]) -> Result<(), Stopped> {
    write_batch(map, BPF_MAP_DELETE_BATCH, keys.as_ptr() as u64, 0, keys.len())
}

/// Deletes the keys that are present, in batches: a key found missing is
/// passed over (the kernel stops at it). Returns how many it deleted; on
/// another error, `written` counts the keys passed (deleted or missing).
pub(super) fn delete_present<K: aya::Pod>(map: &MapData, keys: &[K]) -> Result<usize, Stopped> {
    let (mut at, mut deleted) = (0, 0);
    while at < keys.len() {
        match delete_all(map, &keys[at..]) {
            Ok(()) => return Ok(deleted + keys.len() - at),
            Err(stopped) if stopped.error.raw_os_error() == Some(libc::ENOENT) => {
                deleted += stopped.written;
                at += stopped.written + 1;
            }
            Err(stopped) => return Err(Stopped { written: at + stopped.written, ..stopped }),
        }
    }
    Ok(deleted)
}

fn write_batch(
    map: &MapData,
    cmd: libc::c_long,
    keys: u64,
    values: u64,
    len: usize,
) -> Result<(), Stopped> {
    if len == 0 {
        return Ok(());
    }
    let count = u32::try_from(len).map_err(|_| Stopped {
        written: 0,
        error: std::io::Error::from_raw_os_error(libc::E2BIG),
    })?;
    let mut attr = BatchAttr {
        keys,
        values,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `keys` (and `values`, for an update) point at `count` keys
    // and values of the map's sizes, live across the call; the kernel only
    // reads them and writes `attr.count`.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut attr, size_of::<BatchAttr>() as u32) };
    if ret == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    Err(Stopped { written: (attr.count as usize).min(len), error })
}
