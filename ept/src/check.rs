//! The checks the processor makes on an EPT walk: misconfigurations, violations and the
//! exit qualification it reports, applied to L1's EPT exactly as hardware would.
//!
//! - [`classify_ept_entry`]: what an entry means at a level, or why it is an EPT
//!   misconfiguration (Vol. 3C §29.3.3.1).
//! - [`translate_l1`]: a walk of L1's EPT for one access, ending in a translation, an EPT
//!   violation with the rights the qualification reports, a misconfiguration, or an
//!   unreadable L1 table page (which is L0's business, not L1's).
//! - [`EptViolationQualification`]: the exit qualification for EPT violations, bit for bit
//!   as Vol. 3C §28.2.1, Table 28-7 defines it, and [`reflected_qualification`], the value
//!   to give L1 for a violation of its EPT.
//!
//! Precedence follows the SDM's walk: entries are examined root first; a not-present entry
//! ends the walk with a violation before anything below it is read; a misconfigured entry
//! ends it with a misconfiguration even if an entry above it lacked the access's rights;
//! rights are judged only on a complete translation (AND across all levels).

use bitflags::bitflags;

use crate::entry::{ADDRESS_MASK_52, EptFlags, Eptp, MemType, Rights, physical_mask};
use crate::walk::{Decoded, Ept, EptAttributes, InvalidEntry, Level, PhysMemory, Translation};
use crate::walk::{WalkError, walk};

/// What the (virtual) processor offers, as IA32_VMX_EPT_VPID_CAP and CPUID would say
/// (Vol. 3D Appendix A.10). The nested server presents these to L1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EptCapabilities {
    /// MAXPHYADDR: entry address bits at or above it are reserved.
    pub max_phys_bits: u8,
    /// Execute-only translations (bit 0 of IA32_VMX_EPT_VPID_CAP).
    pub execute_only: bool,
    /// 1 GiB EPT pages (bit 17).
    pub pages_1g: bool,
    /// Accessed and dirty flags for EPT (bit 21).
    pub accessed_dirty: bool,
}

impl Default for EptCapabilities {
    fn default() -> Self {
        Self {
            max_phys_bits: 46,
            execute_only: true,
            pages_1g: true,
            accessed_dirty: true,
        }
    }
}

/// Bits 7:3 of a PML4E: reserved (Table 29-1).
const PML4E_RESERVED: u64 = 0xf8;
/// Bits 6:3 of a non-leaf PDPTE or PDE: reserved (Tables 29-3 and 29-5).
const TABLE_RESERVED: u64 = 0x78;
/// Bits 29:12 of a 1 GiB leaf: reserved (Table 29-2).
const LEAF_1G_RESERVED: u64 = 0x3fff_f000;
/// Bits 20:12 of a 2 MiB leaf: reserved (Table 29-4).
const LEAF_2M_RESERVED: u64 = 0x1f_f000;

