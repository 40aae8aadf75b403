//! Host address spaces of protection domains: x86-64 4-level page tables edited through the
//! one walker in `ept::walk` (format `X86Paging`). The kernel's identity map (PML4 entry 0,
//! supervisor-only) is shared by every address space; user mappings live in entries 1-255.

use crate::{hw, memory, phys};
use ept::entry::{PageSize, PagingFlags, Rights};
use ept::walk::{
    EditError, Level, MemoryError, PhysMemory, PhysMemoryMut, Writable, X86Paging, install, remove,
    walk,
};

/// Physical memory through the identity map.
pub struct IdentityMemory;

impl PhysMemory for IdentityMemory {
    fn read_u64(&self, address: u64) -> Result<u64, MemoryError> {
        phys::read_u64(address).ok_or(MemoryError::NotBacked { address })
    }
}

impl PhysMemoryMut for IdentityMemory {
    fn write_u64(&mut self, address: u64, value: u64) -> Result<(), MemoryError> {
        if phys::write_u64(address, value) {
            Ok(())
        } else {
            Err(MemoryError::NotBacked { address })
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MapError {
    AlreadyMapped,
    NotMapped,
    OutOfMemory,
    /// A page-table entry the kernel wrote is unusable (a kernel bug, reported).
    Corrupt,
}

impl From<EditError> for MapError {
    fn from(e: EditError) -> Self {
        match e {
            EditError::Occupied => Self::AlreadyMapped,
            EditError::NotMapped => Self::NotMapped,
            EditError::NoTable => Self::OutOfMemory,
            EditError::Corrupt => Self::Corrupt,
        }
    }
}

/// The paging format of this machine.
fn format() -> X86Paging {
    let (max_ext, ..) = hw::cpuid(0x8000_0000, 0);
    let max_phys_bits = if max_ext >= 0x8000_0008 {
        (hw::cpuid(0x8000_0008, 0).0 & 0xff) as u8
    } else {
        36
    };
    let pages_1g = max_ext >= 0x8000_0001 && hw::cpuid(0x8000_0001, 0).3 & (1 << 26) != 0;
    let nxe = hw::rdmsr(hw::msr::IA32_EFER) & (1 << 11) != 0;
    X86Paging {
        max_phys_bits,
        nxe,
        pages_1g,
    }
}

/// A user address space: a PML4 whose entry 0 is the kernel's.
#[derive(Debug)]
pub struct AddressSpace {
    pub pml4: u64,
}

impl AddressSpace {
    /// A new, empty user address space sharing the kernel's identity map.
    pub fn new() -> Option<Self> {
        let pml4 = memory::alloc_zeroed_pages(1)?;
        let kernel_entry = phys::read_u64(crate::boot::kernel_pml4())?;
        phys::write_u64(pml4, kernel_entry);
        Some(Self { pml4 })
    }

    /// Maps the page of `size` at physical `frame` at user address `vaddr` with `rights`
    /// (READ is implied). Intermediate tables come from the kernel's frames.
    pub fn map(
        &self,
        vaddr: u64,
        frame: u64,
        size: PageSize,
        rights: Rights,
    ) -> Result<(), MapError> {
        let mut leaf = frame | (PagingFlags::PRESENT | PagingFlags::USER).bits();
        if rights.contains(Rights::WRITE) {
            leaf |= PagingFlags::WRITABLE.bits();
        }
        if !rights.contains(Rights::EXECUTE) {
            leaf |= PagingFlags::EXECUTE_DISABLE.bits();
        }
        if size != PageSize::Size4K {
            leaf |= PagingFlags::PAGE_SIZE.bits();
        }
        let table_flags = (PagingFlags::PRESENT | PagingFlags::WRITABLE | PagingFlags::USER).bits();
        let new_table = || memory::alloc_zeroed_pages(1).map(|table| table | table_flags);
        install(
            &format(),
            &mut Writable(&mut IdentityMemory),
            self.pml4,
            vaddr,
            Level::of_size(size),
            leaf,
            new_table,
        )
        .map_err(MapError::from)
    }

    /// Removes the mapping of `size` at `vaddr`; returns the frame it mapped. The caller
    /// shoots down the TLBs.
    pub fn unmap(&self, vaddr: u64, size: PageSize) -> Result<u64, MapError> {
        remove(
            &format(),
            &mut Writable(&mut IdentityMemory),
            self.pml4,
            vaddr,
            size,
        )
        .map_err(MapError::from)
    }

    /// The physical address `vaddr` maps to and the rights of the mapping, if mapped for user.
    pub fn translate(&self, vaddr: u64) -> Option<(u64, Rights)> {
        let t = walk(&format(), &IdentityMemory, self.pml4, vaddr).ok()?;
        t.rights
            .contains(Rights::USER)
            .then_some((t.address, t.rights))
    }

    /// Copies user memory at `vaddr` into `out`, page by page; fails if any byte is not mapped
    /// readable for user mode.
    pub fn copy_from_user(&self, vaddr: u64, out: &mut [u8]) -> bool {
        let mut done = 0usize;
        while done < out.len() {
            let at = vaddr.wrapping_add(done as u64);
            let Some((pa, _)) = self.translate(at) else {
                return false;
            };
            let in_page = (4096 - (at & 0xfff)) as usize;
            let n = in_page.min(out.len() - done);
            if !phys::read(pa, &mut out[done..done + n]) {
                return false;
            }
            done += n;
        }
        true
    }

    /// Loads this address space on the calling CPU.
    pub fn activate(&self) {
        if hw::read_cr3() & !0xfff != self.pml4 {
            // SAFETY: the PML4 maps the kernel identically in entry 0 (copied at creation and
            // never changed), so the kernel keeps running after the switch.
            unsafe { hw::write_cr3(self.pml4) };
        }
    }
}
