//! Entry formats of EPT and x86-64 4-level paging, memory types, rights and the EPT pointer.
//!
//! Section numbers are those of the Intel SDM, 2024 edition (Vol. 3C: chapter 25 "Virtual
//! Machine Control Structures", chapter 28 "VM Exits", chapter 29 "VMX Support for Address
//! Translation"; Vol. 3A chapter 4 "Paging"). Older editions number the same sections one lower.
//!
//! This module only names bits. What a combination of bits *means* to the processor (present,
//! misconfigured, leaf or table) is decided by the formats in [`crate::walk`] and the checks
//! in [`crate::check`].

use bitflags::bitflags;

/// Bytes in a 4 KiB page and in a paging-structure table.
pub const PAGE_SIZE: u64 = 4096;
/// Entries in one paging-structure table (4 KiB of 8-byte entries).
pub const ENTRIES_PER_TABLE: usize = 512;
/// Bits 51:12 of an entry: the widest physical address any processor supports (MAXPHYADDR is at
/// most 52, Vol. 3A §4.1.4). Narrower widths are applied by the checks.
pub const ADDRESS_MASK_52: u64 = 0x000f_ffff_ffff_f000;

bitflags! {
    /// Access rights, for both EPT (R/W/X, bits 2:0 of every EPT entry, Vol. 3C §29.3.2) and
    /// 4-level paging (present, R/W, U/S and the inverse of XD, Vol. 3A §4.6).
    ///
    /// The same type describes an *access* (what the processor tried to do) and the *rights*
    /// an entry grants; an access is allowed when `rights.contains(access)`.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
    pub struct Rights: u8 {
        /// Data read (EPT bit 0; for paging: the entry is present).
        const READ = 1 << 0;
        /// Data write (EPT bit 1; paging R/W).
        const WRITE = 1 << 1;
        /// Instruction fetch (EPT bit 2, supervisor-mode fetch when mode-based execute control
        /// is on; paging: XD clear).
        const EXECUTE = 1 << 2;
        /// User-mode access (4-level paging U/S only; never set for EPT).
        const USER = 1 << 3;
    }
}

impl Rights {
    /// Read, write and execute: everything EPT can grant.
    pub const RWX: Self = Self::READ.union(Self::WRITE).union(Self::EXECUTE);
}

/// The size of a leaf mapping: what a leaf entry at level 1, 2 or 3 maps.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB, mapped by a level-1 entry (EPT PTE, Vol. 3C Table 29-6).
    Size4K,
    /// 2 MiB, mapped by a level-2 entry with bit 7 set (EPT PDE, Table 29-4).
    Size2M,
    /// 1 GiB, mapped by a level-3 entry with bit 7 set (EPT PDPTE, Table 29-2).
    Size1G,
}

impl PageSize {
    /// All sizes, largest first.
    pub const DESCENDING: [Self; 3] = [Self::Size1G, Self::Size2M, Self::Size4K];

    /// Bytes covered.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// log2 of [`Self::bytes`].
    pub const fn shift(self) -> u32 {
        match self {
            Self::Size4K => 12,
            Self::Size2M => 21,
            Self::Size1G => 30,
        }
    }

    /// Mask of the offset bits inside a page of this size.
    pub const fn offset_mask(self) -> u64 {
        self.bytes() - 1
    }

    /// `address` rounded down to this size.
    pub const fn align_down(self, address: u64) -> u64 {
        address & !self.offset_mask()
    }

    /// Whether `address` is aligned to this size.
    pub const fn is_aligned(self, address: u64) -> bool {
        address & self.offset_mask() == 0
    }

    /// The level of the paging structure whose entries map pages of this size (1, 2 or 3).
    pub const fn level(self) -> u8 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
            Self::Size1G => 3,
        }
    }

    /// The size a leaf at `level` maps, if a leaf can exist there.
    pub const fn at_level(level: u8) -> Option<Self> {
        match level {
            1 => Some(Self::Size4K),
            2 => Some(Self::Size2M),
            3 => Some(Self::Size1G),
            _ => None,
        }
    }

    /// The derivation-tree level code of `caps::NodeKey::Mapping` (0 = 4 KiB, 1 = 2 MiB,
    /// 2 = 1 GiB).
    pub const fn key_level(self) -> u8 {
        self.level() - 1
    }
}

