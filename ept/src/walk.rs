//! The one page-table walker of the project, generic over the entry format and over a
//! physical memory whose reads can fail.
//!
//! Every walk in capvisor goes through here: the kernel's host x86-64 4-level page tables
//! ([`X86Paging`]), L0's EPT of a guest, the shadow EPTs, and the nested server's walk of an L1
//! hypervisor's EPT ([`Ept`]) through L1 guest-physical memory that L0 may revoke at any moment
//! (reads return [`MemoryError`] instead of panicking).
//!
//! Two entry points share the level and index arithmetic and [`PageTableFormat::decode`]:
//! - [`walk`] / [`walk_with`]: one address, root to leaf, with the rights ANDed across levels,
//!   the leaf size, the leaf attributes (memory type) and the path of entries used. A visitor
//!   may replace entries on the way down (the backends use this to build tables).
//! - [`traverse`]: every entry overlapping an address range, children before the table that
//!   holds them, with the option to clear leaves and tables (unmap, flush, enumeration).
//!
//! Both are bounded by construction: a walk descends one level per step and stops at level 1,
//! a traversal visits at most 512 entries per table and never holds more than one table per
//! level, so guest-controlled table contents (cycles, self-references, garbage) cannot make
//! them loop, recurse or index out of bounds.

use crate::check::{self, EptCapabilities};
use crate::entry::{
    ADDRESS_MASK_52, ENTRIES_PER_TABLE, MemType, PAGE_SIZE, PageSize, PagingFlags, PatIndex,
    Rights, physical_mask,
};

const _: () = assert!(ENTRIES_PER_TABLE == 1 << Level::INDEX_BITS);
const _: () = assert!(PAGE_SIZE == (ENTRIES_PER_TABLE * 8) as u64);
const _: () = assert!(Level::ROOT_4.shift() + Level::INDEX_BITS == 48);

/// Why a physical-memory access failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MemoryError {
    /// Nothing backs `address` (for L1 memory: L0 does not map that L1 page right now).
    NotBacked {
        /// The physical address that was accessed.
        address: u64,
    },
    /// A write through a read-only view.
    ReadOnly {
        /// The physical address that was written.
        address: u64,
    },
}

/// Physical memory holding page tables, read 8 bytes at a time. Reads can fail.
pub trait PhysMemory {
    /// Reads the naturally aligned u64 at `address` (callers only pass multiples of 8).
    fn read_u64(&self, address: u64) -> Result<u64, MemoryError>;
}

/// Physical memory that can also be written.
pub trait PhysMemoryMut: PhysMemory {
    /// Writes the naturally aligned u64 at `address`.
    fn write_u64(&mut self, address: u64, value: u64) -> Result<(), MemoryError>;
}

impl<M: PhysMemory + ?Sized> PhysMemory for &M {
    fn read_u64(&self, address: u64) -> Result<u64, MemoryError> {
        (**self).read_u64(address)
    }
}

/// What the walker needs from memory: reads, and writes when a visitor edits entries.
pub trait TableAccess {
    /// Reads the u64 at `address`.
    fn read(&mut self, address: u64) -> Result<u64, MemoryError>;
    /// Writes the u64 at `address`.
    fn write(&mut self, address: u64, value: u64) -> Result<(), MemoryError>;
}

/// A read-only view: writes fail with [`MemoryError::ReadOnly`].
pub struct ReadOnly<'a, M: ?Sized>(pub &'a M);

impl<M: PhysMemory + ?Sized> TableAccess for ReadOnly<'_, M> {
    fn read(&mut self, address: u64) -> Result<u64, MemoryError> {
        self.0.read_u64(address)
    }
    fn write(&mut self, address: u64, _value: u64) -> Result<(), MemoryError> {
        Err(MemoryError::ReadOnly { address })
    }
}

/// A writable view.
pub struct Writable<'a, M: ?Sized>(pub &'a mut M);

impl<M: PhysMemoryMut + ?Sized> TableAccess for Writable<'_, M> {
    fn read(&mut self, address: u64) -> Result<u64, MemoryError> {
        self.0.read_u64(address)
    }
    fn write(&mut self, address: u64, value: u64) -> Result<(), MemoryError> {
        self.0.write_u64(address, value)
    }
}

/// A paging-structure level: 1 holds the entries that map 4 KiB pages (PT), 2 the PD, 3 the
/// PDPT, 4 the PML4 (Vol. 3A §4.5; Vol. 3C §29.3.2). Always in `1..=4`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Level(u8);

impl Level {
    /// Address bits translated per level.
    pub const INDEX_BITS: u32 = 9;
    /// Page table (PT).
    pub const PT: Self = Self(1);
    /// Page directory (PD).
    pub const PD: Self = Self(2);
    /// Page-directory-pointer table (PDPT).
    pub const PDPT: Self = Self(3);
    /// PML4 table: the root of 4-level paging and 4-level EPT.
    pub const ROOT_4: Self = Self(4);

    /// Level `n`, if `1 <= n <= 4`.
    pub const fn new(n: u8) -> Option<Self> {
        if n >= 1 && n <= 4 {
            Some(Self(n))
        } else {
            None
        }
    }

    /// The level number, 1 to 4.
    pub const fn number(self) -> u8 {
        self.0
    }

    /// Position of this level's index field in an address: 12, 21, 30 or 39.
    pub const fn shift(self) -> u32 {
        12 + Self::INDEX_BITS * (self.0 as u32 - 1)
    }

