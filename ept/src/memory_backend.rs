//! A real in-memory shadow backend: SDM-format EPT tables in simulated host memory, the
//! `caps` derivation tree, and per-CPU TLBs, for host tests and benchmarks.
//!
//! What is real here (not a model):
//! - Every table is a 4 KiB frame of 512 u64 entries written in the SDM format, and every
//!   walk of them goes through [`crate::walk`]. L0's map of L1 is such an EPT too.
//! - One [`caps::DerivationTree`] holds everything, as in the kernel: roots are host memory
//!   regions given to L1, their children are L0's mappings of L1 pages (one node per L0 leaf),
//!   and each shadow leaf is a child of the L0 mapping it was derived from. L0 revoking or
//!   changing an L1 mapping revokes that node's children, and the removal callback clears
//!   exactly those shadow entries (targeted mode). [`RevocationMode::FlushEverything`] is the
//!   safe-but-slow alternative to compare against: any L0 change empties every shadow.
//! - Each table page that holds leaves has a companion array of 512 u32 node ids (4 bytes per
//!   entry), so the node of any entry is found without a per-entry map.
//!
//! What is modelled:
//! - Per-CPU TLBs: a set of (CPU, EPT root) → cached 4 KiB translations. A cached
//!   translation stays usable until that CPU invalidates that root (INVEPT single-context).
//! - Invalidation without IPIs: each root has a generation, bumped by every change that
//!   removes or narrows a translation; each CPU remembers the generation up to which it is in
//!   sync per root. A change to a shadow flushes the CPU its vCPU is bound to at once (in the
//!   kernel: the vCPU is stopped in the server, or kicked out of the guest, and the flush
//!   happens on its CPU); the affinity call that moves a vCPU to another CPU flushes the
//!   destination only if that CPU is behind on the root's generation (the "flush timestamp"
//!   of the Xen review). A root page that is freed and reused keeps its generation counter, so
//!   stale translations of the previous owner are flushed before the new owner runs.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use caps::derivation::{DerivationTree, NodeId, NodeKey, VecStorage};

use crate::backend::{BackendError, Installed, ShadowBackend, ShadowId, shadow_memory_type};
use crate::check::{EptCapabilities, EptViolationQualification};
use crate::entry::{EptEntry, MemType, PAGE_SIZE, PageSize, Rights};
use crate::walk::{
    Action, Decoded, Ept, Event, MemoryError, Outcome, PhysMemory, ReadOnly, TableAccess, Visit,
    WalkError, traverse, walk, walk_with,
};

/// One 4 KiB frame of host memory.
type Frame = [u64; 512];

/// Host frame numbers at or above this are page-table frames (kernel tables and the shadow
/// pool); below it, ordinary RAM given to guests.
pub const TABLE_BASE_PFN: u64 = 1 << 28;
/// Key space of L0's map of L1 in the derivation tree.
pub const L1_SPACE: u32 = 1;
/// Key spaces of shadows start here.
pub const SHADOW_SPACE_BASE: u32 = 16;
/// `NodeKey::Object` kind code for a host memory region given to L1.
pub const HOST_REGION_KIND: u8 = 0x10;
/// Companion slot value meaning "no node".
const NO_NODE: u32 = u32::MAX;
/// Top of the 4-level address space.
const TOP: u64 = 1 << 48;

/// How an L0 change of L1 memory reaches the shadows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum RevocationMode {
    /// Revoke the derivation-tree children of the changed L0 mapping: exactly the shadow
    /// entries derived from it go.
    Targeted,
    /// Empty every shadow on any L0 change (safe, slow; the baseline to compare against).
    FlushEverything,
}

/// Construction parameters.
#[derive(Clone, Copy, Debug)]
pub struct MemoryBackendConfig {
    /// Physical CPUs modelled (for TLBs and affinity).
    pub cpus: usize,
    /// How L0 changes reach the shadows.
    pub revocation: RevocationMode,
    /// Pages in the shadow-table pool at start.
    pub initial_pool_pages: usize,
}

impl Default for MemoryBackendConfig {
    fn default() -> Self {
        Self {
            cpus: 4,
            revocation: RevocationMode::Targeted,
            initial_pool_pages: 1024,
        }
    }
}

/// A region of host RAM given to L1: the root of its mappings in the derivation tree.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HostRegion {
    /// First host frame number.
    pub first_pfn: u64,
    /// Number of frames.
    pub pages: u64,
    /// Derivation-tree root node.
    pub node: NodeId,
}

impl HostRegion {
    /// Host physical address of the region's first byte.
    pub const fn base(&self) -> u64 {
        self.first_pfn * PAGE_SIZE
    }
}

/// Errors of the L0-side operations.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum L0Error {
    /// The host address is not in any region given to L1.
    NotInRegion,
    /// An address not aligned to the page size.
    Misaligned,
    /// Nothing mapped there.
    NotMapped,
    /// The derivation tree is full.
    OutOfNodes,
}

/// A leaf of an EPT held by the backend (for checks and tests).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LeafInfo {
    /// Input address mapped (L2 guest-physical for a shadow, L1 for L0's map).
    pub base: u64,
    /// Host physical address.
    pub host: u64,
    /// Page size.
    pub size: PageSize,
    /// Rights (ANDed across levels).
    pub rights: Rights,
    /// Memory type.
    pub memtype: MemType,
    /// Ignore-PAT.
    pub ignore_pat: bool,
    /// Derivation-tree node recorded in the companion array.
    pub node: Option<NodeId>,
}