/// An EPT memory type (Vol. 3C §29.3.7; encodings shared with PAT and MTRRs, Vol. 3A §13.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum MemType {
    /// Uncacheable (UC), encoding 0.
    Uncacheable = 0,
    /// Write combining (WC), encoding 1.
    WriteCombining = 1,
    /// Write-through (WT), encoding 4.
    WriteThrough = 4,
    /// Write-protected (WP), encoding 5.
    WriteProtected = 5,
    /// Write-back (WB), encoding 6.
    WriteBack = 6,
}

impl MemType {
    /// Decodes a 3-bit memory-type field. Encodings 2, 3 and 7 are reserved: in a leaf EPT
    /// entry they cause an EPT misconfiguration (Vol. 3C §29.3.3.1).
    pub const fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }

    /// The 3-bit encoding.
    pub const fn bits(self) -> u8 {
        self as u8
    }
}

bitflags! {
    /// Flag bits of an EPT paging-structure entry (Vol. 3C §29.3.2, Tables 29-1 to 29-6).
    /// Which bits are defined, ignored or reserved depends on the level and on bit 7; see
    /// [`crate::check`].
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct EptFlags: u64 {
        /// Bit 0: read access allowed.
        const READ = 1 << 0;
        /// Bit 1: write access allowed.
        const WRITE = 1 << 1;
        /// Bit 2: instruction fetch allowed (supervisor-mode fetch with mode-based execute
        /// control).
        const EXECUTE = 1 << 2;
        /// Bit 6 of a leaf: ignore PAT memory type.
        const IGNORE_PAT = 1 << 6;
        /// Bit 7 of a level-2 or level-3 entry: the entry maps a page (2 MiB or 1 GiB).
        const PAGE_SIZE = 1 << 7;
        /// Bit 8: accessed, if EPT accessed/dirty flags are enabled in the EPTP (§29.3.5).
        const ACCESSED = 1 << 8;
        /// Bit 9 of a leaf: dirty, if EPT accessed/dirty flags are enabled (§29.3.5).
        const DIRTY = 1 << 9;
        /// Bit 10: user-mode execute, with mode-based execute control (ignored otherwise).
        const USER_EXECUTE = 1 << 10;
        /// Bit 63 of a leaf: suppress #VE, with EPT-violation #VE enabled (ignored otherwise).
        const SUPPRESS_VE = 1 << 63;
    }
}

/// Bits 5:3 of a leaf EPT entry: the memory type.
pub const EPT_MEMTYPE_SHIFT: u32 = 3;
/// Mask of bits 5:3.
pub const EPT_MEMTYPE_MASK: u64 = 0b111 << EPT_MEMTYPE_SHIFT;

/// One raw 64-bit EPT paging-structure entry (Vol. 3C §29.3.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct EptEntry(pub u64);

impl EptEntry {
    /// The not-present entry.
    pub const EMPTY: Self = Self(0);

    /// A leaf mapping `address` (aligned to the page size by the caller) with `rights`, memory
    /// type and ignore-PAT. `size` decides whether bit 7 is set.
    pub const fn leaf(
        address: u64,
        size: PageSize,
        rights: Rights,
        memtype: MemType,
        ignore_pat: bool,
    ) -> Self {
        let mut raw = (address & ADDRESS_MASK_52) | rwx_bits(rights);
        raw |= (memtype.bits() as u64) << EPT_MEMTYPE_SHIFT;
        if ignore_pat {
            raw |= EptFlags::IGNORE_PAT.bits();
        }
        if !matches!(size, PageSize::Size4K) {
            raw |= EptFlags::PAGE_SIZE.bits();
        }
        Self(raw)
    }

    /// A non-leaf entry referencing the table at `address` with `rights`.
    pub const fn table(address: u64, rights: Rights) -> Self {
        Self((address & ADDRESS_MASK_52) | rwx_bits(rights))
    }

    /// The flag bits.
    pub const fn flags(self) -> EptFlags {
        EptFlags::from_bits_retain(self.0)
    }

    /// Bits 2:0 as rights.
    pub const fn rights(self) -> Rights {
        Rights::from_bits_truncate((self.0 & 0b111) as u8)
    }

    /// Whether the entry is present: any of bits 2:0 set (Vol. 3C §29.3.2; with mode-based
    /// execute control bit 10 would count too, which this crate does not offer).
    pub const fn is_present(self) -> bool {
        self.0 & 0b111 != 0
    }

