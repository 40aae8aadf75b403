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