/// A translation cached in a modelled TLB.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TlbEntry {
    /// Host physical address of the 4 KiB page.
    pub host_page: u64,
    /// Rights cached.
    pub rights: Rights,
}

/// What the modelled processor raises when a guest access through a shadow fails.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HardwareFault {
    /// EPT violation with its qualification (bits 5:3 from the shadow or the TLB).
    EptViolation(EptViolationQualification),
    /// EPT misconfiguration of a shadow: a backend bug; tests assert it never happens.
    EptMisconfiguration,
}

/// Counters of the backend's work.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BackendStats {
    /// Shadow leaves written.
    pub installs: u64,
    /// Installs that found the identical entry already there.
    pub installs_unchanged: u64,
    /// Shadow leaves removed by L0 revocation (derivation-tree callbacks).
    pub revoked_entries: u64,
    /// Shadow leaves removed by unmap, flush and destroy.
    pub unmapped_entries: u64,
    /// INVEPT single-context executed on a CPU.
    pub invept: u64,
    /// Affinity changes whose destination was already in sync (no INVEPT needed).
    pub affinity_flushes_skipped: u64,
    /// Whole-shadow flushes done because of an L0 change in flush-everything mode.
    pub flush_everything_events: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SpaceKind {
    L0Map,
    Shadow,
}

struct Space {
    kind: SpaceKind,
    root: u64,
    key_space: u32,
    cpu: Option<usize>,
    tables: usize,
    nodes: usize,
    dirty: bool,
}

struct TableFrame {
    data: Box<Frame>,
    present: u16,
    companion: Option<Box<[u32; 512]>>,
}

#[derive(Default)]
struct CpuTlb {
    entries: BTreeMap<(u64, u64), TlbEntry>,
    synced: BTreeMap<u64, u64>,
}

/// Everything but the derivation tree (so the tree's removal callback can borrow it).
struct State {
    config: MemoryBackendConfig,
    ram: Vec<Option<Box<Frame>>>,
    next_ram_pfn: u64,
    tables: Vec<TableFrame>,
    free_table_frames: Vec<u64>,
    pool: Vec<u64>,
    pool_total: usize,
    spaces: Vec<Option<Space>>,
    regions: Vec<HostRegion>,
    tlbs: Vec<CpuTlb>,
    generation: BTreeMap<u64, u64>,
    stats: BackendStats,
    format: Ept,
}

/// The in-memory backend. See the module documentation.
pub struct MemoryBackend {
    tree: DerivationTree<VecStorage>,
    st: State,
}

fn full_format() -> Ept {
    Ept {
        capabilities: EptCapabilities {
            max_phys_bits: 52,
            execute_only: true,
            pages_1g: true,
            accessed_dirty: true,
        },
    }
}

impl PhysMemory for State {
    fn read_u64(&self, address: u64) -> Result<u64, MemoryError> {
        let pfn = address / PAGE_SIZE;
        let slot = ((address % PAGE_SIZE) / 8) as usize;
        if pfn >= TABLE_BASE_PFN {
            let frame = self.tables.get((pfn - TABLE_BASE_PFN) as usize);
            return frame
                .and_then(|f| f.data.get(slot).copied())
                .ok_or(MemoryError::NotBacked { address });
        }
        Ok(self
            .ram
            .get(pfn as usize)
            .and_then(|f| f.as_ref())
            .and_then(|f| f.get(slot).copied())
            .unwrap_or(0))
    }
}

impl State {
    fn write_host(&mut self, address: u64, value: u64) -> Result<(), MemoryError> {
        let pfn = address / PAGE_SIZE;
        let slot = ((address % PAGE_SIZE) / 8) as usize;
        if pfn >= TABLE_BASE_PFN {
            let frame = self.tables.get_mut((pfn - TABLE_BASE_PFN) as usize);
            let cell = frame.and_then(|f| f.data.get_mut(slot));
            return cell
                .map(|c| *c = value)
                .ok_or(MemoryError::NotBacked { address });
        }
        let index = pfn as usize;
        if index >= self.ram.len() {
            self.ram.resize_with(index + 1, || None);
        }
        let frame = self.ram[index].get_or_insert_with(|| Box::new([0; 512]));
        frame[slot] = value;
        Ok(())
    }

    fn table(&self, address: u64) -> Option<&TableFrame> {
        let pfn = address / PAGE_SIZE;
        pfn.checked_sub(TABLE_BASE_PFN)
            .and_then(|i| self.tables.get(i as usize))
    }

    fn table_mut(&mut self, address: u64) -> Option<&mut TableFrame> {
        let pfn = address / PAGE_SIZE;
        pfn.checked_sub(TABLE_BASE_PFN)
            .and_then(|i| self.tables.get_mut(i as usize))
    }

    fn new_table_frame(&mut self) -> u64 {
        if let Some(address) = self.free_table_frames.pop() {
            return address;
        }
        let pfn = TABLE_BASE_PFN + self.tables.len() as u64;
        self.tables.push(TableFrame {
            data: Box::new([0; 512]),
            present: 0,
            companion: None,
        });
        pfn * PAGE_SIZE
    }