    /// Bytes one entry of this level covers.
    pub const fn span(self) -> u64 {
        1 << self.shift()
    }

    /// The entry index `address` selects in a table of this level.
    pub const fn index(self, address: u64) -> EntryIndex {
        EntryIndex(((address >> self.shift()) & (ENTRIES_PER_TABLE as u64 - 1)) as u16)
    }

    /// The next level down (`None` below the PT).
    pub const fn lower(self) -> Option<Self> {
        if self.0 > 1 {
            Some(Self(self.0 - 1))
        } else {
            None
        }
    }

    /// The size of a page a leaf entry at this level maps (`None` for the PML4).
    pub const fn leaf_size(self) -> Option<PageSize> {
        PageSize::at_level(self.0)
    }

    /// The level whose leaves map `size`.
    pub const fn of_size(size: PageSize) -> Self {
        Self(size.level())
    }
}

/// An index into a 512-entry table. Always below 512: built only by masking.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct EntryIndex(u16);

impl EntryIndex {
    /// Index `i`, if below 512.
    pub const fn new(i: usize) -> Option<Self> {
        if i < ENTRIES_PER_TABLE {
            Some(Self(i as u16))
        } else {
            None
        }
    }

    /// The index as a usize, below 512.
    pub const fn get(self) -> usize {
        self.0 as usize
    }

    /// Byte offset of the entry in its table.
    pub const fn offset(self) -> u64 {
        self.0 as u64 * 8
    }
}

/// Why an entry is unusable. For EPT these are the EPT-misconfiguration conditions of
/// Vol. 3C §29.3.3.1; for 4-level paging, reserved-bit page faults (Vol. 3A §4.7).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum InvalidEntry {
    /// Bit 1 (write) set with bit 0 (read) clear.
    WriteWithoutRead,
    /// Bit 2 (execute) set with bits 1:0 clear on a processor without execute-only support.
    ExecuteOnlyUnsupported,
    /// Reserved bits set (the mask of those set).
    ReservedBits(u64),
    /// A leaf whose memory type is reserved (2, 3 or 7).
    ReservedMemoryType(u8),
    /// Bit 7 set where large pages of that size are not supported.
    PageSizeUnsupported,
}

/// What an entry means to the processor at a given level.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Decoded<A> {
    /// Not present: the walk ends with a fault.
    NotPresent,
    /// References the next-level table at `address` and grants `rights` for everything below.
    Table {
        /// Physical address of the next table.
        address: u64,
        /// Rights this entry grants (ANDed with the other levels).
        rights: Rights,
    },
    /// Maps a page.
    Leaf {
        /// Physical address of the page, aligned to `size`.
        address: u64,
        /// The page size.
        size: PageSize,
        /// Rights this entry grants.
        rights: Rights,
        /// Format-specific leaf attributes (memory type and so on).
        attributes: A,
    },
    /// Unusable: misconfiguration / reserved-bit fault.
    Invalid(InvalidEntry),
}

/// A page-table entry format: what bits mean at each level.
pub trait PageTableFormat {
    /// What a leaf says besides address, size and rights.
    type Attributes: Copy + core::fmt::Debug + PartialEq;
    /// The level of the root table.
    const ROOT_LEVEL: Level;
    /// Decodes `raw` as an entry of a table at `level`. Must never return
    /// [`Decoded::Table`] at level 1 nor [`Decoded::Leaf`] at a level with no leaf size.
    fn decode(&self, level: Level, raw: u64) -> Decoded<Self::Attributes>;
}

/// Leaf attributes of an EPT entry (Vol. 3C Tables 29-2, 29-4 and 29-6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EptAttributes {
    /// Bits 5:3.
    pub memtype: MemType,
    /// Bit 6.
    pub ignore_pat: bool,
    /// Bit 8.
    pub accessed: bool,
    /// Bit 9.
    pub dirty: bool,
}

/// The EPT format for a processor with the given capabilities. Decoding applies the
/// misconfiguration rules of [`check::classify_ept_entry`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Ept {
    /// What the (virtual) processor supports.
    pub capabilities: EptCapabilities,
}

impl PageTableFormat for Ept {
    type Attributes = EptAttributes;
    const ROOT_LEVEL: Level = Level::ROOT_4;

    fn decode(&self, level: Level, raw: u64) -> Decoded<EptAttributes> {
        check::classify_ept_entry(&self.capabilities, level, raw)
    }
}

/// The EPT format for tables their owner built itself (the kernel's EPT objects, whose every
/// entry it wrote from validated values): the same bit meanings as [`Ept`], without the
/// misconfiguration checks that tables written by a guest need. Decodes exactly like
/// [`Ept`] for every entry that [`Ept`] accepts (tested below).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct TrustedEpt;

impl PageTableFormat for TrustedEpt {
    type Attributes = EptAttributes;
    const ROOT_LEVEL: Level = Level::ROOT_4;

