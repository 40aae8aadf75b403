//! The pager's windows on memory it owns: the backed region (zeroed once, at start) and the
//! frames of on-demand pages (each filled with the pattern before it is mapped into L1's EPT).
//! The only module of the pager with `unsafe`.
//!
//! A window maps a whole memory capability into the pager's own address space, readable and
//! writable, for the pager's life. L1 may write the same frames through its EPT while the
//! pager touches them, so every access is a raw-pointer access: no Rust reference into a
//! window is ever made.

use abi::{ORDER_2M, ORDER_4K, Status};
use rt::Selector;
use rt::layout::{PAGE_SIZE, SELF_PD};
use rt::sys::{self, MapRights};

/// Where the backed region's memory is mapped in the pager.
pub const BACKED_WINDOW: u64 = 0x0000_0400_0000_0000;
/// Where the on-demand frames are mapped in the pager.
pub const FRAMES_WINDOW: u64 = 0x0000_0500_0000_0000;
/// Largest window: 2^20 pages (4 GiB); the windows above are 1 TiB apart.
pub const MAX_ORDER: u64 = 20;

const PAGES_PER_2M: u64 = 512;

/// `pages` pages of a memory capability mapped readable and writable at `base`.
#[derive(Debug)]
pub struct Window {
    base: u64,
    pages: u64,
}

impl Window {
    /// Maps the `2^order` pages of `cap` at `base` (one of the window addresses above, each
    /// used once), with 2 MiB mappings where the size allows.
    pub fn map(cap: Selector, order: u64, base: u64) -> Result<Self, Status> {
        if order > MAX_ORDER || !base.is_multiple_of(PAGES_PER_2M * PAGE_SIZE) {
            return Err(Status::InvalidArgument);
        }
        let pages = 1u64 << order;
        let (step, map_order) = if pages.is_multiple_of(PAGES_PER_2M) {
            (PAGES_PER_2M, ORDER_2M)
        } else {
            (1, ORDER_4K)
        };
        let rights = MapRights::READ | MapRights::WRITE;
        let mut page = 0;
        while page < pages {
            if let Err(e) = sys::mem_map(
                cap,
                page,
                SELF_PD,
                base + page * PAGE_SIZE,
                rights,
                map_order,
            ) {
                let mut undo = 0;
                while undo < page {
                    let _ = sys::mem_unmap(SELF_PD, base + undo * PAGE_SIZE, map_order);
                    undo += step;
                }
                return Err(e);
            }
            page += step;
        }
        Ok(Self { base, pages })
    }

    /// Pages in the window.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    #[inline]
    fn page_pointer(&self, page: u64) -> *mut u64 {
        assert!(
            page < self.pages,
            "page {page} outside a window of {}",
            self.pages
        );
        (self.base + page * PAGE_SIZE) as *mut u64
    }

    /// Zeroes every page of the window (`REP STOSQ`).
    pub fn zero(&self) {
        let base = self.page_pointer(0);
        let words = self.pages * PAGE_SIZE / 8;
        // SAFETY: `map` mapped the window's `pages` pages readable and writable at
        // `self.base` in the pager's own PD, and nothing unmaps them while `self` lives (the
        // window addresses are used by no other code or data). REP STOSQ writes exactly
        // `words` u64s upwards from `base` (the ABI keeps the direction flag clear): exactly
        // the window. The memory is guest memory: no Rust reference points into it.
        unsafe {
            core::arch::asm!(
                "rep stosq",
                inout("rdi") base => _,
                inout("rcx") words => _,
                in("rax") 0u64,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Fills page `page` of the window: word `i` (0 to 511) gets `word(i)`.
    pub fn fill(&self, page: u64, word: impl Fn(usize) -> u64) {
        let base = self.page_pointer(page);
        for i in 0..rt::PAGE_WORDS {
            // SAFETY: as in `zero`; `page_pointer` checked that the page is in the window and
            // `i` < 512 keeps the write inside that page. Volatile: only L1 reads these
            // words (through its EPT, once the pager maps the frame), never Rust code, so the
            // writes must not be treated as dead.
            unsafe { base.add(i).write_volatile(word(i)) };
        }
    }
}