/// Decodes an EPT entry at `level` for a processor with `caps`, reporting the EPT
/// misconfiguration conditions of Vol. 3C §29.3.3.1 as [`Decoded::Invalid`]:
/// - bit 0 clear and bit 1 set (write without read);
/// - bits 2:0 = 100b (execute-only) when execute-only translations are not supported;
/// - a present entry with a reserved bit set: address bits at or above MAXPHYADDR, bits 7:3
///   of a PML4E, bits 6:3 of a non-leaf PDPTE/PDE, bits 29:12 / 20:12 of a 1 GiB / 2 MiB
///   leaf, bit 7 of a PDPTE where 1 GiB pages are not supported;
/// - a leaf whose memory type (bits 5:3) is 2, 3 or 7.
///
/// An entry with bits 2:0 clear is not present whatever its other bits (mode-based execute
/// control, which would make bit 10 count, is not offered).
pub fn classify_ept_entry(
    caps: &EptCapabilities,
    level: Level,
    raw: u64,
) -> Decoded<EptAttributes> {
    let rwx = raw & 0b111;
    if rwx == 0 {
        return Decoded::NotPresent;
    }
    if rwx & 0b011 == 0b010 {
        return Decoded::Invalid(InvalidEntry::WriteWithoutRead);
    }
    if rwx == 0b100 && !caps.execute_only {
        return Decoded::Invalid(InvalidEntry::ExecuteOnlyUnsupported);
    }
    let flags = EptFlags::from_bits_retain(raw);
    let large = flags.contains(EptFlags::PAGE_SIZE);
    let mut reserved = ADDRESS_MASK_52 & !physical_mask(caps.max_phys_bits);
    let leaf_size = match level.number() {
        4 => {
            reserved |= PML4E_RESERVED;
            None
        }
        3 if large => {
            if !caps.pages_1g {
                return Decoded::Invalid(InvalidEntry::PageSizeUnsupported);
            }
            reserved |= LEAF_1G_RESERVED;
            level.leaf_size()
        }
        2 if large => {
            reserved |= LEAF_2M_RESERVED;
            level.leaf_size()
        }
        1 => level.leaf_size(),
        _ => {
            reserved |= TABLE_RESERVED;
            None
        }
    };
    if raw & reserved != 0 {
        return Decoded::Invalid(InvalidEntry::ReservedBits(raw & reserved));
    }
    let rights = Rights::from_bits_truncate(rwx as u8);
    let Some(size) = leaf_size else {
        return Decoded::Table {
            address: raw & ADDRESS_MASK_52,
            rights,
        };
    };
    let mt_bits = ((raw >> 3) & 0b111) as u8;
    let Some(memtype) = MemType::from_bits(mt_bits) else {
        return Decoded::Invalid(InvalidEntry::ReservedMemoryType(mt_bits));
    };
    let attributes = EptAttributes {
        memtype,
        ignore_pat: flags.contains(EptFlags::IGNORE_PAT),
        accessed: flags.contains(EptFlags::ACCESSED),
        dirty: flags.contains(EptFlags::DIRTY),
    };
    Decoded::Leaf {
        address: size.align_down(raw & ADDRESS_MASK_52),
        size,
        rights,
        attributes,
    }
}

bitflags! {
    /// Exit qualification for EPT violations (Vol. 3C §28.2.1, Table 28-7). Bit positions are
    /// the SDM's; bits 63:17 are reserved and never set by this crate.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct EptViolationQualification: u64 {
        /// Bit 0: the access was a data read.
        const DATA_READ = 1 << 0;
        /// Bit 1: the access was a data write (with EPT A/D enabled, guest paging-structure
        /// accesses count as writes).
        const DATA_WRITE = 1 << 1;
        /// Bit 2: the access was an instruction fetch.
        const INSTRUCTION_FETCH = 1 << 2;
        /// Bit 3: AND of bit 0 (read) of the EPT entries used: the address was readable.
        const READABLE = 1 << 3;
        /// Bit 4: AND of bit 1 (write): writable.
        const WRITABLE = 1 << 4;
        /// Bit 5: AND of bit 2 (execute; supervisor-mode with mode-based execute control).
        const EXECUTABLE = 1 << 5;
        /// Bit 6: AND of bit 10 (user-mode execute) with mode-based execute control;
        /// otherwise undefined (this crate reports 0).
        const USER_EXECUTABLE = 1 << 6;
        /// Bit 7: the guest linear-address field is valid.
        const GUEST_LINEAR_ADDRESS_VALID = 1 << 7;
        /// Bit 8 (if bit 7 is set): the access was to the translation of a linear address;
        /// clear means an access to a guest paging-structure entry.
        const TRANSLATED_ACCESS = 1 << 8;
        /// Bit 9 (advanced VM-exit information): the linear address was user-mode.
        const USER_MODE_LINEAR_ADDRESS = 1 << 9;
        /// Bit 10 (advanced VM-exit information): the linear address was writable.
        const WRITABLE_LINEAR_ADDRESS = 1 << 10;
        /// Bit 11 (advanced VM-exit information): the linear address was execute-disabled.
        const EXECUTE_DISABLE_LINEAR_ADDRESS = 1 << 11;
        /// Bit 12: NMI unblocking due to IRET.
        const NMI_UNBLOCKING = 1 << 12;
        /// Bit 13: shadow-stack access.
        const SHADOW_STACK = 1 << 13;
        /// Bit 14: supervisor shadow-stack control (with that feature).
        const SUPERVISOR_SHADOW_STACK = 1 << 14;
        /// Bit 15: related to guest-paging verification.
        const GUEST_PAGING_VERIFICATION = 1 << 15;
        /// Bit 16: asynchronous to instruction execution (for example a trace-output access).
        const ASYNCHRONOUS = 1 << 16;
    }
}

