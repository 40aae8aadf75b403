//! Memory the runtime reaches by address: the UTCB, the boot information and boot modules, the
//! scratch-window mappings, and the heap's backing store. With `syscall`, the only module with
//! `unsafe`; everything it hands out is a safe interface.

use crate::layout::{PAGE_SIZE, Role, SCRATCH_BASE, SCRATCH_PAGES, SELF_PD};
use crate::sys::{self, MapRights, Selector};
use abi::{
    BOOT_INFO_MAGIC, BootInfo, ROOT_BOOT_INFO, Status, USER_BASE, USER_END, UTCB_WORDS, Utcb,
};
use core::mem::offset_of;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// Words in a page.
pub const PAGE_WORDS: usize = (PAGE_SIZE / 8) as usize;

const ROLE_UNKNOWN: u8 = 0;
const ROLE_ROOT: u8 = 1;
const ROLE_CHILD: u8 = 2;

/// The program's role, set once by `runtime::run` before `main`.
static ROLE: AtomicU8 = AtomicU8::new(ROLE_UNKNOWN);

pub(crate) fn set_role(role: Role) {
    let code = match role {
        Role::Root => ROLE_ROOT,
        Role::Child => ROLE_CHILD,
    };
    ROLE.store(code, Ordering::Release);
}

/// The program's role, once `main` runs.
pub fn role() -> Option<Role> {
    match ROLE.load(Ordering::Acquire) {
        ROLE_ROOT => Some(Role::Root),
        ROLE_CHILD => Some(Role::Child),
        _ => None,
    }
}

// ---- UTCB ----

/// The main thread's UTCB: the address its creator gave `ThreadCreate` for this role. The
/// kernel maps it for the thread's life; only the main thread uses these functions (other
/// threads of the PD have UTCBs elsewhere and keep to register-only messages).
fn utcb_word_address(word: usize) -> u64 {
    let base = role().expect("the UTCB is known once main runs").utcb();
    base + (word * 8) as u64
}

fn utcb_read(word: usize) -> u64 {
    assert!(word < PAGE_WORDS);
    // SAFETY: `utcb_word_address` is inside the 4 KiB UTCB page the kernel mapped (readable and
    // writable) at the role's UTCB address for the life of the thread; nothing in the program
    // holds a reference into it, and the access is volatile because the kernel writes the page
    // during IPC.
    unsafe { core::ptr::read_volatile(utcb_word_address(word) as *const u64) }
}

fn utcb_write(word: usize, value: u64) {
    assert!(word < PAGE_WORDS);
    // SAFETY: as in `utcb_read`; the page is mapped writable for its thread.
    unsafe { core::ptr::write_volatile(utcb_word_address(word) as *mut u64, value) }
}

const RECEIVE_SLOT_WORD: usize = offset_of!(Utcb, receive_slot) / 8;
const FIRST_MESSAGE_WORD: usize = offset_of!(Utcb, words) / 8;
// The extra message words fit the UTCB page (the bulk copies below rely on it).
const _: () = assert!(FIRST_MESSAGE_WORD + UTCB_WORDS <= PAGE_WORDS);

/// The main thread's UTCB: the receive slot and the extra message words.
pub mod utcb {
    use super::*;

    /// Sets where a transferred capability may land (`abi::NO_SLOT` for nowhere).
    pub fn set_receive_slot(slot: u64) {
        utcb_write(RECEIVE_SLOT_WORD, slot);
    }

    pub fn receive_slot() -> u64 {
        utcb_read(RECEIVE_SLOT_WORD)
    }

    /// Extra message word `index` (0 to `UTCB_WORDS` - 1).
    pub fn word(index: usize) -> u64 {
        assert!(index < UTCB_WORDS);
        utcb_read(FIRST_MESSAGE_WORD + index)
    }

    pub fn set_word(index: usize, value: u64) {
        assert!(index < UTCB_WORDS);
        utcb_write(FIRST_MESSAGE_WORD + index, value);
    }

