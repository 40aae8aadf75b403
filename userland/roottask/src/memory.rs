//! The root task's capability slots and pages: a slot bitmap over its 4096 selectors, and a
//! page allocator that splits 4 KiB pages off the boot memory capabilities with `MemSplit`.

use crate::{Context, Outcome};
use abi::{BootInfo, ORDER_4K, ROOT_FIRST_MEMORY, Status};
use alloc::vec::Vec;
use rt::Selector;
use rt::layout::SLOTS;
use rt::sys;

/// Which selectors of the root task's space are in use.
pub struct Slots {
    used: [u64; (SLOTS / 64) as usize],
}

impl Slots {
    fn new() -> Self {
        Self {
            used: [0; (SLOTS / 64) as usize],
        }
    }

    fn mark(&mut self, selector: Selector) {
        if selector < SLOTS {
            self.used[(selector / 64) as usize] |= 1 << (selector % 64);
        }
    }

    /// A free selector, now marked used.
    pub fn alloc(&mut self) -> Outcome<Selector> {
        for (i, word) in self.used.iter_mut().enumerate() {
            if *word != u64::MAX {
                let bit = (!*word).trailing_zeros();
                *word |= 1 << bit;
                return Ok(i as u64 * 64 + u64::from(bit));
            }
        }
        Err("the root task's capability space is full".into())
    }

    /// Marks `selector` free again (its slot must be empty).
    pub fn free(&mut self, selector: Selector) {
        if selector < SLOTS {
            self.used[(selector / 64) as usize] &= !(1 << (selector % 64));
        }
    }
}

/// The root task's memory: its free slots and the boot memory it splits pages from.
pub struct Memory {
    pub slots: Slots,
    /// Boot memory blocks: (selector, order).
    blocks: Vec<(Selector, u64)>,
    /// The block pages are being split from, and the next page in it.
    block: usize,
    next_page: u64,
    /// Pages handed back, ready for reuse.
    free_pages: Vec<Selector>,
}

impl Memory {
    /// Takes stock of the boot capabilities: selectors 0 to 15 stay reserved (the PD, the
    /// thread, and room for more fixed capabilities), the memory and module capabilities are
    /// used, every other slot is free.
    pub fn new(boot: &BootInfo) -> Outcome<Self> {
        let mut slots = Slots::new();
        for s in 0..ROOT_FIRST_MEMORY {
            slots.mark(s);
        }
        let mut blocks = Vec::new();
        for m in boot.memory() {
            slots.mark(m.selector);
            blocks.push((m.selector, m.order));
        }
        for m in boot.modules() {
            slots.mark(m.selector);
        }
        if blocks.is_empty() {
            return Err("the kernel handed the root task no memory".into());
        }
        Ok(Self {
            slots,
            blocks,
            block: 0,
            next_page: 0,
            free_pages: Vec::new(),
        })
    }

    /// A free slot.
    pub fn slot(&mut self) -> Outcome<Selector> {
        self.slots.alloc()
    }

    /// A 4 KiB page of its own (a memory capability with all rights); its contents are
    /// whatever was there.
    pub fn page(&mut self) -> Outcome<Selector> {
        if let Some(page) = self.free_pages.pop() {
            return Ok(page);
        }
        while let Some(&(block, order)) = self.blocks.get(self.block) {
            if order < 64 && self.next_page < 1 << order {
                let slot = self.slot()?;
                if let Err(e) = sys::mem_split(block, self.next_page, ORDER_4K, slot) {
                    self.slots.free(slot);
                    return Err(alloc::format!(
                        "MemSplit of page {} of memory block {block}: {e:?}",
                        self.next_page
                    ));
                }
                self.next_page += 1;
                return Ok(slot);
            }
            self.block += 1;
            self.next_page = 0;
        }
        Err("out of boot memory".into())
    }

    /// A page filled with zeros.
    pub fn zeroed_page(&mut self) -> Outcome<Selector> {
        let page = self.page()?;
        fill(page, |_| 0)?;
        Ok(page)
    }

    /// Takes a page back: revokes every copy and mapping made from it and keeps it for reuse.
    pub fn release_page(&mut self, page: Selector) -> Outcome<()> {
        sys::cap_revoke(page).context("CapRevoke of a released page")?;
        self.free_pages.push(page);
        Ok(())
    }

    /// The largest boot memory block: (selector, order).
    pub fn largest_block(&self) -> (Selector, u64) {
        self.blocks
            .iter()
            .copied()
            .max_by_key(|&(_, order)| order)
            .unwrap_or((0, 0))
    }
}

/// Fills `page` (word `i` = `pattern(i)`) through a scratch mapping; returns the words' sum.
pub fn fill(page: Selector, pattern: impl Fn(usize) -> u64) -> Outcome<u64> {
    let map = rt::Mapping::new(page, 0, sys::MapRights::READ | sys::MapRights::WRITE)
        .context("MemMap of a page into the root task's scratch window")?;
    map.fill(&pattern).context("filling a page")?;
    Ok(map.sum())
}

/// The kernel's view of `selector`, for checks: Err if the slot is empty or bad.
pub fn info(selector: Selector) -> Result<sys::CapInfo, Status> {
    sys::cap_info(selector)
}