impl EptViolationQualification {
    /// Bits 2:0, the access.
    pub const ACCESS_MASK: Self = Self::DATA_READ
        .union(Self::DATA_WRITE)
        .union(Self::INSTRUCTION_FETCH);
    /// Bits 5:3, the rights of the entries used.
    pub const RIGHTS_MASK: Self = Self::READABLE.union(Self::WRITABLE).union(Self::EXECUTABLE);
    /// Bits 16:7: facts about the access (linear address, NMI unblocking, shadow stack, ...)
    /// that belong to the instruction, not to any EPT.
    pub const ACCESS_FACTS_MASK: Self = Self::from_bits_truncate(0x1_ff80);

    /// A qualification for `access` with nothing else known.
    pub const fn for_access(access: Rights) -> Self {
        Self::from_bits_truncate((access.bits() & 0b111) as u64)
    }

    /// The access that faulted (bits 2:0), as rights it needed.
    pub const fn access(self) -> Rights {
        Rights::from_bits_truncate((self.bits() & 0b111) as u8)
    }

    /// The rights of the EPT entries used (bits 5:3).
    pub const fn entry_rights(self) -> Rights {
        Rights::from_bits_truncate(((self.bits() >> 3) & 0b111) as u8)
    }

    /// `self` with bits 5:3 set from `rights`.
    pub const fn with_entry_rights(self, rights: Rights) -> Self {
        let cleared = self.bits() & !Self::RIGHTS_MASK.bits();
        Self::from_bits_truncate(cleared | (((rights.bits() & 0b111) as u64) << 3))
    }
}

/// The qualification to report to L1 for a violation of L1's EPT: the access and the facts
/// about it (bits 2:0 and 16:7) from the qualification the processor gave for the shadow EPT,
/// and bits 5:3 from L1's own walk (`l1_rights`, the AND across L1's entries, empty when an
/// entry was not present). Bit 6 is 0 (mode-based execute control is not offered).
pub fn reflected_qualification(
    incoming: EptViolationQualification,
    l1_rights: Rights,
) -> EptViolationQualification {
    let kept = incoming
        & (EptViolationQualification::ACCESS_MASK | EptViolationQualification::ACCESS_FACTS_MASK);
    kept.with_entry_rights(l1_rights)
}

/// How a walk of L1's EPT for one access failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum L1Fault {
    /// An EPT violation of L1's EPT; `entry_rights` is the AND of the rights of the entries
    /// used (empty if one was not present), for qualification bits 5:3.
    Violation {
        /// Rights ANDed across the entries used.
        entry_rights: Rights,
    },
    /// An EPT misconfiguration of L1's EPT.
    Misconfiguration,
    /// L1's EPT table page at `table` (an L1 guest-physical address) could not be read: L0
    /// does not back it. Not L1's fault: the L0 pager must act.
    TableUnreadable {
        /// L1 guest-physical address of the table.
        table: u64,
    },
}

/// Translates L2 guest-physical `gpa` through L1's EPT rooted at `eptp` for `access`, with
/// the checks the processor makes. `memory` is L1 guest-physical memory.
pub fn translate_l1<M: PhysMemory + ?Sized>(
    caps: &EptCapabilities,
    memory: &M,
    eptp: Eptp,
    gpa: u64,
    access: Rights,
) -> Result<Translation<EptAttributes>, L1Fault> {
    let format = Ept {
        capabilities: *caps,
    };
    match walk(&format, memory, eptp.root(), gpa) {
        Ok(t) if t.rights.contains(access & Rights::RWX) => Ok(t),
        Ok(t) => Err(L1Fault::Violation {
            entry_rights: t.rights & Rights::RWX,
        }),
        Err(WalkError::NotPresent { .. }) => Err(L1Fault::Violation {
            entry_rights: Rights::empty(),
        }),
        Err(WalkError::Invalid { .. }) => Err(L1Fault::Misconfiguration),
        Err(WalkError::Memory { table, .. }) => Err(L1Fault::TableUnreadable { table }),
    }
}

/// How a two-level translation (L2 linear → L2 guest-physical → L1 guest-physical) failed.
/// This is the distinction the emulation of an L2 access needs: a fault of L2's own paging
/// goes to L2 as a page fault; a fault of L1's EPT goes to L1 as an EPT exit, with
/// qualification bit 8 telling an access to a paging-structure entry from the final access.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TwoLevelFault {
    /// L2's page tables do not allow the access: a page fault for L2.
    GuestPageFault {
        /// Why the walk of L2's tables failed (not present, reserved bits, rights).
        reason: GuestPageFaultReason,
    },
    /// L1's EPT failed for L2 guest-physical `gpa`.
    GuestEptFault {
        /// The L2 guest-physical address.
        gpa: u64,
        /// The fault of L1's EPT (or L0's, for an unreadable L1 table page).
        fault: L1Fault,
        /// Whether `gpa` held one of L2's paging-structure entries (qualification bit 8
        /// clear) rather than the final access (bit 8 set).
        paging_structure: bool,
    },
}

