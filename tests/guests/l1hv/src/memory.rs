//! L1's own memory: the layout check at start-up, the page arena shared by every vCPU, and the
//! patterns L1 writes for L2 to check.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch;
use crate::layout::{PAGE, fail, l1, l1_pattern};
use crate::println;

/// The next free page of the arena.
static NEXT: AtomicU64 = AtomicU64::new(l1::ARENA_BASE);

/// `count` contiguous zeroed pages from the arena.
pub fn pages(count: u64) -> Result<u64, u32> {
    let bytes = count * PAGE;
    let start = NEXT.fetch_add(bytes, Ordering::Relaxed);
    if start + bytes > l1::ARENA_END {
        println!("l1hv: page arena exhausted");
        return Err(fail::LAYOUT);
    }
    for address in (start..start + bytes).step_by(8) {
        arch::phys_write(address, 0);
    }
    Ok(start)
}

/// One zeroed page from the arena.
pub fn page() -> Result<u64, u32> {
    pages(1)
}

/// Fills the L1 page `l1_page` with L1's pattern for the L2 page `l2_page` at `version`.
pub fn fill_pattern(l1_page: u64, l2_page: u64, version: u64) {
    for word in 0..PAGE / 8 {
        arch::phys_write(l1_page + 8 * word, l1_pattern(l2_page + 8 * word, version));
    }
}

/// Whether `[start, end)` overlaps what L1 manages itself: the arena, the 2 MiB frames and the
/// on-demand region.
fn in_managed(start: u64, end: u64) -> bool {
    start < l1::ON_DEMAND_END && end > l1::ARENA_BASE
}

/// Checks that nothing L1 was given lies where it puts its own data: the image below the
/// arena, the boot page tables (CR3's PML4, its PDPT and page directories) and the boot stack
/// outside the arena, the frames and the on-demand region (docs/nested.md promises backed
/// memory for them, not where they are).
pub fn check_layout(boot_rsp: u64) -> Result<(), u32> {
    let (start, end) = arch::image_range();
    if start < l1::IMAGE_BASE || end > l1::ARENA_BASE {
        println!("l1hv: image {start:#x}-{end:#x} overlaps the arena");
        return Err(fail::LAYOUT);
    }
    let address_mask = 0x000f_ffff_ffff_f000;
    let pml4 = arch::read_cr3() & address_mask;
    let mut tables = [0u64; 6];
    tables[0] = pml4;
    let pml4e = arch::phys_read(pml4);
    let mut n = 1;
    if pml4e & 1 != 0 {
        let pdpt = pml4e & address_mask;
        tables[n] = pdpt;
        n += 1;
        for slot in 0..4 {
            let pdpte = arch::phys_read(pdpt + 8 * slot);
            // Present and not a 1 GiB page: a page directory.
            if pdpte & 1 != 0 && pdpte & 0x80 == 0 {
                tables[n] = pdpte & address_mask;
                n += 1;
            }
        }
    }
    for &table in &tables[..n] {
        if in_managed(table, table + PAGE) {
            println!("l1hv: boot page table at {table:#x} in the arena");
            return Err(fail::LAYOUT);
        }
    }
    if in_managed(boot_rsp.saturating_sub(PAGE), boot_rsp) {
        println!("l1hv: boot stack at {boot_rsp:#x} in the arena");
        return Err(fail::LAYOUT);
    }
    Ok(())
}
