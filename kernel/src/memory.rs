//! Physical memory: the frame allocator over available RAM minus the kernel, the boot
//! information and the modules, and the kernel heap. Both are `buddy_system_allocator`s.

use crate::bootinfo::{BootInfo, Region};
use alloc::vec::Vec;
use buddy_system_allocator::{FrameAllocator, LockedHeap};
use core::sync::atomic::{AtomicUsize, Ordering};
use spin::Mutex;

pub const PAGE_SIZE: usize = 4096;
/// The boot page tables identity-map [0, 4 GiB): the kernel uses RAM below this limit.
pub const MAPPED_LIMIT: u64 = 4 << 30;
/// Memory below 1 MiB stays reserved (real-mode structures, the AP trampoline page).
const LOW_MEMORY: u64 = 1 << 20;
const HEAP_SIZE: u64 = 8 << 20;
const MAX_RANGES: usize = 128;

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

static FRAMES: Mutex<FrameAllocator<32>> = Mutex::new(FrameAllocator::new());
static TOTAL_FRAMES: AtomicUsize = AtomicUsize::new(0);
static FREE_FRAMES: AtomicUsize = AtomicUsize::new(0);
/// RAM above MAPPED_LIMIT that the kernel leaves unused for now (reported at boot).
pub static UNMAPPED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The reserved ranges, kept for the self-check.
static RESERVED: Mutex<[Region; 4 + crate::bootinfo::MAX_MODULES]> =
    Mutex::new([Region { start: 0, end: 0 }; 4 + crate::bootinfo::MAX_MODULES]);

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn subtract(free: &mut [Region; MAX_RANGES], count: &mut usize, hole: Region) {
    let mut out = [Region::default(); MAX_RANGES];
    let mut n = 0;
    for r in &free[..*count] {
        let pieces = [
            Region {
                start: r.start,
                end: r.end.min(hole.start),
            },
            Region {
                start: r.start.max(hole.end),
                end: r.end,
            },
        ];
        for p in pieces {
            if p.start < p.end && n < MAX_RANGES {
                out[n] = p;
                n += 1;
            }
        }
    }
    *free = out;
    *count = n;
}

/// Sets up the heap and the frame allocator. Returns an error line if memory is unusable.
pub fn init(info: &BootInfo) -> Result<(), &'static str> {
    let (kstart, kend) = crate::boot::kernel_range();
    let mut reserved = RESERVED.lock();
    reserved[0] = Region {
        start: 0,
        end: LOW_MEMORY,
    };
    reserved[1] = Region {
        start: kstart,
        end: kend,
    };
    reserved[2] = Region {
        start: info.info_range.start,
        end: info.info_range.end,
    };
    for (i, m) in info.modules().enumerate() {
        reserved[4 + i] = Region {
            start: m.start,
            end: m.end,
        };
    }

    let mut free = [Region::default(); MAX_RANGES];
    let mut count = 0;
    let mut unmapped = 0u64;
    for r in info.available() {
        let start = align_up(r.start, PAGE_SIZE as u64);
        let end = r.end.min(MAPPED_LIMIT) & !(PAGE_SIZE as u64 - 1);
        unmapped += r.end.saturating_sub(MAPPED_LIMIT.max(r.start));
        if start < end && count < MAX_RANGES {
            free[count] = Region { start, end };
            count += 1;
        }
    }
    UNMAPPED_BYTES.store(unmapped as usize, Ordering::Relaxed);
    for hole in reserved.iter().filter(|h| h.start < h.end) {
        let hole = Region {
            start: hole.start & !(PAGE_SIZE as u64 - 1),
            end: align_up(hole.end, PAGE_SIZE as u64),
        };
        subtract(&mut free, &mut count, hole);
    }

    // The heap: the first free range large enough.
    let heap = free[..count]
        .iter()
        .position(|r| r.end - r.start >= HEAP_SIZE)
        .ok_or("no free range large enough for the kernel heap")?;
    let heap_start = free[heap].start;
    reserved[3] = Region {
        start: heap_start,
        end: heap_start + HEAP_SIZE,
    };
    free[heap].start += HEAP_SIZE;
    // SAFETY: [heap_start, heap_start + HEAP_SIZE) is available RAM below MAPPED_LIMIT
    // (identity mapped), outside the kernel, the boot information and every module, and is
    // handed to no one else: it was removed from the free ranges just above.
    unsafe { HEAP.lock().init(heap_start as usize, HEAP_SIZE as usize) };

    let mut frames = FRAMES.lock();
    let mut total = 0;
    for r in &free[..count] {
        if r.start < r.end {
            frames.add_frame(
                (r.start / PAGE_SIZE as u64) as usize,
                (r.end / PAGE_SIZE as u64) as usize,
            );
            total += ((r.end - r.start) / PAGE_SIZE as u64) as usize;
        }
    }
    TOTAL_FRAMES.store(total, Ordering::Relaxed);
    FREE_FRAMES.store(total, Ordering::Relaxed);
    Ok(())
}

