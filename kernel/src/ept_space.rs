//! EPT objects: guest-physical address spaces whose tables and bookkeeping live in memory
//! their creator donated. Tables are edited through the one walker (`ept::walk`, EPT format).

use crate::paging::{IdentityMemory, MapError};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use caps::NodeId;
use caps::index::NodeIndex;
use ept::entry::{EptEntry, Eptp, MemType, PageSize, Rights};
use ept::walk::{Level, TrustedEpt, WalkError, Writable, install, remove, walk};

/// Derivation-tree space ids of EPT objects start here (PDs use 0..SPACES).
pub const EPT_SPACE_BASE: u32 = 0x1000;
/// Bookkeeping bytes one mapping costs the pool (its derivation-tree node, 24 bytes, and its
/// entry in the mapping index, rounded up).
pub const MAPPING_COST: usize = 64;

/// Address -> (derivation node, page size) of every mapping in an address space (an EPT
/// object's or a PD's), over `caps::index::NodeIndex`.
#[derive(Default)]
pub struct Mappings(NodeIndex);

impl Mappings {
    pub const fn new() -> Self {
        Self(NodeIndex::new())
    }

    fn size_of_tag(tag: u8) -> PageSize {
        match tag {
            1 => PageSize::Size2M,
            2 => PageSize::Size1G,
            _ => PageSize::Size4K,
        }
    }

    fn tag_of(size: PageSize) -> u8 {
        match size {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size1G => 2,
        }
    }

    pub fn get(&self, address: u64) -> Option<(NodeId, PageSize)> {
        self.0
            .get(address)
            .map(|(node, tag)| (node, Self::size_of_tag(tag)))
    }

    pub fn contains_key(&self, address: u64) -> bool {
        self.0.contains_key(address)
    }

    /// Records a mapping; false if one is recorded at `address` already.
    pub fn insert(&mut self, address: u64, node: NodeId, size: PageSize) -> bool {
        self.0.insert(address, node, Self::tag_of(size))
    }

    /// Every mapping, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, NodeId, PageSize)> + '_ {
        self.0
            .iter()
            .map(|(a, node, tag)| (a, node, Self::size_of_tag(tag)))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn remove(&mut self, address: u64) -> Option<(NodeId, PageSize)> {
        self.0
            .remove(address)
            .map(|(node, tag)| (node, Self::size_of_tag(tag)))
    }
}

/// What a lookup in an EPT found.
#[derive(Clone, Copy, Debug)]
pub struct EptLeaf {
    pub frame: u64,
    pub size: PageSize,
    pub rights: Rights,
    pub memtype: MemType,
}

/// Free donated frames, as runs of pages. Every frame in a pool is zero: donations are zeroed
/// when taken, and frames leave a pool for good (as tables, heap or reclaimed memory), so a
/// new table needs no clearing.
#[derive(Default)]
pub struct Pool {
    runs: Vec<(u64, u64)>,
    pages: usize,
}

impl Pool {
    pub fn add(&mut self, base: u64, pages: u64) {
        if pages > 0 {
            self.runs.push((base, pages));
            self.pages += pages as usize;
        }
    }

    /// Moves every run of `other` into this pool.
    pub fn append(&mut self, mut other: Pool) {
        self.pages += other.pages;
        self.runs.append(&mut other.runs);
    }

    pub fn pop(&mut self) -> Option<u64> {
        let (base, count) = self.runs.last_mut()?;
        *count -= 1;
        let frame = *base + *count * 4096;
        if *count == 0 {
            self.runs.pop();
        }
        self.pages -= 1;
        Some(frame)
    }

    pub fn len(&self) -> usize {
        self.pages
    }
}

pub struct EptSpace {
    pub root: u64,
    /// Free donated frames.
    pub pool: Pool,
    /// Bookkeeping bytes paid for and not yet used.
    pub budget: usize,
    /// Mappings: GPA -> (derivation node, size).
    pub mappings: Mappings,
    /// CPUs that may hold translations of this EPT (INVEPT targets).
    pub cpus: u64,
}

impl EptSpace {
    /// A new EPT whose root table comes from `pool`.
    pub fn new(mut pool: Pool) -> Option<Self> {
        let root = pool.pop()?;
        Some(Self {
            root,
            pool,
            budget: 0,
            mappings: Mappings::new(),
            cpus: 0,
        })
    }

    /// The EPT pointer: write-back paging structures, 4-level walk, no A/D flags.
    pub fn eptp(&self) -> u64 {
        Eptp::new(self.root, false).0
    }