    /// A zeroed table frame for `space`: from the pool for shadows, from kernel memory for
    /// L0's map.
    fn alloc_table(&mut self, space: usize) -> Option<u64> {
        let kind = self.spaces.get(space)?.as_ref()?.kind;
        let address = match kind {
            SpaceKind::Shadow => self.pool.pop()?,
            SpaceKind::L0Map => self.new_table_frame(),
        };
        if let Some(s) = self.spaces.get_mut(space).and_then(Option::as_mut) {
            s.tables += 1;
        }
        Some(address)
    }

    /// Returns an emptied table frame to where it came from.
    fn free_table(&mut self, space: usize, address: u64) {
        let Some(s) = self.spaces.get_mut(space).and_then(Option::as_mut) else {
            return;
        };
        s.tables = s.tables.saturating_sub(1);
        let kind = s.kind;
        if let Some(t) = self.table_mut(address) {
            t.data.fill(0);
            t.present = 0;
            t.companion = None;
        }
        match kind {
            SpaceKind::Shadow => self.pool.push(address),
            SpaceKind::L0Map => self.free_table_frames.push(address),
        }
    }

    fn companion(&self, table: u64, index: usize) -> Option<NodeId> {
        let t = self.table(table)?;
        let raw = *t.companion.as_ref()?.get(index)?;
        (raw != NO_NODE).then(|| NodeId::from_index(raw))
    }

    fn set_companion(&mut self, table: u64, index: usize, node: Option<NodeId>) {
        let Some(t) = self.table_mut(table) else {
            return;
        };
        let companion = t.companion.get_or_insert_with(|| Box::new([NO_NODE; 512]));
        if let Some(slot) = companion.get_mut(index) {
            *slot = node.map_or(NO_NODE, NodeId::index);
        }
    }

    fn adjust_present(&mut self, table: u64, delta: i32) {
        if let Some(t) = self.table_mut(table) {
            t.present = (i32::from(t.present) + delta).clamp(0, 512) as u16;
        }
    }

    fn space_of_key(&self, key_space: u32) -> Option<usize> {
        if key_space == L1_SPACE {
            return Some(0);
        }
        let index = key_space.checked_sub(SHADOW_SPACE_BASE)? as usize;
        self.spaces.get(index)?.as_ref().map(|_| index)
    }

    fn space(&self, index: usize) -> Option<&Space> {
        self.spaces.get(index).and_then(Option::as_ref)
    }

    fn space_mut(&mut self, index: usize) -> Option<&mut Space> {
        self.spaces.get_mut(index).and_then(Option::as_mut)
    }

    /// Derivation-tree removal callback: clears the entry recorded for `node` (if it still
    /// is) and frees the tables that leaves empty. Entries already cleared by their remover
    /// no longer name `node` in their companion slot and are skipped.
    fn on_removed(&mut self, node: NodeId, key: u64) {
        let Some(NodeKey::Mapping {
            space: key_space,
            page,
            level,
        }) = NodeKey::unpack(key)
        else {
            return;
        };
        let Some(space) = self.space_of_key(key_space) else {
            return;
        };
        let Some(size) = PageSize::at_level(level + 1) else {
            return;
        };
        let Some(root) = self.space(space).map(|s| s.root) else {
            return;
        };
        let base = page * PAGE_SIZE;
        let format = self.format;
        let target = size.level();
        let Ok(Outcome::Stopped { path, .. }) =
            walk_with(&format, &mut ReadOnly(&*self), root, base, |_, step, _| {
                if step.level == target {
                    Visit::Stop
                } else {
                    Visit::Continue
                }
            })
        else {
            return;
        };
        let Some(leaf) = path.last().copied() else {
            return;
        };
        if self.companion(leaf.table, leaf.index.get()) != Some(node) {
            return;
        }
        self.set_companion(leaf.table, leaf.index.get(), None);
        let _ = self.write_host(leaf.entry_address(), 0);
        self.adjust_present(leaf.table, -1);
        if let Some(s) = self.space_mut(space) {
            s.nodes = s.nodes.saturating_sub(1);
            s.dirty = true;
            if s.kind == SpaceKind::Shadow {
                self.stats.revoked_entries += 1;
            }
        }
        self.free_empty_tables(space, path.steps());
    }

    /// After an entry in the last table of `steps` was cleared: frees that table and its
    /// ancestors (never the root) while they are empty.
    fn free_empty_tables(&mut self, space: usize, steps: &[crate::walk::Step]) {
        for i in (1..steps.len()).rev() {
            let table = steps[i].table;
            if self.table(table).is_none_or(|t| t.present != 0) {
                break;
            }
            let parent = steps[i - 1];
            let _ = self.write_host(parent.entry_address(), 0);
            self.adjust_present(parent.table, -1);
            self.free_table(space, table);
        }
    }

    /// Records that `space` lost or narrowed translations: bump the root's generation and
    /// flush the CPU its vCPU is bound to.
    fn invalidate(&mut self, space: usize) {
        let Some(s) = self.space_mut(space) else {
            return;
        };
        s.dirty = false;
        if s.kind != SpaceKind::Shadow {
            return;
        }
        let (root, cpu) = (s.root, s.cpu);
        let generation = self.generation.entry(root).or_insert(0);
        *generation += 1;
        let generation = *generation;
        if let Some(cpu) = cpu {
            self.invept_on(cpu, root, generation);
        }
    }

    fn invept_on(&mut self, cpu: usize, root: u64, generation: u64) {
        let Some(tlb) = self.tlbs.get_mut(cpu) else {
            return;
        };
        tlb.entries.retain(|&(r, _), _| r != root);
        tlb.synced.insert(root, generation);
        self.stats.invept += 1;
    }

