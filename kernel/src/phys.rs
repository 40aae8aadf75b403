//! Read-only views of firmware memory (ACPI tables) through the identity map.

use crate::memory::MAPPED_LIMIT;

/// The `len` bytes at physical `addr`, if they lie inside the identity map.
///
/// Only for memory the kernel never hands out: firmware tables (ACPI reclaimable and NVS
/// memory is not "available" in the memory map, so the frame allocator never owns it).
pub fn firmware_bytes(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr == 0 || end > MAPPED_LIMIT {
        return None;
    }
    // SAFETY: [addr, end) is inside the identity map (checked above) and is firmware memory
    // that no allocator hands out and nothing writes, so a shared 'static view is sound.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Little-endian integer readers over byte slices (no panics: short input yields None).
pub fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

pub fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Whether `[addr, addr + len)` lies inside the identity map.
fn in_map(addr: u64, len: usize) -> bool {
    addr.checked_add(len as u64)
        .is_some_and(|end| end <= MAPPED_LIMIT)
}

/// Copies RAM at physical `addr` into `out`. Returns false (copying nothing) outside the map.
///
/// Callers pass frames they own or that a mapping they hold (under the kernel lock) refers to.
pub fn read(addr: u64, out: &mut [u8]) -> bool {
    if !in_map(addr, out.len()) {
        return false;
    }
    // SAFETY: the range is inside the identity map (checked) and is RAM the caller owns or
    // reaches through a mapping held under the kernel lock; byte copies have no alignment needs.
    unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
    true
}

/// Copies `data` to RAM at physical `addr`. Returns false (writing nothing) outside the map.
pub fn write(addr: u64, data: &[u8]) -> bool {
    if !in_map(addr, data.len()) {
        return false;
    }
    // SAFETY: as for `read`; the caller owns the destination frames (kernel-allocated or held
    // through a mapping under the kernel lock), so no Rust reference aliases them.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
    true
}

/// Zeroes RAM at physical `addr`.
pub fn zero(addr: u64, len: usize) -> bool {
    if !in_map(addr, len) {
        return false;
    }
    // SAFETY: as for `write`.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len) };
    true
}

/// Copies `len` bytes of RAM from `from` to `to` (both inside the map; the ranges may not
/// overlap).
pub fn copy(from: u64, to: u64, len: usize) -> bool {
    if !in_map(from, len) || !in_map(to, len) || (from < to + len as u64 && to < from + len as u64)
    {
        return false;
    }
    // SAFETY: both ranges are RAM in the kernel's direct map (checked above) and disjoint.
    unsafe { core::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) };
    true
}

/// Reads the u64 at physical `addr` (8-byte aligned, inside the map).
pub fn read_u64(addr: u64) -> Option<u64> {
    if !addr.is_multiple_of(8) || !in_map(addr, 8) {
        return None;
    }
    // SAFETY: aligned and inside the identity map; page-table frames are only read and written
    // as whole u64s, under the kernel lock.
    Some(unsafe { core::ptr::read_volatile(addr as *const u64) })
}

/// Writes the u64 at physical `addr` (8-byte aligned, inside the map).
pub fn write_u64(addr: u64, value: u64) -> bool {
    if !addr.is_multiple_of(8) || !in_map(addr, 8) {
        return false;
    }
    // SAFETY: as for `read_u64`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) };
    true
}

/// Copies u64 words to RAM at `addr` (little-endian, as the CPU stores them).
pub fn write_words(addr: u64, words: &[u64]) -> bool {
    let Some(len) = words.len().checked_mul(8) else {
        return false;
    };
    if !in_map(addr, len) {
        return false;
    }
    // SAFETY: as for `write`; a u64 slice is plain bytes.
    unsafe { core::ptr::copy_nonoverlapping(words.as_ptr().cast::<u8>(), addr as *mut u8, len) };
    true
}

/// Copies RAM at `addr` into u64 words.
pub fn read_words(addr: u64, words: &mut [u64]) -> bool {
    let Some(len) = words.len().checked_mul(8) else {
        return false;
    };
    if !in_map(addr, len) {
        return false;
    }
    // SAFETY: as for `read`; any bytes are a valid u64.
    unsafe {
        core::ptr::copy_nonoverlapping(addr as *const u8, words.as_mut_ptr().cast::<u8>(), len)
    };
    true
}

/// The `N` u64 words at `addr`, copied once (no zeroing first), if inside the identity map.
pub fn read_array<const N: usize>(addr: u64) -> Option<[u64; N]> {
    if !in_map(addr, N * 8) {
        return None;
    }
    let mut out = core::mem::MaybeUninit::<[u64; N]>::uninit();
    // SAFETY: the source is inside the identity map (checked) and is RAM the caller reaches
    // under the kernel lock; the copy initialises all N * 8 bytes of `out`, and any bytes are
    // a valid [u64; N].
    unsafe {
        core::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr().cast::<u8>(), N * 8);
        Some(out.assume_init())
    }
}