    /// Pays for one mapping's bookkeeping, turning a pool frame into kernel heap when the
    /// budget runs out. False when the pool is empty.
    pub fn charge(&mut self) -> bool {
        if self.budget < MAPPING_COST {
            let Some(frame) = self.pool.pop() else {
                return false;
            };
            crate::memory::add_to_heap(frame, 4096);
            self.budget += 4096;
        }
        self.budget -= MAPPING_COST;
        true
    }

    pub fn refund(&mut self) {
        self.budget += MAPPING_COST;
    }

    /// Installs a leaf for `gpa`; tables come from the pool.
    pub fn map(
        &mut self,
        gpa: u64,
        frame: u64,
        size: PageSize,
        rights: Rights,
        memtype: MemType,
        ignore_pat: bool,
    ) -> Result<(), MapError> {
        let leaf = EptEntry::leaf(frame, size, rights & Rights::RWX, memtype, ignore_pat).0;
        let pool = &mut self.pool;
        let new_table = || {
            let table = pool.pop()?;
            Some(EptEntry::table(table, Rights::RWX).0)
        };
        install(
            &TrustedEpt,
            &mut Writable(&mut IdentityMemory),
            self.root,
            gpa,
            Level::of_size(size),
            leaf,
            new_table,
        )
        .map_err(MapError::from)
    }

    /// Clears the leaf of `size` at `gpa`. The caller invalidates.
    pub fn unmap(&mut self, gpa: u64, size: PageSize) -> Result<(), MapError> {
        let access = &mut Writable(&mut IdentityMemory);
        remove(&TrustedEpt, access, self.root, gpa, size)
            .map(|_| ())
            .map_err(MapError::from)
    }

    /// The addresses and derivation nodes of every leaf overlapping `[start, end)` (a leaf reaching beyond
    /// the range counts). A range wider than the mappings are many is answered from the
    /// mapping index; a narrower one by walking the tables, skipping absent subtrees whole.
    pub fn nodes_overlapping(&self, start: u64, end: u64) -> Vec<(u64, NodeId)> {
        let mut nodes = Vec::new();
        if (end - start) / PageSize::Size2M.bytes() > self.mappings.len() as u64 {
            for (address, node, size) in self.mappings.iter() {
                if address < end && address + size.bytes() > start {
                    nodes.push((address, node));
                }
            }
            return nodes;
        }
        let format = TrustedEpt;
        let mut at = start;
        while at < end {
            let next = match walk(&format, &IdentityMemory, self.root, at) {
                Ok(t) => {
                    let base = t.size.align_down(at);
                    if let Some((node, size)) = self.mappings.get(base)
                        && size == t.size
                    {
                        nodes.push((base, node));
                    }
                    base + t.size.bytes()
                }
                Err(WalkError::NotPresent { path }) => {
                    // Everything the absent entry would have translated is absent.
                    let level = path.last().map_or(Level::ROOT_4.number(), |s| s.level);
                    let span = Level::new(level).map_or(PageSize::Size4K.bytes(), Level::span);
                    (at & !(span - 1)) + span
                }
                Err(_) => (at & !0xfff) + 0x1000,
            };
            at = next;
        }
        nodes
    }

    /// What `gpa` maps to.
    pub fn lookup(&self, gpa: u64) -> Option<EptLeaf> {
        let format = TrustedEpt;
        let t = walk(&format, &IdentityMemory, self.root, gpa).ok()?;
        Some(EptLeaf {
            frame: t.frame,
            size: t.size,
            rights: t.rights & Rights::RWX,
            memtype: t.attributes.memtype,
        })
    }
}

/// Frames a PD donated to the kernel (EPT pools): no mapping may reach them.
#[derive(Default)]
pub struct Donated {
    ranges: BTreeMap<u64, u64>,
}

impl Donated {
    pub const fn new() -> Self {
        Self {
            ranges: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, start: u64, end: u64) {
        self.ranges.insert(start, end);
    }

    /// Whether `[start, end)` overlaps donated memory.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.ranges
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    /// Gives back one page: splits the range holding it.
    pub fn release_page(&mut self, page: u64) {
        let Some((&s, &e)) = self.ranges.range(..=page).next_back() else {
            return;
        };
        if page >= e {
            return;
        }
        self.ranges.remove(&s);
        if s < page {
            self.ranges.insert(s, page);
        }
        if page + 4096 < e {
            self.ranges.insert(page + 4096, e);
        }
    }
}