    fn invalidate_dirty(&mut self) {
        for i in 0..self.spaces.len() {
            if self.space(i).is_some_and(|s| s.dirty) {
                self.invalidate(i);
            }
        }
    }
}

/// Table access for walks of the backend's own tables, with the whole state reachable from
/// walk visitors.
struct Tables<'a>(&'a mut State);

impl TableAccess for Tables<'_> {
    fn read(&mut self, address: u64) -> Result<u64, MemoryError> {
        self.0.read_u64(address)
    }
    fn write(&mut self, address: u64, value: u64) -> Result<(), MemoryError> {
        self.0.write_host(address, value)
    }
}

/// Removes every leaf of `space` overlapping `[base, base + len)` with its derivation node
/// (and, for L0's map, everything derived from it), and frees tables left empty. Returns the
/// number of leaves removed.
fn unmap_range(
    tree: &mut DerivationTree<VecStorage>,
    st: &mut State,
    space: usize,
    base: u64,
    len: u64,
) -> usize {
    let Some(s) = st.space(space) else { return 0 };
    let (root, kind) = (s.root, s.kind);
    let format = st.format;
    let mut removed = 0usize;
    let end = base.saturating_add(len);
    let _ = traverse(&format, &mut Tables(st), root, base, end, |acc, event| {
        let st = &mut *acc.0;
        match event {
            Event::Leaf { step, .. } => {
                let node = st.companion(step.table, step.index.get());
                st.set_companion(step.table, step.index.get(), None);
                let _ = st.write_host(step.entry_address(), 0);
                st.adjust_present(step.table, -1);
                if let Some(s) = st.space_mut(space) {
                    s.dirty = true;
                    if node.is_some() {
                        s.nodes = s.nodes.saturating_sub(1);
                    }
                }
                if let Some(node) = node {
                    let _ = tree.remove(node, &mut |id, key| st.on_removed(id, key));
                }
                removed += 1;
                Action::Keep
            }
            Event::TableDone { table, step, .. } => {
                if st.table(table).is_some_and(|t| t.present == 0) {
                    st.adjust_present(step.table, -1);
                    st.free_table(space, table);
                    Action::Clear
                } else {
                    Action::Keep
                }
            }
        }
    });
    if kind == SpaceKind::Shadow {
        st.stats.unmapped_entries += removed as u64;
    }
    removed
}

/// Writes leaf `entry` for `[base, base + size)` into `space`, replacing whatever overlapped,
/// building missing tables, and records it as a child of `parent` in the tree.
fn put_leaf(
    tree: &mut DerivationTree<VecStorage>,
    st: &mut State,
    space: usize,
    base: u64,
    size: PageSize,
    entry: EptEntry,
    parent: NodeId,
) -> Result<bool, BackendError> {
    let (root, key_space) = match st.space(space) {
        Some(s) => (s.root, s.key_space),
        None => return Err(BackendError::NoSuchShadow),
    };
    let format = st.format;
    let target = size.level();
    // One read-only walk decides: unchanged, something to remove first, tables to build.
    let probe = walk_with(&format, &mut ReadOnly(&*st), root, base, |_, step, _| {
        if step.level == target {
            Visit::Stop
        } else {
            Visit::Continue
        }
    });
    let occupied = match probe {
        Ok(Outcome::Stopped { path, .. }) => {
            let leaf = path.last().copied().unwrap_or_default();
            if leaf.entry == entry.0 && st.companion(leaf.table, leaf.index.get()).is_some() {
                return Ok(false);
            }
            leaf.entry & 0b111 != 0
        }
        Ok(Outcome::Translated(_)) => true,
        Err(_) => false,
    };
    if occupied {
        unmap_range(tree, st, space, base, size.bytes());
    }
    let needed = match walk_with(&format, &mut ReadOnly(&*st), root, base, |_, step, _| {
        if step.level == target {
            Visit::Stop
        } else {
            Visit::Continue
        }
    }) {
        Err(WalkError::NotPresent { path }) => {
            usize::from(path.last().map_or(0, |s| s.level)).saturating_sub(usize::from(target))
        }
        _ => 0,
    };
    let kind = st.space(space).map(|s| s.kind);
    if kind == Some(SpaceKind::Shadow) && st.pool.len() < needed {
        return Err(BackendError::OutOfTables);
    }
    let key = NodeKey::Mapping {
        space: key_space,
        page: base / PAGE_SIZE,
        level: size.key_level(),
    }
    .pack()
    .map_err(|_| BackendError::Misaligned)?;
    let node = tree
        .derive(parent, key)
        .map_err(|_| BackendError::OutOfNodes)?;
    let outcome = walk_with(
        &format,
        &mut Tables(st),
        root,
        base,
        |acc, step, decoded| {
            if step.level == target {
                return Visit::Stop;
            }
            if matches!(decoded, Decoded::NotPresent)
                && let Some(table) = acc.0.alloc_table(space)
            {
                acc.0.adjust_present(step.table, 1);
                return Visit::Replace(EptEntry::table(table, Rights::RWX).0);
            }
            Visit::Continue
        },
    );
    let Ok(Outcome::Stopped { path, .. }) = outcome else {
        // Unreachable after the checks above; undo the node rather than leak it.
        let _ = tree.remove(node, &mut |_, _| {});
        return Err(BackendError::OutOfTables);
    };
    let slot = path.last().copied().unwrap_or_default();
    let _ = st.write_host(slot.entry_address(), entry.0);
    st.adjust_present(slot.table, 1);
    st.set_companion(slot.table, slot.index.get(), Some(node));
    if let Some(s) = st.space_mut(space) {
        s.nodes += 1;
    }
    Ok(true)
}