    fn decode(&self, level: Level, raw: u64) -> Decoded<EptAttributes> {
        let rwx = raw & 0b111;
        if rwx == 0 {
            return Decoded::NotPresent;
        }
        let rights = Rights::from_bits_truncate(rwx as u8);
        let large = raw & (1 << 7) != 0 && matches!(level.number(), 2 | 3);
        let Some(size) = level.leaf_size().filter(|_| large || level.number() == 1) else {
            return Decoded::Table {
                address: raw & ADDRESS_MASK_52,
                rights,
            };
        };
        let Some(memtype) = MemType::from_bits(((raw >> 3) & 0b111) as u8) else {
            return Decoded::Invalid(crate::walk::InvalidEntry::ReservedMemoryType(
                ((raw >> 3) & 0b111) as u8,
            ));
        };
        Decoded::Leaf {
            address: raw & ADDRESS_MASK_52 & !size.offset_mask(),
            size,
            rights,
            attributes: EptAttributes {
                memtype,
                ignore_pat: raw & (1 << 6) != 0,
                accessed: raw & (1 << 8) != 0,
                dirty: raw & (1 << 9) != 0,
            },
        }
    }
}

/// Leaf attributes of a 4-level paging entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PagingAttributes {
    /// PAT/PCD/PWT as a PAT index.
    pub pat: PatIndex,
    /// Global (bit 8).
    pub global: bool,
    /// Dirty (bit 6).
    pub dirty: bool,
}

/// x86-64 4-level paging (IA-32e mode, CR4.LA57 = 0; Vol. 3A §4.5), as the kernel uses it for
/// its own and its processes' address spaces.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct X86Paging {
    /// MAXPHYADDR (CPUID.80000008H:EAX[7:0]).
    pub max_phys_bits: u8,
    /// IA32_EFER.NXE: bit 63 is execute-disable; otherwise it is reserved.
    pub nxe: bool,
    /// 1 GiB pages supported (CPUID.80000001H:EDX.Page1GB[bit 26]).
    pub pages_1g: bool,
}

impl Default for X86Paging {
    fn default() -> Self {
        Self {
            max_phys_bits: 46,
            nxe: true,
            pages_1g: true,
        }
    }
}

impl PageTableFormat for X86Paging {
    type Attributes = PagingAttributes;
    const ROOT_LEVEL: Level = Level::ROOT_4;

    fn decode(&self, level: Level, raw: u64) -> Decoded<PagingAttributes> {
        let flags = PagingFlags::from_bits_retain(raw);
        if !flags.contains(PagingFlags::PRESENT) {
            return Decoded::NotPresent;
        }
        let mut reserved = ADDRESS_MASK_52 & !physical_mask(self.max_phys_bits);
        if !self.nxe {
            reserved |= PagingFlags::EXECUTE_DISABLE.bits();
        }
        let large = flags.contains(PagingFlags::PAGE_SIZE);
        let leaf_size = match level.number() {
            4 => {
                reserved |= PagingFlags::PAGE_SIZE.bits(); // Table 4-15: bit 7 reserved.
                None
            }
            3 if large => {
                if !self.pages_1g {
                    return Decoded::Invalid(InvalidEntry::PageSizeUnsupported);
                }
                reserved |= 0x3fff_e000; // Table 4-16: bits 29:13.
                Some(PageSize::Size1G)
            }
            2 if large => {
                reserved |= 0x1f_e000; // Table 4-18: bits 20:13.
                Some(PageSize::Size2M)
            }
            1 => Some(PageSize::Size4K),
            _ => None,
        };
        if raw & reserved != 0 {
            return Decoded::Invalid(InvalidEntry::ReservedBits(raw & reserved));
        }
        let mut rights = Rights::READ;
        if flags.contains(PagingFlags::WRITABLE) {
            rights |= Rights::WRITE;
        }
        if flags.contains(PagingFlags::USER) {
            rights |= Rights::USER;
        }
        if !(self.nxe && flags.contains(PagingFlags::EXECUTE_DISABLE)) {
            rights |= Rights::EXECUTE;
        }
        match leaf_size {
            None => Decoded::Table {
                address: raw & ADDRESS_MASK_52,
                rights,
            },
            Some(size) => {
                let pat_bit = match size {
                    PageSize::Size4K => flags.contains(PagingFlags::PAGE_SIZE),
                    _ => flags.contains(PagingFlags::LARGE_PAT),
                };
                let pat = PatIndex(
                    u8::from(flags.contains(PagingFlags::WRITE_THROUGH))
                        | u8::from(flags.contains(PagingFlags::CACHE_DISABLE)) << 1
                        | u8::from(pat_bit) << 2,
                );
                let attributes = PagingAttributes {
                    pat,
                    global: flags.contains(PagingFlags::GLOBAL),
                    dirty: flags.contains(PagingFlags::DIRTY),
                };
                let address = raw & ADDRESS_MASK_52 & !size.offset_mask();
                Decoded::Leaf {
                    address,
                    size,
                    rights,
                    attributes,
                }
            }
        }
    }
}

/// One entry used by a walk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Step {
    /// Level of the table holding the entry (1 to 4; 0 only in a default value).
    pub level: u8,
    /// Physical address of that table.
    pub table: u64,
    /// Index of the entry in the table.
    pub index: EntryIndex,
    /// The entry's value as read (or as replaced by the visitor).
    pub entry: u64,
}

impl Step {
    /// Physical address of the entry.
    pub const fn entry_address(&self) -> u64 {
        self.table + self.index.offset()
    }
}

/// The entries a walk used, root first. At most four.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Path {
    steps: [Step; 4],
    len: u8,
}

impl Path {
    fn push(&mut self, step: Step) {
        if let Some(slot) = self.steps.get_mut(usize::from(self.len)) {
            *slot = step;
            self.len += 1;
        }
    }