/// Allocates `pages` contiguous frames (rounded up to a power of two and aligned to it).
pub fn alloc_pages(pages: usize) -> Option<u64> {
    let pages = pages.max(1).next_power_of_two();
    let frame = FRAMES.lock().alloc(pages)?;
    FREE_FRAMES.fetch_sub(pages, Ordering::Relaxed);
    Some((frame * PAGE_SIZE) as u64)
}

/// Allocates and zeroes `pages` contiguous frames.
pub fn alloc_zeroed_pages(pages: usize) -> Option<u64> {
    let addr = alloc_pages(pages)?;
    let bytes = pages.max(1).next_power_of_two() * PAGE_SIZE;
    // SAFETY: the frames were just allocated, so nothing else refers to them, and they lie
    // below MAPPED_LIMIT, identity mapped and writable.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, bytes) };
    Some(addr)
}

/// Returns frames from `alloc_pages(pages)`.
pub fn free_pages(addr: u64, pages: usize) {
    let pages = pages.max(1).next_power_of_two();
    FRAMES
        .lock()
        .dealloc((addr / PAGE_SIZE as u64) as usize, pages);
    FREE_FRAMES.fetch_add(pages, Ordering::Relaxed);
}

/// (total, free) frame counts.
pub fn frame_stats() -> (usize, usize) {
    (
        TOTAL_FRAMES.load(Ordering::Relaxed),
        FREE_FRAMES.load(Ordering::Relaxed),
    )
}

/// Bytes in use on the kernel heap.
pub fn heap_used() -> usize {
    HEAP.lock().stats_alloc_actual()
}

fn overlaps_reserved(addr: u64, len: u64) -> bool {
    RESERVED
        .lock()
        .iter()
        .any(|r| r.start < r.end && addr < r.end && r.start < addr + len)
}

/// Frame-allocator self-check: distinct, aligned, usable frames outside every reserved range,
/// large aligned blocks, and everything returned afterwards.
pub fn self_check_frames() -> Result<(), &'static str> {
    let (_, free_before) = frame_stats();
    let mut got: Vec<u64> = Vec::new();
    for i in 0..256u64 {
        let f = alloc_pages(1).ok_or("frame allocator ran dry during the self-check")?;
        if f % PAGE_SIZE as u64 != 0 {
            return Err("frame not page aligned");
        }
        if f >= MAPPED_LIMIT || overlaps_reserved(f, PAGE_SIZE as u64) {
            return Err("frame overlaps a reserved range");
        }
        // SAFETY: the frame was just allocated to us and is identity mapped.
        unsafe { core::ptr::write_volatile(f as *mut u64, f ^ i) };
        got.push(f);
    }
    let mut sorted = got.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != got.len() {
        return Err("frame allocator handed out a frame twice");
    }
    for (i, f) in got.iter().enumerate() {
        // SAFETY: still allocated to us; written above.
        if unsafe { core::ptr::read_volatile(*f as *const u64) } != f ^ i as u64 {
            return Err("frame contents changed under the self-check");
        }
    }
    let big = alloc_pages(512).ok_or("no 2 MiB block free")?;
    if big % (2 << 20) != 0 {
        return Err("2 MiB block not 2 MiB aligned");
    }
    if overlaps_reserved(big, 2 << 20) {
        return Err("2 MiB block overlaps a reserved range");
    }
    free_pages(big, 512);
    for f in got {
        free_pages(f, 1);
    }
    if frame_stats().1 != free_before {
        return Err("frames leaked in the self-check");
    }
    Ok(())
}

/// Heap self-check: small and large allocations, contents, and the heap returning to its
/// previous use afterwards.
pub fn self_check_heap() -> Result<(), &'static str> {
    use alloc::collections::BTreeMap;
    let before = heap_used();
    {
        let v: Vec<u64> = (0..20_000).collect();
        if v.iter().sum::<u64>() != 19_999 * 20_000 / 2 {
            return Err("heap vector contents wrong");
        }
        let big = alloc::vec![0xa5u8; 1 << 20];
        if big.iter().any(|&b| b != 0xa5) {
            return Err("heap large block contents wrong");
        }
        let mut map = BTreeMap::new();
        for i in 0..1000u32 {
            map.insert(i.wrapping_mul(2_654_435_761), i);
        }
        if map.len() != 1000 {
            return Err("heap map lost entries");
        }
    }
    if heap_used() != before {
        return Err("heap leaked in the self-check");
    }
    Ok(())
}

/// Adds donated RAM at `[start, start + len)` to the kernel heap (EPT bookkeeping paid for by
/// the donor).
pub fn add_to_heap(start: u64, len: usize) {
    if start
        .checked_add(len as u64)
        .is_none_or(|end| end > MAPPED_LIMIT)
    {
        return;
    }
    // SAFETY: the caller passes frames taken out of a donated pool: RAM below MAPPED_LIMIT
    // (checked), identity mapped, owned by the kernel from now on (the donated-range set keeps
    // every mapping away from it), and never handed out again.
    unsafe {
        HEAP.lock()
            .add_to_heap(start as usize, start as usize + len)
    };
}