    /// Copies `words` into the extra message words (at most `UTCB_WORDS`); returns how many.
    pub fn write_words(words: &[u64]) -> usize {
        let n = words.len().min(UTCB_WORDS);
        let base = utcb_word_address(FIRST_MESSAGE_WORD) as *mut u64;
        for (i, w) in words[..n].iter().enumerate() {
            // SAFETY: as in `utcb_write`: word `FIRST_MESSAGE_WORD + i` lies inside the UTCB
            // page because `i < UTCB_WORDS` (the page's extra message words).
            unsafe { core::ptr::write_volatile(base.add(i), *w) };
        }
        n
    }

    /// Copies the first `out.len()` extra message words (at most `UTCB_WORDS`) into `out`.
    pub fn read_words(out: &mut [u64]) -> usize {
        let n = out.len().min(UTCB_WORDS);
        let base = utcb_word_address(FIRST_MESSAGE_WORD) as *const u64;
        for (i, w) in out[..n].iter_mut().enumerate() {
            // SAFETY: as in `utcb_read`, for word `FIRST_MESSAGE_WORD + i < PAGE_WORDS`.
            *w = unsafe { core::ptr::read_volatile(base.add(i)) };
        }
        n
    }
}

// ---- Boot information and modules (root task only) ----

/// The kernel's boot information, in the root task (`None` elsewhere or if it looks wrong).
pub fn boot_info() -> Option<&'static BootInfo> {
    if role() != Some(Role::Root) {
        return None;
    }
    // SAFETY: in the root task the kernel maps `BootInfo` read-only at `ROOT_BOOT_INFO` for the
    // task's life (docs/abi.md, "The root task"), and the runtime never unmaps it. `BootInfo`
    // is `repr(C)` plain data (integers and byte arrays): every bit pattern is a valid value,
    // and nothing writes it, so a shared `'static` reference is sound.
    let info = unsafe { &*(ROOT_BOOT_INFO as *const BootInfo) };
    (info.magic == BOOT_INFO_MAGIC).then_some(info)
}

/// The bytes of boot module `index` as the kernel mapped them (root task only).
pub fn module_bytes(index: usize) -> Option<&'static [u8]> {
    let module = boot_info()?.modules().get(index)?;
    let end = module.vaddr.checked_add(module.size)?;
    if module.vaddr < USER_BASE || end > USER_END || module.size > isize::MAX as u64 {
        return None;
    }
    // SAFETY: the kernel maps every boot module read-only at `vaddr` (`size` bytes, inside user
    // space as just checked) for the root task's life, and the runtime never unmaps it; the
    // bytes never change, so a shared `'static` slice is sound.
    Some(unsafe { core::slice::from_raw_parts(module.vaddr as *const u8, module.size as usize) })
}

// ---- Scratch mappings ----

/// Bit `i` set: scratch page `i` belongs to a live [`Mapping`].
static SCRATCH_IN_USE: AtomicU64 = AtomicU64::new(0);
const _: () = assert!(SCRATCH_PAGES <= 64);

fn claim_scratch_page() -> Option<u32> {
    let mut used = SCRATCH_IN_USE.load(Ordering::Relaxed);
    loop {
        let free = !used;
        if free == 0 {
            return None;
        }
        let index = free.trailing_zeros();
        if u64::from(index) >= SCRATCH_PAGES {
            return None;
        }
        match SCRATCH_IN_USE.compare_exchange_weak(
            used,
            used | (1 << index),
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => return Some(index),
            Err(now) => used = now,
        }
    }
}

fn release_scratch_page(index: u32) {
    SCRATCH_IN_USE.fetch_and(!(1 << index), Ordering::AcqRel);
}

/// One page of a memory capability mapped into the caller's own PD, in the scratch window.
/// Unmapped when dropped. Accesses are volatile: other domains may share the page.
#[derive(Debug)]
pub struct Mapping {
    index: u32,
    rights: MapRights,
}

impl Mapping {
    /// Maps page `offset` of `memory` with `rights` into a free scratch page of the own PD.
    pub fn new(memory: Selector, offset: u64, rights: MapRights) -> Result<Self, Status> {
        let index = claim_scratch_page().ok_or(Status::OutOfMemory)?;
        let vaddr = SCRATCH_BASE + u64::from(index) * PAGE_SIZE;
        match sys::mem_map(memory, offset, SELF_PD, vaddr, rights, abi::ORDER_4K) {
            Ok(()) => Ok(Self { index, rights }),
            Err(e) => {
                release_scratch_page(index);
                Err(e)
            }
        }
    }