    /// The entries used, root first.
    pub fn steps(&self) -> &[Step] {
        &self.steps[..usize::from(self.len).min(4)]
    }

    /// The last entry used: where the walk stopped.
    pub fn last(&self) -> Option<&Step> {
        self.steps().last()
    }
}

/// A completed translation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Translation<A> {
    /// The physical address the input address translates to.
    pub address: u64,
    /// The physical address of the mapped page (aligned to `size`).
    pub frame: u64,
    /// The leaf size.
    pub size: PageSize,
    /// Rights ANDed across every entry of the walk.
    pub rights: Rights,
    /// The leaf's attributes.
    pub attributes: A,
    /// The entries used; the last is the leaf.
    pub path: Path,
}

impl<A> Translation<A> {
    /// The leaf entry where the walk stopped.
    pub fn leaf(&self) -> Step {
        self.path.last().copied().unwrap_or_default()
    }
}

/// Why a walk did not produce a translation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum WalkError {
    /// The last entry of `path` is not present. The rights ANDed across the walk, which
    /// include that entry's zero bits, are empty.
    NotPresent {
        /// The entries used, ending with the not-present one.
        path: Path,
    },
    /// The last entry of `path` is unusable.
    Invalid {
        /// The entries used, ending with the invalid one.
        path: Path,
        /// What is wrong with it.
        reason: InvalidEntry,
    },
    /// Reading (or, for an editing visitor, writing) the table at `table` failed.
    Memory {
        /// The level of the table that could not be accessed.
        level: u8,
        /// The table's physical address.
        table: u64,
        /// The underlying error.
        error: MemoryError,
    },
}

/// What a walk visitor wants done with the entry it was shown.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Visit {
    /// Interpret the entry as it is.
    Continue,
    /// Write this value into the entry, then interpret it.
    Replace(u64),
    /// End the walk here (the entry is the last of the returned path).
    Stop,
}

/// How a [`walk_with`] ended without a fault.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Outcome<A> {
    /// Reached a leaf.
    Translated(Translation<A>),
    /// The visitor stopped the walk.
    Stopped {
        /// The entries used; the last is where the visitor stopped.
        path: Path,
        /// Rights ANDed across the entries above the last one.
        rights_above: Rights,
    },
}

/// Walks the tables under `root` for `address`, showing each entry to `visit` before it is
/// interpreted. The input address is taken modulo 2^48 (4-level structures translate bits
/// 47:0).
pub fn walk_with<F, T, V>(
    format: &F,
    access: &mut T,
    root: u64,
    address: u64,
    mut visit: V,
) -> Result<Outcome<F::Attributes>, WalkError>
where
    F: PageTableFormat,
    T: TableAccess,
    V: FnMut(&mut T, &Step, &Decoded<F::Attributes>) -> Visit,
{
    let mut level = F::ROOT_LEVEL;
    let mut table = root & ADDRESS_MASK_52;
    let mut rights = Rights::all();
    let mut path = Path::default();
    loop {
        let mut step = Step {
            level: level.number(),
            table,
            index: level.index(address),
            entry: 0,
        };
        let memory_error = |error| WalkError::Memory {
            level: level.number(),
            table,
            error,
        };
        step.entry = access.read(step.entry_address()).map_err(memory_error)?;
        let mut decoded = format.decode(level, step.entry);
        match visit(access, &step, &decoded) {
            Visit::Continue => {}
            Visit::Stop => {
                path.push(step);
                return Ok(Outcome::Stopped {
                    path,
                    rights_above: rights,
                });
            }
            Visit::Replace(value) => {
                access
                    .write(step.entry_address(), value)
                    .map_err(memory_error)?;
                step.entry = value;
                decoded = format.decode(level, value);
            }
        }
        path.push(step);
        match decoded {
            Decoded::NotPresent => return Err(WalkError::NotPresent { path }),
            Decoded::Invalid(reason) => return Err(WalkError::Invalid { path, reason }),
            Decoded::Leaf {
                address: frame,
                size,
                rights: leaf_rights,
                attributes,
            } => {
                let frame = size.align_down(frame);
                return Ok(Outcome::Translated(Translation {
                    address: frame | (address & size.offset_mask()),
                    frame,
                    size,
                    rights: rights & leaf_rights,
                    attributes,
                    path,
                }));
            }
            Decoded::Table {
                address: next,
                rights: table_rights,
            } => {
                rights &= table_rights;
                let Some(lower) = level.lower() else {
                    // A format bug (tables at level 1); treat as reserved rather than loop.
                    return Err(WalkError::Invalid {
                        path,
                        reason: InvalidEntry::ReservedBits(0),
                    });
                };
                level = lower;
                table = next & ADDRESS_MASK_52 & !(PAGE_SIZE - 1);
            }
        }
    }
}

/// Translates `address` through the tables under `root`.
pub fn walk<F: PageTableFormat, M: PhysMemory + ?Sized>(
    format: &F,
    memory: &M,
    root: u64,
    address: u64,
) -> Result<Translation<F::Attributes>, WalkError> {
    match walk_with(format, &mut ReadOnly(memory), root, address, |_, _, _| {
        Visit::Continue
    })? {
        Outcome::Translated(t) => Ok(t),
        // Unreachable with a visitor that never stops; report it as a fault, not a panic.
        Outcome::Stopped { path, .. } => Err(WalkError::NotPresent { path }),
    }
}