impl MemoryBackend {
    /// A backend with no L1 memory yet, an empty L0 map and `config.initial_pool_pages` pool
    /// pages.
    pub fn new(config: MemoryBackendConfig) -> Self {
        let mut st = State {
            config,
            ram: Vec::new(),
            next_ram_pfn: 0x100,
            tables: Vec::new(),
            free_table_frames: Vec::new(),
            pool: Vec::new(),
            pool_total: 0,
            spaces: Vec::new(),
            regions: Vec::new(),
            tlbs: (0..config.cpus.max(1)).map(|_| CpuTlb::default()).collect(),
            generation: BTreeMap::new(),
            stats: BackendStats::default(),
            format: full_format(),
        };
        let root = st.new_table_frame();
        st.spaces.push(Some(Space {
            kind: SpaceKind::L0Map,
            root,
            key_space: L1_SPACE,
            cpu: None,
            tables: 1,
            nodes: 0,
            dirty: false,
        }));
        let mut backend = Self {
            tree: DerivationTree::new(VecStorage::new()),
            st,
        };
        let _ = backend.donate_table_pages(config.initial_pool_pages);
        backend
    }

    /// The derivation tree (shared by L0's mappings and the shadows).
    pub fn tree(&self) -> &DerivationTree<VecStorage> {
        &self.tree
    }

    /// Counters.
    pub fn stats(&self) -> BackendStats {
        self.st.stats
    }

    /// The revocation mode.
    pub fn revocation_mode(&self) -> RevocationMode {
        self.st.config.revocation
    }

    /// Switches the revocation mode.
    pub fn set_revocation_mode(&mut self, mode: RevocationMode) {
        self.st.config.revocation = mode;
    }

    /// Gives L1 a new region of `pages` host frames (not yet mapped anywhere).
    pub fn add_host_region(&mut self, pages: u64) -> Result<HostRegion, L0Error> {
        let index = self.st.regions.len() as u32;
        let key = NodeKey::Object {
            kind: HOST_REGION_KIND,
            index,
        }
        .pack()
        .map_err(|_| L0Error::OutOfNodes)?;
        let node = self
            .tree
            .insert_root(key)
            .map_err(|_| L0Error::OutOfNodes)?;
        // Align regions to 1 GiB so that any page size can map them.
        let align = PageSize::Size1G.bytes() / PAGE_SIZE;
        let first_pfn = self.st.next_ram_pfn.div_ceil(align) * align;
        self.st.next_ram_pfn = first_pfn + pages;
        let region = HostRegion {
            first_pfn,
            pages,
            node,
        };
        self.st.regions.push(region);
        Ok(region)
    }

    fn region_of(&self, host: u64, size: PageSize) -> Option<&HostRegion> {
        let first = host / PAGE_SIZE;
        let last = (host + size.bytes()) / PAGE_SIZE;
        self.st
            .regions
            .iter()
            .find(|r| r.first_pfn <= first && last <= r.first_pfn + r.pages)
    }

    fn l0_changed(&mut self) {
        if self.st.config.revocation == RevocationMode::FlushEverything {
            self.st.stats.flush_everything_events += 1;
            for i in 1..self.st.spaces.len() {
                if self
                    .st
                    .space(i)
                    .is_some_and(|s| s.kind == SpaceKind::Shadow)
                {
                    unmap_range(&mut self.tree, &mut self.st, i, 0, TOP);
                    self.st.invalidate(i);
                }
            }
        }
    }

    /// L0 maps L1 guest-physical `l1_gpa` to host `host` (in a region given to L1). Replaces
    /// (and so revokes) whatever L0 mapped there.
    pub fn l0_map(
        &mut self,
        l1_gpa: u64,
        host: u64,
        size: PageSize,
        rights: Rights,
        memtype: MemType,
    ) -> Result<(), L0Error> {
        if !size.is_aligned(l1_gpa) || !size.is_aligned(host) {
            return Err(L0Error::Misaligned);
        }
        let parent = self.region_of(host, size).ok_or(L0Error::NotInRegion)?.node;
        if self.l0_translate(l1_gpa).is_some() {
            self.l0_changed();
        }
        let entry = EptEntry::leaf(host, size, rights, memtype, false);
        let result = put_leaf(&mut self.tree, &mut self.st, 0, l1_gpa, size, entry, parent);
        self.st.invalidate_dirty();
        result.map(|_| ()).map_err(|_| L0Error::OutOfNodes)
    }

    /// L0 takes back every mapping of L1 memory overlapping `[l1_gpa, l1_gpa + size)` (a large
    /// mapping reaching beyond the range goes entirely): revocation.
    pub fn l0_unmap(&mut self, l1_gpa: u64, size: PageSize) -> Result<(), L0Error> {
        self.l0_changed();
        let removed = unmap_range(
            &mut self.tree,
            &mut self.st,
            0,
            size.align_down(l1_gpa),
            size.bytes(),
        );
        self.st.invalidate_dirty();
        if removed == 0 {
            Err(L0Error::NotMapped)
        } else {
            Ok(())
        }
    }