/// Why L2's own paging refused an access.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum GuestPageFaultReason {
    /// An entry was not present.
    NotPresent,
    /// An entry had reserved bits set.
    Reserved,
    /// The rights ANDed across L2's entries do not allow the access.
    Rights,
}

/// Translates L2 linear address `linear` for `access` through L2's 4-level page tables
/// (`cr3`, an L2 guest-physical address, walked with `paging`) and, for every table read and
/// for the final address, through L1's EPT (`eptp`), reading L1 memory `memory`: the walk an
/// emulator of an L2 instruction must make. Returns the L1 guest-physical address.
pub fn translate_two_level<M: PhysMemory + ?Sized>(
    caps: &EptCapabilities,
    memory: &M,
    eptp: Eptp,
    paging: &crate::walk::X86Paging,
    cr3: u64,
    linear: u64,
    access: Rights,
) -> Result<u64, TwoLevelFault> {
    /// L2 guest-physical memory: each read goes through L1's EPT; the first EPT fault is kept.
    struct L2Memory<'a, M: ?Sized> {
        caps: &'a EptCapabilities,
        memory: &'a M,
        eptp: Eptp,
        fault: core::cell::Cell<Option<(u64, L1Fault)>>,
    }
    impl<M: PhysMemory + ?Sized> PhysMemory for L2Memory<'_, M> {
        fn read_u64(&self, address: u64) -> Result<u64, crate::walk::MemoryError> {
            match translate_l1(self.caps, self.memory, self.eptp, address, Rights::READ) {
                Ok(t) => self.memory.read_u64(t.address).inspect_err(|_| {
                    let table = t.address & !0xfff;
                    self.fault
                        .set(Some((address, L1Fault::TableUnreadable { table })));
                }),
                Err(fault) => {
                    self.fault.set(Some((address, fault)));
                    Err(crate::walk::MemoryError::NotBacked { address })
                }
            }
        }
    }
    let l2 = L2Memory {
        caps,
        memory,
        eptp,
        fault: core::cell::Cell::new(None),
    };
    let fault = |reason| TwoLevelFault::GuestPageFault { reason };
    let t = match walk(paging, &l2, cr3, linear) {
        Ok(t) if t.rights.contains(access) => t,
        Ok(_) => return Err(fault(GuestPageFaultReason::Rights)),
        Err(WalkError::NotPresent { .. }) => return Err(fault(GuestPageFaultReason::NotPresent)),
        Err(WalkError::Invalid { .. }) => return Err(fault(GuestPageFaultReason::Reserved)),
        Err(WalkError::Memory { table, .. }) => {
            let (gpa, fault) = l2
                .fault
                .get()
                .unwrap_or((table, L1Fault::TableUnreadable { table }));
            return Err(TwoLevelFault::GuestEptFault {
                gpa,
                fault,
                paging_structure: true,
            });
        }
    };
    match translate_l1(caps, memory, eptp, t.address, access & Rights::RWX) {
        Ok(l1) => Ok(l1.address),
        Err(fault) => Err(TwoLevelFault::GuestEptFault {
            gpa: t.address,
            fault,
            paging_structure: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{EptEntry, PageSize};

    fn caps() -> EptCapabilities {
        EptCapabilities::default()
    }

    fn is_misconfig(d: Decoded<EptAttributes>) -> bool {
        matches!(d, Decoded::Invalid(_))
    }

    #[test]
    fn write_without_read_is_a_misconfiguration_at_every_level() {
        for n in 1..=4 {
            let level = Level::new(n).unwrap();
            assert!(is_misconfig(classify_ept_entry(
                &caps(),
                level,
                0x1000 | 0b010
            )));
            assert!(is_misconfig(classify_ept_entry(
                &caps(),
                level,
                0x1000 | 0b110
            )));
        }
    }

    #[test]
    fn execute_only_is_a_misconfiguration_only_where_unsupported() {
        let leaf = EptEntry::leaf(
            0x1000,
            PageSize::Size4K,
            Rights::EXECUTE,
            MemType::WriteBack,
            false,
        );
        assert!(matches!(
            classify_ept_entry(&caps(), Level::PT, leaf.0),
            Decoded::Leaf { .. }
        ));
        let no_xo = EptCapabilities {
            execute_only: false,
            ..caps()
        };
        assert_eq!(
            classify_ept_entry(&no_xo, Level::PT, leaf.0),
            Decoded::Invalid(InvalidEntry::ExecuteOnlyUnsupported)
        );
    }

    #[test]
    fn not_present_entries_are_never_misconfigured() {
        // Garbage in every bit but 2:0 is still just "not present".
        for level in 1..=4 {
            let d = classify_ept_entry(&caps(), Level::new(level).unwrap(), !0b111);
            assert_eq!(d, Decoded::NotPresent);
        }
    }

    #[test]
    fn reserved_memory_types_are_misconfigurations_in_leaves_only() {
        for mt in [2u64, 3, 7] {
            let raw = 0x1000 | 0b001 | (mt << 3);
            assert_eq!(
                classify_ept_entry(&caps(), Level::PT, raw),
                Decoded::Invalid(InvalidEntry::ReservedMemoryType(mt as u8))
            );
            let large = 0x20_0000 | 0b001 | (mt << 3) | (1 << 7);
            assert!(is_misconfig(classify_ept_entry(&caps(), Level::PD, large)));
        }
        // In a non-leaf PDE, bits 6:3 are reserved whatever their value means elsewhere.
        assert!(is_misconfig(classify_ept_entry(
            &caps(),
            Level::PD,
            0x1000 | 1 | (6 << 3)
        )));
        // Bit 7 of a PTE is ignored.
        let pte = 0x1000 | 1 | (6 << 3) | (1 << 7);
        assert!(matches!(
            classify_ept_entry(&caps(), Level::PT, pte),
            Decoded::Leaf { .. }
        ));
    }

    #[test]
    fn reserved_bits_are_misconfigurations_per_level() {
        // PML4E bits 7:3.
        for bit in 3..=7 {
            assert!(is_misconfig(classify_ept_entry(
                &caps(),
                Level::ROOT_4,
                0x1000 | 1 | (1 << bit)
            )));
        }
        // 1 GiB leaf bits 29:12; 2 MiB leaf bits 20:12.
        let g = 0x4000_0000 | 1 | (6 << 3) | (1 << 7);
        assert!(matches!(
            classify_ept_entry(&caps(), Level::PDPT, g),
            Decoded::Leaf { .. }
        ));
        assert!(is_misconfig(classify_ept_entry(
            &caps(),
            Level::PDPT,
            g | (1 << 20)
        )));
        let m = 0x20_0000 | 1 | (6 << 3) | (1 << 7);
        assert!(is_misconfig(classify_ept_entry(
            &caps(),
            Level::PD,
            m | (1 << 12)
        )));
        // Address bits above MAXPHYADDR.
        assert!(is_misconfig(classify_ept_entry(
            &caps(),
            Level::PT,
            (1 << 46) | 1 | (6 << 3)
        )));
        let wide = EptCapabilities {
            max_phys_bits: 52,
            ..caps()
        };
        assert!(!is_misconfig(classify_ept_entry(
            &wide,
            Level::PT,
            (1 << 46) | 1 | (6 << 3)
        )));
        // Ignored bits (11, 62:52) are fine.
        assert!(!is_misconfig(classify_ept_entry(
            &caps(),
            Level::PT,
            0x1000 | 1 | (6 << 3) | (1 << 11) | (1 << 62)
        )));
    }

    #[test]
    fn one_gib_pages_are_misconfigurations_where_unsupported() {
        let no_1g = EptCapabilities {
            pages_1g: false,
            ..caps()
        };
        let g = 0x4000_0000 | 1 | (6 << 3) | (1 << 7);
        assert_eq!(
            classify_ept_entry(&no_1g, Level::PDPT, g),
            Decoded::Invalid(InvalidEntry::PageSizeUnsupported)
        );
    }

    #[test]
    fn qualification_bits_are_at_table_28_7_positions() {
        assert_eq!(EptViolationQualification::DATA_WRITE.bits(), 2);
        assert_eq!(EptViolationQualification::EXECUTABLE.bits(), 1 << 5);
        assert_eq!(
            EptViolationQualification::GUEST_LINEAR_ADDRESS_VALID.bits(),
            1 << 7
        );
        assert_eq!(EptViolationQualification::NMI_UNBLOCKING.bits(), 1 << 12);
        assert_eq!(EptViolationQualification::ASYNCHRONOUS.bits(), 1 << 16);
        let q =
            EptViolationQualification::for_access(Rights::WRITE).with_entry_rights(Rights::READ);
        assert_eq!(q.bits(), 0b01_010);
        assert_eq!(q.access(), Rights::WRITE);
        assert_eq!(q.entry_rights(), Rights::READ);
    }

    #[test]
    fn reflected_qualification_keeps_access_facts_and_takes_l1_rights() {
        let incoming = EptViolationQualification::DATA_WRITE
            | EptViolationQualification::READABLE
            | EptViolationQualification::WRITABLE
            | EptViolationQualification::GUEST_LINEAR_ADDRESS_VALID
            | EptViolationQualification::TRANSLATED_ACCESS
            | EptViolationQualification::NMI_UNBLOCKING;
        let q = reflected_qualification(incoming, Rights::READ | Rights::EXECUTE);
        assert_eq!(
            q,
            EptViolationQualification::DATA_WRITE
                | EptViolationQualification::READABLE
                | EptViolationQualification::EXECUTABLE
                | EptViolationQualification::GUEST_LINEAR_ADDRESS_VALID
                | EptViolationQualification::TRANSLATED_ACCESS
                | EptViolationQualification::NMI_UNBLOCKING
        );
    }

    #[test]
    fn two_level_translation_tells_guest_page_faults_from_guest_ept_faults() {
        use crate::walk::{MemoryError, X86Paging};
        use std::collections::BTreeMap;
        struct Mem(BTreeMap<u64, u64>);
        impl PhysMemory for Mem {
            fn read_u64(&self, a: u64) -> Result<u64, MemoryError> {
                Ok(self.0.get(&a).copied().unwrap_or(0))
            }
        }
        let mut m = Mem(BTreeMap::new());
        // L1's EPT at 0x1000: identity-maps L2 [0, 2 MiB) with one 2 MiB page, read-only.
        m.0.insert(0x1000, 0x2000 | 0b111);
        m.0.insert(0x2000, 0x3000 | 0b111);
        m.0.insert(0x3000, 0b001 | (6 << 3) | (1 << 7));
        let eptp = Eptp::new(0x1000, false);
        // L2's page tables at L2 0x10_0000: linear 0x40_0000 -> L2 0x5000, writable; linear
        // 0 -> L2 0x4000_0000 (not mapped by L1's EPT).
        m.0.insert(0x10_0000, 0x10_1000 | 0b11);
        m.0.insert(0x10_1000, 0x10_2000 | 0b11);
        m.0.insert(0x10_2000, 0x10_3000 | 0b11);
        m.0.insert(0x10_2000 + 2 * 8, 0x10_4000 | 0b11);
        m.0.insert(0x10_3000, 0x4000_0000 | 0b11);
        m.0.insert(0x10_4000, 0x5000 | 0b11);
        let paging = X86Paging::default();
        let caps = EptCapabilities::default();
        let go = |linear, access| {
            translate_two_level(&caps, &m, eptp, &paging, 0x10_0000, linear, access)
        };
        assert_eq!(go(0x40_0123, Rights::READ), Ok(0x5123));
        assert_eq!(
            go(0x40_0123, Rights::WRITE),
            Err(TwoLevelFault::GuestEptFault {
                gpa: 0x5123,
                fault: L1Fault::Violation {
                    entry_rights: Rights::READ
                },
                paging_structure: false
            })
        );
        assert!(matches!(
            go(0, Rights::READ),
            Err(TwoLevelFault::GuestEptFault {
                gpa: 0x4000_0000,
                paging_structure: false,
                ..
            })
        ));
        assert_eq!(
            go(0x80_0000, Rights::READ),
            Err(TwoLevelFault::GuestPageFault {
                reason: GuestPageFaultReason::NotPresent
            })
        );
        // L2's PML4 itself outside what L1's EPT maps: an EPT fault on a paging structure.
        let r = translate_two_level(&caps, &m, eptp, &paging, 0x4000_0000, 0, Rights::READ);
        assert!(matches!(
            r,
            Err(TwoLevelFault::GuestEptFault {
                gpa: 0x4000_0000,
                paging_structure: true,
                ..
            })
        ));
    }
}