/// Why [`install`] or [`remove`] changed nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum EditError {
    /// Something is mapped there already (a leaf, or a table below the requested level).
    Occupied,
    /// Nothing of that size is mapped there.
    NotMapped,
    /// `new_table` had no page for a missing table.
    NoTable,
    /// An entry on the way is unusable, or memory failed.
    Corrupt,
}

/// Installs the leaf entry `leaf` at `level` for `address` under `root`, creating missing
/// tables with `new_table` (which returns the entry referencing a fresh, zeroed table, or
/// `None` when out of pages). The one way the project's page-table owners (the kernel's
/// address spaces and EPT objects) build entries.
pub fn install<F, T>(
    format: &F,
    access: &mut T,
    root: u64,
    address: u64,
    level: Level,
    leaf: u64,
    mut new_table: impl FnMut() -> Option<u64>,
) -> Result<(), EditError>
where
    F: PageTableFormat,
    T: TableAccess,
{
    let target = level.number();
    let mut error = None;
    let result = walk_with(format, access, root, address, |_, step, decoded| {
        if step.level == target {
            return match decoded {
                Decoded::NotPresent => Visit::Replace(leaf),
                _ => {
                    error = Some(EditError::Occupied);
                    Visit::Stop
                }
            };
        }
        match decoded {
            Decoded::Table { .. } => Visit::Continue,
            Decoded::NotPresent => match new_table() {
                Some(entry) => Visit::Replace(entry),
                None => {
                    error = Some(EditError::NoTable);
                    Visit::Stop
                }
            },
            Decoded::Leaf { .. } => {
                error = Some(EditError::Occupied);
                Visit::Stop
            }
            Decoded::Invalid(_) => {
                error = Some(EditError::Corrupt);
                Visit::Stop
            }
        }
    });
    match (error, result) {
        (Some(e), _) => Err(e),
        (None, Ok(_)) => Ok(()),
        (None, Err(_)) => Err(EditError::Corrupt),
    }
}

/// Clears the leaf of `size` that maps `address` under `root`; returns the page it mapped.
/// Tables stay (their owner frees them, or not). The caller invalidates cached translations.
pub fn remove<F, T>(
    format: &F,
    access: &mut T,
    root: u64,
    address: u64,
    size: PageSize,
) -> Result<u64, EditError>
where
    F: PageTableFormat,
    T: TableAccess,
{
    let target = Level::of_size(size).number();
    let mut found = Err(EditError::NotMapped);
    let _ = walk_with(
        format,
        access,
        root,
        address,
        |access, step, decoded| match decoded {
            Decoded::Leaf {
                address: frame,
                size: s,
                ..
            } if step.level == target && *s == size => {
                found = access
                    .write(step.entry_address(), 0)
                    .map(|()| *frame)
                    .map_err(|_| EditError::Corrupt);
                Visit::Stop
            }
            Decoded::Table { .. } if step.level > target => Visit::Continue,
            _ => Visit::Stop,
        },
    );
    found
}

/// What [`traverse`] shows its visitor.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Event<A> {
    /// A leaf overlapping the range (it may extend beyond it).
    Leaf {
        /// Input address the leaf maps (aligned to `size`).
        base: u64,
        /// Output address.
        frame: u64,
        /// Page size.
        size: PageSize,
        /// Rights ANDed from the root to this leaf.
        rights: Rights,
        /// Leaf attributes.
        attributes: A,
        /// The leaf entry.
        step: Step,
    },
    /// All entries of the table at `table` that overlap the range have been shown; `step` is
    /// the entry that references it. Never sent for the root.
    TableDone {
        /// Input address the table's first entry covers.
        base: u64,
        /// Physical address of the table.
        table: u64,
        /// The referencing entry one level up.
        step: Step,
    },
}

/// What the [`traverse`] visitor wants done with what it was shown.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Action {
    /// Leave it.
    Keep,
    /// Write zero into the entry (the leaf, or for `TableDone` the referencing entry).
    Clear,
    /// Stop the traversal.
    Stop,
}

