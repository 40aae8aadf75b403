//! L1's EPT for L2: 4-level tables in L1's page arena, built with `ept`'s entry formats (SDM
//! Vol. 3C §29.3.2), 4 KiB and 2 MiB leaves, write-back, read/write/execute.

use ept::entry::{EptEntry, EptFlags, Eptp, MemType, PageSize, Rights};

use crate::arch;
use crate::layout::fail;
use crate::memory;
use crate::println;

/// The 4-level EPT of one L2.
#[derive(Debug)]
pub struct EptTables {
    root: u64,
}

/// The index of `gpa` in the table at `level` (4 = PML4 ... 1 = PT).
const fn index(gpa: u64, level: u8) -> u64 {
    (gpa >> (12 + 9 * (level as u32 - 1))) & 511
}

impl EptTables {
    /// An empty EPT (a zeroed PML4 from the arena).
    pub fn new() -> Result<EptTables, u32> {
        Ok(EptTables {
            root: memory::page()?,
        })
    }

    /// The EPT pointer: write-back paging structures, 4-level walk, no accessed/dirty flags
    /// (§25.6.11, checked by §27.2.1.1).
    pub fn pointer(&self) -> Eptp {
        Eptp::new(self.root, false)
    }

    /// The L1 address of the entry at `level` that translates `gpa`, creating the tables above
    /// it as needed (non-leaf entries grant RWX: the leaves decide).
    pub fn slot(&mut self, gpa: u64, level: u8) -> Result<u64, u32> {
        let mut table = self.root;
        let mut current = 4;
        loop {
            let slot = table + 8 * index(gpa, current);
            if current == level {
                return Ok(slot);
            }
            let entry = EptEntry(arch::phys_read(slot));
            table = if !entry.is_present() {
                let new = memory::page()?;
                arch::phys_write(slot, EptEntry::table(new, Rights::RWX).0);
                new
            } else if current <= 3 && entry.flags().contains(EptFlags::PAGE_SIZE) {
                println!("l1hv: EPT: {gpa:#x} is inside a large page");
                return Err(fail::LAYOUT);
            } else {
                entry.address()
            };
            current -= 1;
        }
    }

    /// Maps the L2 page at `gpa` to the L1 page at `l1` (both aligned to `size`): RWX,
    /// write-back. Replaces what was there (the caller invalidates if that was present).
    pub fn map(&mut self, gpa: u64, l1: u64, size: PageSize) -> Result<(), u32> {
        let slot = self.slot(gpa, size.level())?;
        let leaf = EptEntry::leaf(l1, size, Rights::RWX, MemType::WriteBack, false);
        arch::phys_write(slot, leaf.0);
        Ok(())
    }

    /// The L1 address `gpa` translates to, if mapped.
    pub fn translate(&self, gpa: u64) -> Option<u64> {
        let mut table = self.root;
        for level in (1..=4u8).rev() {
            let entry = EptEntry(arch::phys_read(table + 8 * index(gpa, level)));
            if !entry.is_present() {
                return None;
            }
            let size = PageSize::at_level(level);
            match size {
                Some(size) if level == 1 || entry.flags().contains(EptFlags::PAGE_SIZE) => {
                    let base = size.align_down(entry.address());
                    return Some(base | (gpa & size.offset_mask()));
                }
                _ => table = entry.address(),
            }
        }
        None
    }
}