    /// L0 changes the rights of its mapping covering `l1_gpa` (for example write-protects it
    /// for dirty logging). Whatever was derived from it is revoked first (it may hold rights
    /// the new mapping no longer gives).
    pub fn l0_protect(&mut self, l1_gpa: u64, rights: Rights) -> Result<(), L0Error> {
        let t = walk(
            &self.st.format,
            &self.st,
            self.st.spaces[0].as_ref().map_or(0, |s| s.root),
            l1_gpa,
        )
        .map_err(|_| L0Error::NotMapped)?;
        let leaf = t.leaf();
        let node = self
            .st
            .companion(leaf.table, leaf.index.get())
            .ok_or(L0Error::NotMapped)?;
        self.l0_changed();
        let st = &mut self.st;
        let _ = self
            .tree
            .revoke(node, &mut |id, key| st.on_removed(id, key));
        let entry = EptEntry::leaf(
            t.frame,
            t.size,
            rights,
            t.attributes.memtype,
            t.attributes.ignore_pat,
        );
        let _ = self.st.write_host(leaf.entry_address(), entry.0);
        self.st.invalidate_dirty();
        Ok(())
    }

    /// L0's translation of L1 guest-physical `l1_gpa`: (host address, L0 page size, rights,
    /// memory type).
    pub fn l0_translate(&self, l1_gpa: u64) -> Option<(u64, PageSize, Rights, MemType)> {
        let root = self.st.space(0)?.root;
        let t = walk(&self.st.format, &self.st, root, l1_gpa).ok()?;
        Some((t.address, t.size, t.rights, t.attributes.memtype))
    }

    /// The L0 mapping node covering `l1_gpa`.
    pub fn l0_node(&self, l1_gpa: u64) -> Option<NodeId> {
        let root = self.st.space(0)?.root;
        let t = walk(&self.st.format, &self.st, root, l1_gpa).ok()?;
        let leaf = t.leaf();
        self.st.companion(leaf.table, leaf.index.get())
    }

    /// Writes L1 guest-physical memory (as L1 itself would, e.g. editing its EPT).
    pub fn write_l1(&mut self, l1_gpa: u64, value: u64) -> Result<(), MemoryError> {
        let (host, _, rights, _) = self
            .l0_translate(l1_gpa)
            .ok_or(MemoryError::NotBacked { address: l1_gpa })?;
        if !rights.contains(Rights::WRITE) {
            return Err(MemoryError::ReadOnly { address: l1_gpa });
        }
        self.st.write_host(host & !7, value)
    }

    /// Reads host physical memory.
    pub fn read_host(&self, host: u64) -> u64 {
        self.st.read_u64(host & !7).unwrap_or(0)
    }

    /// Writes host physical memory (an L0 pager restoring a page's contents).
    pub fn write_host(&mut self, host: u64, value: u64) {
        let _ = self.st.write_host(host & !7, value);
    }

    fn shadow_space(&self, shadow: ShadowId) -> Result<usize, BackendError> {
        let index = shadow.0 as usize;
        match self.st.space(index) {
            Some(s) if s.kind == SpaceKind::Shadow => Ok(index),
            _ => Err(BackendError::NoSuchShadow),
        }
    }

    /// The kernel's affinity call for a vCPU using `shadow`: binds the shadow to `cpu` and
    /// flushes it there unless that CPU is already in sync with the root's generation.
    pub fn set_affinity(&mut self, shadow: ShadowId, cpu: usize) -> Result<(), BackendError> {
        let space = self.shadow_space(shadow)?;
        let cpu = cpu.min(self.st.tlbs.len() - 1);
        let root = self.st.space(space).map_or(0, |s| s.root);
        if let Some(s) = self.st.space_mut(space) {
            s.cpu = Some(cpu);
        }
        let generation = self.st.generation.get(&root).copied().unwrap_or(0);
        let synced = self.st.tlbs[cpu].synced.get(&root).copied();
        if synced == Some(generation) {
            self.st.stats.affinity_flushes_skipped += 1;
        } else {
            self.st.invept_on(cpu, root, generation);
        }
        Ok(())
    }

    /// The CPU a shadow is bound to.
    pub fn affinity(&self, shadow: ShadowId) -> Option<usize> {
        self.st.space(shadow.0 as usize).and_then(|s| s.cpu)
    }

    /// The root table address of a shadow (what goes into the EPTP of the VMCS running L2).
    pub fn shadow_root(&self, shadow: ShadowId) -> Option<u64> {
        self.shadow_space(shadow)
            .ok()
            .and_then(|i| self.st.space(i))
            .map(|s| s.root)
    }