/// Shows `visit` every leaf overlapping `[start, end)` under `root` and, after their
/// children, every table below the root that the range reaches. Not-present and invalid
/// entries are skipped. O(entries in range); at most one table per level is open at a time.
pub fn traverse<F, T, V>(
    format: &F,
    access: &mut T,
    root: u64,
    start: u64,
    end: u64,
    mut visit: V,
) -> Result<(), WalkError>
where
    F: PageTableFormat,
    T: TableAccess,
    V: FnMut(&mut T, Event<F::Attributes>) -> Action,
{
    #[derive(Clone, Copy, Default)]
    struct Open {
        table: u64,
        level: u8,
        base: u64,
        next: u16,
        last: u16,
        rights: Rights,
        parent: Step,
    }
    const TOP: u64 = 1 << 48;
    let end = end.min(TOP);
    if start >= end {
        return Ok(());
    }
    let bounds = |level: Level, base: u64| -> (u16, u16) {
        let span_end = base.saturating_add(level.span() << Level::INDEX_BITS);
        let first = if start > base {
            level.index(start).0
        } else {
            0
        };
        let last = if end < span_end {
            level.index(end - 1).0
        } else {
            511
        };
        (first, last)
    };
    let root_level = F::ROOT_LEVEL;
    let (first, last) = bounds(root_level, 0);
    let mut stack = [Open::default(); 4];
    stack[0] = Open {
        table: root & ADDRESS_MASK_52,
        level: root_level.number(),
        base: 0,
        next: first,
        last,
        rights: Rights::all(),
        parent: Step::default(),
    };
    let mut depth = 1usize;
    while depth > 0 {
        let top = stack[depth - 1];
        let Some(level) = Level::new(top.level) else {
            return Ok(());
        };
        if top.next > top.last {
            depth -= 1;
            if depth == 0 {
                break;
            }
            let event = Event::TableDone {
                base: top.base,
                table: top.table,
                step: top.parent,
            };
            match visit(access, event) {
                Action::Keep => {}
                Action::Stop => return Ok(()),
                Action::Clear => {
                    let at = top.parent.entry_address();
                    access.write(at, 0).map_err(|error| WalkError::Memory {
                        level: top.parent.level,
                        table: top.parent.table,
                        error,
                    })?;
                }
            }
            continue;
        }
        let index = EntryIndex(top.next);
        stack[depth - 1].next += 1;
        let memory_error = |error| WalkError::Memory {
            level: top.level,
            table: top.table,
            error,
        };
        let mut step = Step {
            level: top.level,
            table: top.table,
            index,
            entry: 0,
        };
        step.entry = access.read(step.entry_address()).map_err(memory_error)?;
        let base = top.base + (u64::from(index.0) << level.shift());
        match format.decode(level, step.entry) {
            Decoded::NotPresent | Decoded::Invalid(_) => {}
            Decoded::Leaf {
                address,
                size,
                rights,
                attributes,
            } => {
                let rights = rights & top.rights;
                let frame = size.align_down(address);
                let event = Event::Leaf {
                    base,
                    frame,
                    size,
                    rights,
                    attributes,
                    step,
                };
                match visit(access, event) {
                    Action::Keep => {}
                    Action::Stop => return Ok(()),
                    Action::Clear => access
                        .write(step.entry_address(), 0)
                        .map_err(memory_error)?,
                }
            }
            Decoded::Table { address, rights } => {
                let Some(lower) = level.lower() else { continue };
                if depth >= stack.len() {
                    continue;
                }
                let (first, last) = bounds(lower, base);
                stack[depth] = Open {
                    table: address & ADDRESS_MASK_52 & !(PAGE_SIZE - 1),
                    level: lower.number(),
                    base,
                    next: first,
                    last,
                    rights: rights & top.rights,
                    parent: step,
                };
                depth += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod trusted_tests {
    use super::*;
    use crate::entry::{EptEntry, MemType};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Flat(BTreeMap<u64, u64>);

    impl TableAccess for Flat {
        fn read(&mut self, address: u64) -> Result<u64, MemoryError> {
            Ok(*self.0.get(&address).unwrap_or(&0))
        }
        fn write(&mut self, address: u64, value: u64) -> Result<(), MemoryError> {
            self.0.insert(address, value);
            Ok(())
        }
    }

    #[test]
    fn install_then_remove_round_trips_and_refuses_overlaps() {
        let mut mem = Flat::default();
        let mut next = 0x10_0000u64;
        let mut new_table = || {
            next += 0x1000;
            Some(EptEntry::table(next, Rights::RWX).0)
        };
        let leaf = EptEntry::leaf(
            0x4000_0000,
            PageSize::Size4K,
            Rights::RWX,
            MemType::WriteBack,
            false,
        )
        .0;
        install(
            &TrustedEpt,
            &mut mem,
            0x1000,
            0x20_3000,
            Level::PT,
            leaf,
            &mut new_table,
        )
        .unwrap();
        let t = walk(&TrustedEpt, &Reads(&mem), 0x1000, 0x20_3123).unwrap();
        assert_eq!(t.address, 0x4000_0123);
        let big = EptEntry::leaf(
            0x8000_0000,
            PageSize::Size2M,
            Rights::RWX,
            MemType::WriteBack,
            false,
        )
        .0;
        // The 2 MiB slot holds a table now: a large page there is refused.
        assert_eq!(
            install(
                &TrustedEpt,
                &mut mem,
                0x1000,
                0x20_0000,
                Level::PD,
                big,
                &mut new_table
            ),
            Err(EditError::Occupied)
        );
        assert_eq!(
            install(
                &TrustedEpt,
                &mut mem,
                0x1000,
                0x20_3000,
                Level::PT,
                leaf,
                &mut new_table
            ),
            Err(EditError::Occupied)
        );
        assert_eq!(
            remove(&TrustedEpt, &mut mem, 0x1000, 0x20_3000, PageSize::Size2M),
            Err(EditError::NotMapped)
        );
        assert_eq!(
            remove(&TrustedEpt, &mut mem, 0x1000, 0x20_3000, PageSize::Size4K),
            Ok(0x4000_0000)
        );
        assert!(walk(&TrustedEpt, &Reads(&mem), 0x1000, 0x20_3000).is_err());
        assert_eq!(
            install(
                &TrustedEpt,
                &mut mem,
                0x1000,
                0x40_0000,
                Level::PT,
                leaf,
                || None
            ),
            Err(EditError::NoTable)
        );
    }

    struct Reads<'a>(&'a Flat);

    impl PhysMemory for Reads<'_> {
        fn read_u64(&self, address: u64) -> Result<u64, MemoryError> {
            Ok(*self.0.0.get(&address).unwrap_or(&0))
        }
    }

    proptest! {
        #[test]
        fn trusted_ept_decodes_like_ept_wherever_ept_accepts(raw: u64, level in 1u8..=4) {
            let level = Level::new(level).unwrap();
            // Mostly well-formed entries (address within 46 bits, low flag bits), so that
            // most cases reach the comparison.
            for raw in [raw, raw & (0x0000_3fff_ffff_f000 | 0x3ff)] {
                let checked = Ept::default().decode(level, raw);
                if !matches!(checked, Decoded::Invalid(_)) {
                    prop_assert_eq!(TrustedEpt.decode(level, raw), checked);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{EptEntry, MemType};
    use std::collections::BTreeMap;

    /// Sparse test memory: unbacked pages fail.
    #[derive(Default)]
    struct Sparse(BTreeMap<u64, u64>, Vec<u64>);

    impl Sparse {
        fn backed(mut self, page: u64) -> Self {
            self.1.push(page);
            self
        }
        fn set(&mut self, table: u64, index: usize, value: u64) {
            self.0.insert(table + index as u64 * 8, value);
        }
    }

    impl PhysMemory for Sparse {
        fn read_u64(&self, address: u64) -> Result<u64, MemoryError> {
            if !self.1.contains(&(address & !0xfff)) {
                return Err(MemoryError::NotBacked { address });
            }
            Ok(self.0.get(&address).copied().unwrap_or(0))
        }
    }

    impl PhysMemoryMut for Sparse {
        fn write_u64(&mut self, address: u64, value: u64) -> Result<(), MemoryError> {
            self.0.insert(address, value);
            Ok(())
        }
    }

    fn ept() -> Ept {
        Ept::default()
    }

    fn four_level(mem: &mut Sparse, leaf: u64, rights_upper: Rights) {
        // PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; address 0x40_2000_3000.
        let a = 0x40_2000_3000u64;
        mem.set(
            0x1000,
            Level::ROOT_4.index(a).get(),
            EptEntry::table(0x2000, rights_upper).0,
        );
        mem.set(
            0x2000,
            Level::PDPT.index(a).get(),
            EptEntry::table(0x3000, Rights::RWX).0,
        );
        mem.set(
            0x3000,
            Level::PD.index(a).get(),
            EptEntry::table(0x4000, Rights::RWX).0,
        );
        mem.set(0x4000, Level::PT.index(a).get(), leaf);
    }

    fn backed_tables() -> Sparse {
        Sparse::default()
            .backed(0x1000)
            .backed(0x2000)
            .backed(0x3000)
            .backed(0x4000)
    }

    #[test]
    fn level_index_selects_nine_bits_per_level() {
        let a = (5u64 << 39) | (6 << 30) | (7 << 21) | (8 << 12) | 0x123;
        assert_eq!(Level::ROOT_4.index(a).get(), 5);
        assert_eq!(Level::PDPT.index(a).get(), 6);
        assert_eq!(Level::PD.index(a).get(), 7);
        assert_eq!(Level::PT.index(a).get(), 8);
        assert_eq!(Level::PT.lower(), None);
        assert_eq!(Level::new(5), None);
    }

    #[test]
    fn walk_ands_rights_across_levels() {
        let mut mem = backed_tables();
        let leaf = EptEntry::leaf(
            0x9000,
            PageSize::Size4K,
            Rights::RWX,
            MemType::WriteBack,
            false,
        );
        four_level(&mut mem, leaf.0, Rights::READ | Rights::EXECUTE);
        let t = walk(&ept(), &mem, 0x1000, 0x40_2000_3abc).unwrap();
        assert_eq!(t.rights, Rights::READ | Rights::EXECUTE);
        assert_eq!(t.address, 0x9abc);
        assert_eq!(t.size, PageSize::Size4K);
        assert_eq!(t.path.steps().len(), 4);
        assert_eq!(t.leaf().table, 0x4000);
        assert_eq!(t.attributes.memtype, MemType::WriteBack);
    }

    #[test]
    fn walk_stops_at_large_leaf_with_offset() {
        let mut mem = backed_tables();
        let a = 0x40_2000_3000u64;
        mem.set(
            0x1000,
            Level::ROOT_4.index(a).get(),
            EptEntry::table(0x2000, Rights::RWX).0,
        );
        let leaf = EptEntry::leaf(
            0x8000_0000,
            PageSize::Size1G,
            Rights::READ,
            MemType::Uncacheable,
            true,
        );
        mem.set(0x2000, Level::PDPT.index(a).get(), leaf.0);
        let t = walk(&ept(), &mem, 0x1000, a + 5).unwrap();
        assert_eq!(t.size, PageSize::Size1G);
        assert_eq!(t.address, 0x8000_0000 + (a & 0x3fff_ffff) + 5);
        assert!(t.attributes.ignore_pat);
        assert_eq!(t.path.steps().len(), 2);
    }

    #[test]
    fn walk_reports_the_not_present_entry() {
        let mem = backed_tables();
        match walk(&ept(), &mem, 0x1000, 0x1234) {
            Err(WalkError::NotPresent { path }) => {
                assert_eq!(path.steps().len(), 1);
                assert_eq!(path.last().unwrap().table, 0x1000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn walk_read_failure_names_the_unreadable_table() {
        let mut mem = Sparse::default()
            .backed(0x1000)
            .backed(0x2000)
            .backed(0x4000);
        four_level(&mut mem, 0, Rights::RWX);
        let err = walk(&ept(), &mem, 0x1000, 0x40_2000_3000).unwrap_err();
        assert!(matches!(
            err,
            WalkError::Memory {
                level: 2,
                table: 0x3000,
                error: MemoryError::NotBacked { .. }
            }
        ));
    }

    #[test]
    fn self_referencing_tables_terminate() {
        let mut mem = Sparse::default().backed(0x1000);
        for i in 0..512 {
            mem.set(0x1000, i, EptEntry::table(0x1000, Rights::RWX).0);
        }
        // Every level points at the same page; at level 1 the entry is a (4 KiB) leaf.
        let t = walk(&ept(), &mem, 0x1000, 0xdead_b000).unwrap();
        assert_eq!(t.path.steps().len(), 4);
        let mut leaves = 0;
        traverse(&ept(), &mut ReadOnly(&mem), 0x1000, 0, 1 << 48, |_, e| {
            if matches!(e, Event::Leaf { .. }) {
                leaves += 1;
            }
            if leaves > 10_000 {
                Action::Stop
            } else {
                Action::Keep
            }
        })
        .unwrap();
        assert_eq!(
            leaves, 10_001,
            "bounded: stops only because the visitor said so"
        );
    }

    #[test]
    fn visitor_replace_builds_missing_tables() {
        let mut mem = backed_tables();
        let mut next = [0x2000u64, 0x3000, 0x4000].into_iter();
        let out = walk_with(
            &ept(),
            &mut Writable(&mut mem),
            0x1000,
            0x7000,
            |_, step, d| {
                if step.level > 1 && matches!(d, Decoded::NotPresent) {
                    Visit::Replace(EptEntry::table(next.next().unwrap(), Rights::RWX).0)
                } else if step.level == 1 {
                    Visit::Stop
                } else {
                    Visit::Continue
                }
            },
        )
        .unwrap();
        match out {
            Outcome::Stopped { path, rights_above } => {
                assert_eq!(path.last().unwrap().table, 0x4000);
                assert_eq!(rights_above, Rights::RWX);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn traverse_visits_leaves_in_range_and_tables_after_children() {
        let mut mem = backed_tables();
        let a = 0x40_2000_3000u64;
        four_level(
            &mut mem,
            EptEntry::leaf(
                0x9000,
                PageSize::Size4K,
                Rights::READ,
                MemType::WriteBack,
                false,
            )
            .0,
            Rights::RWX,
        );
        mem.set(
            0x4000,
            Level::PT.index(a).get() + 1,
            EptEntry::leaf(
                0xa000,
                PageSize::Size4K,
                Rights::READ,
                MemType::WriteBack,
                false,
            )
            .0,
        );
        let mut seen = Vec::new();
        traverse(
            &ept(),
            &mut Writable(&mut mem),
            0x1000,
            a + 0x1000,
            a + 0x2000,
            |_, e| {
                seen.push(e);
                Action::Clear
            },
        )
        .unwrap();
        assert_eq!(seen.len(), 4, "one leaf then three tables: {seen:?}");
        assert!(matches!(seen[0], Event::Leaf { base, frame: 0xa000, .. } if base == a + 0x1000));
        assert!(matches!(seen[1], Event::TableDone { table: 0x4000, .. }));
        assert!(matches!(seen[3], Event::TableDone { table: 0x2000, .. }));
        assert_eq!(
            mem.read_u64(0x1000 + Level::ROOT_4.index(a).offset()),
            Ok(0)
        );
    }

    #[test]
    fn host_paging_walk_decodes_xd_user_and_large_pages() {
        let mut mem = backed_tables();
        let a = 0x7f_c000_0000u64 + 0x20_1000;
        let present_rw_user = 0b111;
        mem.set(
            0x1000,
            Level::ROOT_4.index(a).get(),
            0x2000 | present_rw_user,
        );
        mem.set(0x2000, Level::PDPT.index(a).get(), 0x3000 | present_rw_user);
        // 2 MiB leaf, read-only, execute-disable.
        mem.set(
            0x3000,
            Level::PD.index(a).get(),
            0x4020_0000 | 0b101 | (1 << 7) | (1 << 63),
        );
        let t = walk(&X86Paging::default(), &mem, 0x1000, a).unwrap();
        assert_eq!(t.size, PageSize::Size2M);
        assert_eq!(t.rights, Rights::READ | Rights::USER);
        assert_eq!(t.address, 0x4020_0000 + 0x1000);
        let no_nx = X86Paging {
            nxe: false,
            ..X86Paging::default()
        };
        assert!(matches!(
            walk(&no_nx, &mem, 0x1000, a),
            Err(WalkError::Invalid {
                reason: InvalidEntry::ReservedBits(_),
                ..
            })
        ));
    }

    #[test]
    fn host_paging_pml4_page_size_bit_is_reserved() {
        let mut mem = backed_tables();
        mem.set(0x1000, 0, 0x2000 | 1 | (1 << 7));
        assert!(matches!(
            walk(&X86Paging::default(), &mem, 0x1000, 0),
            Err(WalkError::Invalid {
                reason: InvalidEntry::ReservedBits(0x80),
                ..
            })
        ));
    }
}