    /// The raw memory-type field, bits 5:3.
    pub const fn memtype_bits(self) -> u8 {
        ((self.0 & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT) as u8
    }

    /// Bits 51:12 (the caller masks to the page size of a leaf).
    pub const fn address(self) -> u64 {
        self.0 & ADDRESS_MASK_52
    }
}

const fn rwx_bits(rights: Rights) -> u64 {
    (rights.bits() & 0b111) as u64
}

/// EPTP bits 5:3: page-walk length minus one.
pub const EPTP_WALK_LENGTH_SHIFT: u32 = 3;

/// The extended-page-table pointer, VMCS field 0x201A (Vol. 3C §25.6.11, Table 25-9).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct Eptp(pub u64);

/// Why an EPT pointer is not acceptable (the VM-entry checks of Vol. 3C §27.2.1.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum EptpError {
    /// Bits 2:0 are neither UC (0) nor WB (6).
    MemoryType,
    /// Bits 5:3 are not 3 (4-level EPT; 5-level is not offered).
    WalkLength,
    /// Bit 6 (accessed/dirty flags) set where not offered.
    AccessedDirty,
    /// Bits 11:7 or bits above the physical-address width set.
    Reserved,
}

impl Eptp {
    /// Bit 6: enable accessed and dirty flags for EPT (§29.3.5).
    pub const ACCESSED_DIRTY: u64 = 1 << 6;

    /// A 4-level EPTP for the PML4 table at `pml4`, write-back, with or without A/D flags.
    pub const fn new(pml4: u64, accessed_dirty: bool) -> Self {
        let mut raw =
            (pml4 & ADDRESS_MASK_52) | (MemType::WriteBack as u64) | (3 << EPTP_WALK_LENGTH_SHIFT);
        if accessed_dirty {
            raw |= Self::ACCESSED_DIRTY;
        }
        Self(raw)
    }

    /// The EPT paging-structure memory type, bits 2:0.
    pub const fn memtype_bits(self) -> u8 {
        (self.0 & 0b111) as u8
    }

    /// Page-walk length minus one, bits 5:3.
    pub const fn walk_length_minus_one(self) -> u8 {
        ((self.0 >> EPTP_WALK_LENGTH_SHIFT) & 0b111) as u8
    }

    /// Whether bit 6 enables EPT accessed and dirty flags.
    pub const fn accessed_dirty(self) -> bool {
        self.0 & Self::ACCESSED_DIRTY != 0
    }

    /// The EPT root table address (EPTRTA, bits N-1:12). INVEPT single-context and the
    /// processor's caches key translations by this address, not by the whole EPTP
    /// (Vol. 3C §29.4.1).
    pub const fn root(self) -> u64 {
        self.0 & ADDRESS_MASK_52
    }

    /// Checks the EPTP as VM entry does (Vol. 3C §27.2.1.1), for a processor offering UC and
    /// WB paging-structure types, 4-level walks only, `accessed_dirty_supported`, and a
    /// physical-address width of `max_phys_bits`.
    pub const fn check(
        self,
        accessed_dirty_supported: bool,
        max_phys_bits: u8,
    ) -> Result<(), EptpError> {
        let mt = self.memtype_bits();
        if mt != MemType::Uncacheable as u8 && mt != MemType::WriteBack as u8 {
            return Err(EptpError::MemoryType);
        }
        if self.walk_length_minus_one() != 3 {
            return Err(EptpError::WalkLength);
        }
        if self.accessed_dirty() && !accessed_dirty_supported {
            return Err(EptpError::AccessedDirty);
        }
        if self.0 & 0xf80 != 0 || self.0 & !physical_mask(max_phys_bits) & !0xfff != 0 {
            return Err(EptpError::Reserved);
        }
        Ok(())
    }
}

/// Mask of the bits below `max_phys_bits` (clamped to 12..=52).
pub const fn physical_mask(max_phys_bits: u8) -> u64 {
    let bits = if max_phys_bits < 12 {
        12
    } else if max_phys_bits > 52 {
        52
    } else {
        max_phys_bits
    };
    (1u64 << bits) - 1
}