    /// Where the page is mapped.
    pub fn vaddr(&self) -> u64 {
        SCRATCH_BASE + u64::from(self.index) * PAGE_SIZE
    }

    /// Word `index` (0 to 511) of the page.
    pub fn read_word(&self, index: usize) -> u64 {
        assert!(index < PAGE_WORDS);
        // SAFETY: the scratch window is reserved for `Mapping`s (no other code or data lives
        // there: `layout::SCRATCH_BASE`), this page belongs to `self` alone (the in-use
        // bitmap), and `MemMap` mapped it readable in the own PD before `self` existed. If
        // another domain revoked the mapping since, the read faults and the fault goes to the
        // thread's fault endpoint (docs/abi.md, "Faults"); it never reads other memory.
        unsafe { core::ptr::read_volatile((self.vaddr() + index as u64 * 8) as *const u64) }
    }

    /// Writes word `index` (0 to 511); `InsufficientRights` if mapped read-only.
    pub fn write_word(&self, index: usize, value: u64) -> Result<(), Status> {
        if !self.rights.contains(MapRights::WRITE) {
            return Err(Status::InsufficientRights);
        }
        if index >= PAGE_WORDS {
            return Err(Status::OutOfRange);
        }
        // SAFETY: as in `read_word`; the page was mapped writable (checked above).
        unsafe { core::ptr::write_volatile((self.vaddr() + index as u64 * 8) as *mut u64, value) };
        Ok(())
    }

    /// Copies `bytes` to byte `offset` of the page; `OutOfRange` if they do not fit.
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) -> Result<(), Status> {
        if !self.rights.contains(MapRights::WRITE) {
            return Err(Status::InsufficientRights);
        }
        let end = offset.checked_add(bytes.len()).ok_or(Status::OutOfRange)?;
        if end > PAGE_SIZE as usize {
            return Err(Status::OutOfRange);
        }
        let base = self.vaddr() + offset as u64;
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: as in `write_word`; `offset + i < PAGE_SIZE` (checked above).
            unsafe { core::ptr::write_volatile((base + i as u64) as *mut u8, *b) };
        }
        Ok(())
    }

    /// Fills every word: word `i` gets `pattern(i)`.
    pub fn fill(&self, pattern: impl Fn(usize) -> u64) -> Result<(), Status> {
        (0..PAGE_WORDS).try_for_each(|i| self.write_word(i, pattern(i)))
    }

    /// The wrapping sum of the page's 512 words.
    pub fn sum(&self) -> u64 {
        (0..PAGE_WORDS).fold(0u64, |s, i| s.wrapping_add(self.read_word(i)))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Fails only if someone already removed the mapping (a revocation): nothing to undo.
        let _ = sys::mem_unmap(SELF_PD, self.vaddr(), abi::ORDER_4K);
        release_scratch_page(self.index);
    }
}

// ---- Heap backing store ----

#[cfg(not(test))]
pub(crate) mod heap {
    use buddy_system_allocator::LockedHeap;
    use core::sync::atomic::{AtomicBool, Ordering};

    /// Size of every program's heap.
    pub const HEAP_SIZE: usize = 256 * 1024;

    #[repr(C, align(4096))]
    struct HeapSpace([u8; HEAP_SIZE]);

    /// The heap's memory, in .bss (the loader maps it zeroed).
    static mut HEAP_SPACE: HeapSpace = HeapSpace([0; HEAP_SIZE]);

    #[global_allocator]
    static HEAP: LockedHeap<32> = LockedHeap::empty();

    /// Hands the backing store to the allocator (once).
    pub fn init() {
        static DONE: AtomicBool = AtomicBool::new(false);
        if DONE.swap(true, Ordering::AcqRel) {
            return;
        }
        let start = (&raw mut HEAP_SPACE) as usize;
        // SAFETY: `HEAP_SPACE` is a static `HEAP_SIZE`-byte region used by nothing but the
        // allocator (no reference to it is ever made; `DONE` makes this run once), so the heap
        // owns it for the rest of the program.
        unsafe { HEAP.lock().init(start, HEAP_SIZE) };
    }
}