    /// The modelled processor: L2, running on its shadow's CPU, accesses `l2_gpa`. Uses the
    /// TLB, else walks the shadow tables and caches the result; faults as hardware would.
    pub fn access(
        &mut self,
        shadow: ShadowId,
        l2_gpa: u64,
        access: Rights,
    ) -> Result<u64, HardwareFault> {
        let fault = HardwareFault::EptViolation(EptViolationQualification::for_access(access));
        let Ok(space) = self.shadow_space(shadow) else {
            return Err(fault);
        };
        let Some((root, Some(cpu))) = self.st.space(space).map(|s| (s.root, s.cpu)) else {
            return Err(fault);
        };
        let page = l2_gpa & !(PAGE_SIZE - 1);
        let offset = l2_gpa & (PAGE_SIZE - 1);
        if let Some(e) = self.st.tlbs[cpu].entries.get(&(root, page)).copied() {
            if e.rights.contains(access) {
                return Ok(e.host_page | offset);
            }
            // A violation invalidates the cached translations for the faulting address
            // (Vol. 3C §29.4.3.1); the processor may report the cached rights.
            self.st.tlbs[cpu].entries.remove(&(root, page));
            let q = EptViolationQualification::for_access(access).with_entry_rights(e.rights);
            return Err(HardwareFault::EptViolation(q));
        }
        match walk(&self.st.format, &self.st, root, l2_gpa) {
            Ok(t) if t.rights.contains(access) => {
                let entry = TlbEntry {
                    host_page: t.address & !(PAGE_SIZE - 1),
                    rights: t.rights,
                };
                self.st.tlbs[cpu].entries.insert((root, page), entry);
                Ok(t.address)
            }
            Ok(t) => Err(HardwareFault::EptViolation(
                EptViolationQualification::for_access(access).with_entry_rights(t.rights),
            )),
            Err(WalkError::NotPresent { .. }) => Err(fault),
            Err(_) => Err(HardwareFault::EptMisconfiguration),
        }
    }

    /// Every cached translation a vCPU could still use: (cpu, root, page, entry) for roots
    /// bound to that CPU now (used as they are) or whose CPU is in sync with the root's
    /// generation (a later affinity call would keep them).
    pub fn usable_tlb_entries(&self) -> Vec<(usize, u64, u64, TlbEntry)> {
        let bound: Vec<(u64, usize)> = self
            .st
            .spaces
            .iter()
            .flatten()
            .filter_map(|s| s.cpu.map(|c| (s.root, c)))
            .collect();
        let mut out = Vec::new();
        for (cpu, tlb) in self.st.tlbs.iter().enumerate() {
            for (&(root, page), &e) in &tlb.entries {
                let generation = self.st.generation.get(&root).copied().unwrap_or(0);
                let in_sync = tlb.synced.get(&root).copied().unwrap_or(0) == generation;
                if in_sync || bound.contains(&(root, cpu)) {
                    out.push((cpu, root, page, e));
                }
            }
        }
        out
    }

    /// The leaves of a shadow (or, with `ShadowId(0)`, of L0's map).
    pub fn leaves(&self, shadow: ShadowId) -> Vec<LeafInfo> {
        let mut out = Vec::new();
        let Some(root) = self.st.space(shadow.0 as usize).map(|s| s.root) else {
            return out;
        };
        let st = &self.st;
        let _ = traverse(&st.format, &mut ReadOnly(st), root, 0, TOP, |_, event| {
            if let Event::Leaf {
                base,
                frame,
                size,
                rights,
                attributes,
                step,
            } = event
            {
                out.push(LeafInfo {
                    base,
                    host: frame,
                    size,
                    rights,
                    memtype: attributes.memtype,
                    ignore_pat: attributes.ignore_pat,
                    node: st.companion(step.table, step.index.get()),
                });
            }
            Action::Keep
        });
        out
    }

    /// Live shadows.
    pub fn shadows(&self) -> Vec<ShadowId> {
        (0..self.st.spaces.len())
            .filter(|&i| {
                self.st
                    .space(i)
                    .is_some_and(|s| s.kind == SpaceKind::Shadow)
            })
            .map(|i| ShadowId(i as u32))
            .collect()
    }

    /// Table pages a shadow holds (root included).
    pub fn table_pages(&self, shadow: ShadowId) -> usize {
        self.st.space(shadow.0 as usize).map_or(0, |s| s.tables)
    }

    /// Derivation-tree nodes of a shadow's entries.
    pub fn shadow_nodes(&self, shadow: ShadowId) -> usize {
        self.st.space(shadow.0 as usize).map_or(0, |s| s.nodes)
    }

    /// Bytes of per-entry metadata of a shadow's tables: the companion arrays (4 bytes per
    /// entry of each table that holds leaves) and the per-table present counts.
    pub fn shadow_metadata_bytes(&self, shadow: ShadowId) -> usize {
        let Some(root) = self.st.space(shadow.0 as usize).map(|s| s.root) else {
            return 0;
        };
        let mut tables = Vec::new();
        tables.push(root);
        let _ = traverse(
            &self.st.format,
            &mut ReadOnly(&self.st),
            root,
            0,
            TOP,
            |_, e| {
                if let Event::TableDone { table, .. } = e {
                    tables.push(table);
                }
                Action::Keep
            },
        );
        tables
            .iter()
            .filter_map(|&t| self.st.table(t))
            .map(|t| {
                core::mem::size_of::<u16>()
                    + t.companion
                        .as_ref()
                        .map_or(0, |c| core::mem::size_of_val(&**c))
            })
            .sum()
    }

    /// Pages in the pool, free.
    pub fn pool_free(&self) -> usize {
        self.st.pool.len()
    }

    /// Pages donated to the pool and not reclaimed (free or holding shadow tables).
    pub fn pool_total(&self) -> usize {
        self.st.pool_total
    }

    /// Checks that the accounting adds up: every donated page is free or a shadow table.
    pub fn pool_consistent(&self) -> bool {
        let used: usize = self
            .st
            .spaces
            .iter()
            .flatten()
            .filter(|s| s.kind == SpaceKind::Shadow)
            .map(|s| s.tables)
            .sum();
        used + self.st.pool.len() == self.st.pool_total
    }
}

