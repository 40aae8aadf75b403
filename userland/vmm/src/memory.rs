//! The VMM's windows on memory it holds: guest RAM (read and written by address) and the guest
//! image (read-only). The only module of the VMM with `unsafe`.
//!
//! Guest RAM is one memory capability mapped whole into the VMM's address space at
//! [`RAM_WINDOW`]; pages of it go into a guest's EPT with `EptMap` from the same capability.
//! The guest may write a page while the VMM touches it, so every access here is a raw-pointer
//! access (no Rust reference into guest memory is ever made).

use abi::{ORDER_2M, ORDER_4K, Status};
use alloc::vec::Vec;
use rt::Selector;
use rt::layout::{PAGE_SIZE, SELF_PD};
use rt::sys::{self, MapRights};

/// Where guest RAM is mapped in the VMM (2 MiB aligned, clear of the program, its stack, UTCB
/// and the runtime's scratch window).
pub const RAM_WINDOW: u64 = 0x0000_0300_0000_0000;
/// Where the guest image is mapped in the VMM.
pub const IMAGE_WINDOW: u64 = 0x0000_0310_0000_0000;

const PAGES_PER_2M: u64 = 512;

/// Guest RAM: `pages` pages of the memory capability `cap`, mapped readable and writable at
/// [`RAM_WINDOW`], handed out one page at a time.
#[derive(Debug)]
pub struct Ram {
    cap: Selector,
    pages: u64,
    next: u64,
    free: Vec<u64>,
}

impl Ram {
    /// Maps the `2^order` pages of `cap` into the VMM (2 MiB mappings where the size allows).
    pub fn map(cap: Selector, order: u64) -> Result<Self, Status> {
        let pages = 1u64
            .checked_shl(order as u32)
            .ok_or(Status::InvalidArgument)?;
        let ram = Self {
            cap,
            pages,
            next: 0,
            free: Vec::new(),
        };
        ram.map_window()?;
        Ok(ram)
    }

    fn map_window(&self) -> Result<(), Status> {
        let rights = MapRights::READ | MapRights::WRITE;
        let (step, order) = if self.pages.is_multiple_of(PAGES_PER_2M) {
            (PAGES_PER_2M, ORDER_2M)
        } else {
            (1, ORDER_4K)
        };
        let mut page = 0;
        while page < self.pages {
            sys::mem_map(
                self.cap,
                page,
                SELF_PD,
                RAM_WINDOW + page * PAGE_SIZE,
                rights,
                order,
            )?;
            page += step;
        }
        Ok(())
    }

    /// Takes every page back after a guest ended: revokes everything derived from the
    /// capability (the guest's EPT entries and the VMM's own window), maps the window again and
    /// starts handing out pages from the first.
    pub fn reclaim(&mut self) -> Result<(), Status> {
        sys::cap_revoke(self.cap)?;
        self.map_window()?;
        self.next = 0;
        self.free.clear();
        Ok(())
    }

    /// The memory capability (the source of `EptMap`).
    pub fn cap(&self) -> Selector {
        self.cap
    }