bitflags! {
    /// Flag bits of a 4-level paging entry (Vol. 3A §4.5, Tables 4-15 to 4-20).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct PagingFlags: u64 {
        /// Bit 0: present.
        const PRESENT = 1 << 0;
        /// Bit 1: read/write.
        const WRITABLE = 1 << 1;
        /// Bit 2: user/supervisor.
        const USER = 1 << 2;
        /// Bit 3: page-level write-through.
        const WRITE_THROUGH = 1 << 3;
        /// Bit 4: page-level cache disable.
        const CACHE_DISABLE = 1 << 4;
        /// Bit 5: accessed.
        const ACCESSED = 1 << 5;
        /// Bit 6 of a leaf: dirty.
        const DIRTY = 1 << 6;
        /// Bit 7 of a PDPTE or PDE: page size (maps a 1 GiB or 2 MiB page). Reserved in a
        /// PML4E; the PAT bit in a PTE.
        const PAGE_SIZE = 1 << 7;
        /// Bit 8 of a leaf: global.
        const GLOBAL = 1 << 8;
        /// Bit 12 of a 2 MiB or 1 GiB leaf: PAT.
        const LARGE_PAT = 1 << 12;
        /// Bit 63: execute-disable (reserved unless IA32_EFER.NXE = 1).
        const EXECUTE_DISABLE = 1 << 63;
    }
}

/// The memory-type selection bits of a 4-level paging leaf: PAT, PCD and PWT
/// (Vol. 3A §13.12.3, "Selecting a Memory Type from the PAT"): an index into IA32_PAT.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct PatIndex(pub u8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_match_the_levels_that_map_them() {
        assert_eq!(PageSize::Size4K.bytes(), 4096);
        assert_eq!(PageSize::Size2M.bytes(), 2 << 20);
        assert_eq!(PageSize::Size1G.bytes(), 1 << 30);
        for size in PageSize::DESCENDING {
            assert_eq!(PageSize::at_level(size.level()), Some(size));
        }
        assert_eq!(PageSize::at_level(4), None);
    }

    #[test]
    fn memory_types_2_3_and_7_are_reserved() {
        for bits in 0..8u8 {
            let decoded = MemType::from_bits(bits);
            assert_eq!(decoded.is_none(), matches!(bits, 2 | 3 | 7));
            if let Some(mt) = decoded {
                assert_eq!(mt.bits(), bits);
            }
        }
    }

    #[test]
    fn leaf_entry_encodes_fields_at_sdm_bit_positions() {
        let e = EptEntry::leaf(
            0x4020_0000,
            PageSize::Size2M,
            Rights::READ | Rights::EXECUTE,
            MemType::WriteThrough,
            true,
        );
        assert_eq!(e.0, 0x4020_0000 | 0b101 | (4 << 3) | (1 << 6) | (1 << 7));
        assert_eq!(e.rights(), Rights::READ | Rights::EXECUTE);
        assert_eq!(e.memtype_bits(), 4);
        assert!(
            e.flags()
                .contains(EptFlags::IGNORE_PAT | EptFlags::PAGE_SIZE)
        );
        let pte = EptEntry::leaf(
            0x5000,
            PageSize::Size4K,
            Rights::READ,
            MemType::WriteBack,
            false,
        );
        assert!(!pte.flags().contains(EptFlags::PAGE_SIZE));
    }

    #[test]
    fn eptp_vm_entry_checks_accept_wb_4_level_only() {
        let ok = Eptp::new(0x1000, false);
        assert_eq!(ok.0, 0x1000 | 6 | (3 << 3));
        assert_eq!(ok.check(false, 46), Ok(()));
        assert_eq!(
            Eptp(0x1000 | 5 | (3 << 3)).check(true, 46),
            Err(EptpError::MemoryType)
        );
        assert_eq!(
            Eptp(0x1000 | 6 | (4 << 3)).check(true, 46),
            Err(EptpError::WalkLength)
        );
        assert_eq!(
            Eptp::new(0x1000, true).check(false, 46),
            Err(EptpError::AccessedDirty)
        );
        assert_eq!(Eptp::new(0x1000, true).check(true, 46), Ok(()));
        assert_eq!(
            Eptp(ok.0 | 1 << 8).check(true, 46),
            Err(EptpError::Reserved)
        );
        assert_eq!(
            Eptp(ok.0 | 1 << 47).check(true, 46),
            Err(EptpError::Reserved)
        );
        assert_eq!(ok.root(), 0x1000);
    }
}