impl ShadowBackend for MemoryBackend {
    fn create_shadow(&mut self) -> Result<ShadowId, BackendError> {
        let root = self.st.pool.pop().ok_or(BackendError::OutOfTables)?;
        let index = match self.st.spaces.iter().skip(1).position(Option::is_none) {
            Some(i) => i + 1,
            None => {
                self.st.spaces.push(None);
                self.st.spaces.len() - 1
            }
        };
        let key_space = SHADOW_SPACE_BASE + index as u32;
        self.st.spaces[index] = Some(Space {
            kind: SpaceKind::Shadow,
            root,
            key_space,
            cpu: None,
            tables: 1,
            nodes: 0,
            dirty: false,
        });
        Ok(ShadowId(index as u32))
    }

    fn destroy_shadow(&mut self, shadow: ShadowId) -> Result<(), BackendError> {
        let space = self.shadow_space(shadow)?;
        unmap_range(&mut self.tree, &mut self.st, space, 0, TOP);
        self.st.invalidate(space);
        let root = self.st.space(space).map_or(0, |s| s.root);
        self.st.free_table(space, root);
        self.st.spaces[space] = None;
        Ok(())
    }

    fn install(
        &mut self,
        shadow: ShadowId,
        l2_gpa: u64,
        l1_gpa: u64,
        max_size: PageSize,
        rights: Rights,
        memtype: MemType,
        ignore_pat: bool,
    ) -> Result<Installed, BackendError> {
        let space = self.shadow_space(shadow)?;
        if (l2_gpa ^ l1_gpa) & max_size.offset_mask() != 0 {
            return Err(BackendError::Misaligned);
        }
        let l0_root = self.st.space(0).map_or(0, |s| s.root);
        let t = walk(&self.st.format, &self.st, l0_root, l1_gpa)
            .map_err(|_| BackendError::NotBacked { l1_gpa })?;
        let l0_leaf = t.leaf();
        let parent = self
            .st
            .companion(l0_leaf.table, l0_leaf.index.get())
            .ok_or(BackendError::NotBacked { l1_gpa })?;
        let size = max_size.min(t.size);
        let rights = rights & t.rights & Rights::RWX;
        let (memtype, ignore_pat) = shadow_memory_type(memtype, ignore_pat, t.attributes.memtype);
        let installed = Installed {
            size,
            rights,
            memtype,
            ignore_pat,
        };
        if rights.is_empty() {
            return Ok(installed);
        }
        let base = size.align_down(l2_gpa);
        let host = size.align_down(t.address);
        let entry = EptEntry::leaf(host, size, rights, memtype, ignore_pat);
        let result = put_leaf(
            &mut self.tree,
            &mut self.st,
            space,
            base,
            size,
            entry,
            parent,
        );
        self.st.invalidate_dirty();
        match result? {
            true => self.st.stats.installs += 1,
            false => self.st.stats.installs_unchanged += 1,
        }
        Ok(installed)
    }

    fn unmap(&mut self, shadow: ShadowId, l2_gpa: u64, size: PageSize) -> Result<(), BackendError> {
        let space = self.shadow_space(shadow)?;
        unmap_range(
            &mut self.tree,
            &mut self.st,
            space,
            size.align_down(l2_gpa),
            size.bytes(),
        );
        self.st.invalidate_dirty();
        Ok(())
    }

    fn flush(&mut self, shadow: ShadowId) -> Result<(), BackendError> {
        let space = self.shadow_space(shadow)?;
        unmap_range(&mut self.tree, &mut self.st, space, 0, TOP);
        self.st.invalidate(space);
        Ok(())
    }

    fn donate_table_pages(&mut self, pages: usize) -> Result<usize, BackendError> {
        for _ in 0..pages {
            let frame = self.st.new_table_frame();
            self.st.pool.push(frame);
        }
        self.st.pool_total += pages;
        Ok(pages)
    }

    fn reclaim_table_pages(&mut self, pages: usize) -> Result<usize, BackendError> {
        let n = pages.min(self.st.pool.len());
        for _ in 0..n {
            if let Some(frame) = self.st.pool.pop() {
                self.st.free_table_frames.push(frame);
            }
        }
        self.st.pool_total -= n;
        Ok(n)
    }

    fn read_l1(&self, l1_gpa: u64) -> Result<u64, MemoryError> {
        let root = self.st.space(0).map_or(0, |s| s.root);
        let t = walk(&self.st.format, &self.st, root, l1_gpa)
            .map_err(|_| MemoryError::NotBacked { address: l1_gpa })?;
        if !t.rights.contains(Rights::READ) {
            return Err(MemoryError::NotBacked { address: l1_gpa });
        }
        self.st.read_u64(t.address & !7)
    }

    fn compare_exchange_l1(
        &mut self,
        l1_gpa: u64,
        expected: u64,
        new: u64,
    ) -> Result<bool, MemoryError> {
        let root = self.st.space(0).map_or(0, |s| s.root);
        let t = walk(&self.st.format, &self.st, root, l1_gpa)
            .map_err(|_| MemoryError::NotBacked { address: l1_gpa })?;
        if !t.rights.contains(Rights::READ | Rights::WRITE) {
            return Err(MemoryError::ReadOnly { address: l1_gpa });
        }
        if self.st.read_u64(t.address & !7)? != expected {
            return Ok(false);
        }
        self.st.write_host(t.address & !7, new)?;
        Ok(true)
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new(MemoryBackendConfig::default())
    }
}