    /// A page of its own (its index in the capability), contents undefined.
    #[inline]
    pub fn alloc(&mut self) -> Option<u64> {
        if let Some(page) = self.free.pop() {
            return Some(page);
        }
        (self.next < self.pages).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Gives back a page `alloc` handed out (that nothing maps).
    pub fn release(&mut self, page: u64) {
        self.free.push(page);
    }

    /// Pages handed out so far.
    pub fn used(&self) -> u64 {
        self.next - self.free.len() as u64
    }

    #[inline(always)]
    fn word_pointer(&self, page: u64, word: usize) -> *mut u64 {
        assert!(page < self.pages && word < rt::PAGE_WORDS);
        (RAM_WINDOW + page * PAGE_SIZE + word as u64 * 8) as *mut u64
    }

    /// Fills every u64 of the page with `value` (`REP STOSQ`: a page costs one emulated cycle
    /// per word in Bochs, against about three for a loop of stores).
    #[inline]
    pub fn fill(&self, page: u64, value: u64) {
        let base = self.word_pointer(page, 0);
        // SAFETY: `base` is the first word of page `page` of the RAM window (checked by
        // `word_pointer`), which `map_window` mapped readable and writable in the VMM for as
        // long as `self` lives (`reclaim` maps it again at once); REP STOSQ writes exactly its
        // 512 words (RCX) upwards (the ABI keeps the direction flag clear). The page is guest
        // memory: no Rust reference points into it, and a guest writing it concurrently only
        // changes what it later reads.
        unsafe {
            core::arch::asm!(
                "rep stosq",
                inout("rdi") base => _,
                inout("rcx") rt::PAGE_WORDS => _,
                in("rax") value,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Writes `value` to word `word` (0 to 511) of the page.
    pub fn write_word(&self, page: u64, word: usize, value: u64) {
        let pointer = self.word_pointer(page, word);
        // SAFETY: as in `fill`; `word_pointer` checked the page and word.
        unsafe { pointer.write_volatile(value) };
    }

    /// Copies `bytes` to byte `offset` of the page (which must hold them).
    pub fn write_bytes(&self, page: u64, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= PAGE_SIZE as usize);
        let base = self.word_pointer(page, 0) as *mut u8;
        // SAFETY: as in `fill`; `offset + bytes.len()` <= 4096 (asserted above), and `bytes`
        // (the VMM's image window or heap) cannot overlap the RAM window.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(offset), bytes.len()) };
    }
}

/// The guest image: a read-only copy of the ELF file the root task prepared, mapped at
/// [`IMAGE_WINDOW`] for the VMM's life.
#[derive(Clone, Copy, Debug)]
pub struct Image {
    bytes: &'static [u8],
}

impl Image {
    /// Maps the first `size` bytes of `cap` (READ, MAP) read-only. Once per VMM: the window is
    /// never unmapped and never mapped again.
    pub fn map(cap: Selector, size: u64) -> Result<Self, Status> {
        static MAPPED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
        if size == 0 || size > 1 << 30 {
            return Err(Status::InvalidArgument);
        }
        if MAPPED.swap(true, core::sync::atomic::Ordering::AcqRel) {
            return Err(Status::AlreadyMapped);
        }
        let pages = size.div_ceil(PAGE_SIZE);
        for page in 0..pages {
            if let Err(e) = sys::mem_map(
                cap,
                page,
                SELF_PD,
                IMAGE_WINDOW + page * PAGE_SIZE,
                MapRights::READ,
                ORDER_4K,
            ) {
                for mapped in 0..page {
                    let _ = sys::mem_unmap(SELF_PD, IMAGE_WINDOW + mapped * PAGE_SIZE, ORDER_4K);
                }
                MAPPED.store(false, core::sync::atomic::Ordering::Release);
                return Err(e);
            }
        }
        // SAFETY: the `pages` pages from `IMAGE_WINDOW` (at least `size` bytes) were just mapped
        // readable in the VMM's own PD, and `MAPPED` makes this the only mapping ever made there;
        // the VMM never unmaps them, so they stay valid for `'static`. Nobody writes them: the
        // root task filled the memory before handing over the capability, and the VMM maps it
        // read-only. (Were the root task to revoke it anyway, a read would fault and the fault
        // would go to the root task's fault endpoint, never read other memory.)
        let bytes =
            unsafe { core::slice::from_raw_parts(IMAGE_WINDOW as *const u8, size as usize) };
        Ok(Self { bytes })
    }

    pub fn bytes(&self) -> &'static [u8] {
        self.bytes
    }
}

/// The first extra message word of the VMM main thread's UTCB.
const UTCB_WORDS: u64 = rt::layout::CHILD_UTCB + core::mem::offset_of!(abi::Utcb, words) as u64;

/// The VMM main thread's UTCB reached by address: the exit-message and reply images move
/// without `rt::utcb`'s per-word checks (the exit handling's hot path).
#[derive(Clone, Copy, Debug, Default)]
pub struct FastUtcb;

impl FastUtcb {
    #[inline(always)]
    fn pointer(first: usize, len: usize) -> *mut u64 {
        assert!(first + len <= abi::UTCB_WORDS);
        (UTCB_WORDS + first as u64 * 8) as *mut u64
    }
}

impl rt::vmx::MessageWords for FastUtcb {
    #[inline(always)]
    fn read(&mut self, first: usize, out: &mut [u64]) {
        let base = Self::pointer(first, out.len());
        for (i, w) in out.iter_mut().enumerate() {
            // SAFETY: the VMM is a child program whose main thread's UTCB the root task had the
            // kernel map at `CHILD_UTCB`, readable and writable for the thread's life
            // (`rt::layout`); the VMM has only that thread, so nothing else uses the page, and
            // the words read lie inside it (`pointer` checks the range). Volatile: the kernel
            // writes the page during IPC.
            *w = unsafe { base.add(i).read_volatile() };
        }
    }

    #[inline(always)]
    fn write(&mut self, first: usize, words: &[u64]) {
        let base = Self::pointer(first, words.len());
        for (i, w) in words.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { base.add(i).write_volatile(*w) };
        }
    }
}

/// CPUID with `leaf` and `subleaf` on the VMM's CPU: [EAX, EBX, ECX, EDX].
#[inline]
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}
