//! The shadow-EPT engine: what the nested server decides for every EPT violation of an L2
//! guest, and the per-vCPU shadow bookkeeping behind it.
//!
//! # Dispatch
//! For an EPT violation at L2 guest-physical address `gpa` taken while a vCPU runs L2 on its
//! shadow of L1's EPT, [`Engine::handle_ept_violation`] walks L1's EPT (through the one
//! walker, reading L1 memory through the backend) and returns exactly one [`Dispatch`]:
//! - [`Dispatch::ReflectToL1`]: L1's EPT is misconfigured for `gpa`, or lacks the mapping or
//!   the rights. The exit for L1 carries `gpa` and the qualification the processor would have
//!   given L1 (access and access facts from the real exit, bits 5:3 from L1's walk).
//! - [`Dispatch::Fixed`]: the shadow was merely out of sync. The entry is installed through
//!   the backend with rights = L1's AND L0's, the largest page both allow (a large shadow page
//!   is never built over an L1 range holding an L1 EPT table page the engine has walked), the
//!   memory type of [`crate::backend::shadow_memory_type`], and up to 7 neighbours from the
//!   same 64-byte line of L1's leaf table prefetched.
//! - [`Dispatch::PassToL0`]: L1's EPT maps `gpa` but L0 does not back the L1 page (never
//!   populated, ballooned out, MMIO) or gives it fewer rights than the access needs, or L1's
//!   EPT table page itself is not backed: the L0 pager must act.
//!
//! # Invalidation rules
//! - **L1 edits its own EPT.** The engine does *not* track or write-protect L1's EPT table
//!   pages. It relies on the architectural rule that a processor may keep using cached
//!   translations (including ones derived from since-changed EPT entries) until INVEPT, and
//!   that an EPT violation or misconfiguration invalidates the cached translations of the
//!   faulting address (Vol. 3C §29.4.3.1, §29.4.1). So a shadow entry always matches some
//!   value L1's EPT held for that address since the last INVEPT or fault covering it, which
//!   is exactly what a real TLB may hold. On every reflected fault the engine removes the
//!   shadow entry that covered the address (when the processor reported that the shadow had
//!   one), as the processor would.
//! - **INVEPT from L1.** Single-context drops the vCPU's shadows whose EPT root (EPTRTA)
//!   matches; all-context drops all of the vCPU's shadows. INVEPT acts only on the logical
//!   processor that executes it (Vol. 3C §29.4.3.1), so an L1 vCPU's INVEPT affects only that
//!   vCPU's shadows: shadows are per vCPU, and L1 reaches the others by running INVEPT on each.
//! - **Migration.** Nothing here assumes a physical CPU. The kernel's affinity call flushes a
//!   vCPU's shadows on the destination CPU when that CPU may hold stale translations (see
//!   [`crate::memory_backend`] for the generation scheme that avoids needless flushes).
//! - **L0 revokes or changes L1 memory.** Handled entirely by the backend's derivation tree:
//!   each shadow entry is a child of the L0 mapping it came from, and revoking that mapping
//!   removes exactly those entries. The engine's bookkeeping is only a hint (LRU and prefetch
//!   bits) and stays correct when entries vanish under it.
//!
//! # Memory
//! Shadow-table pages come from a pool the server donates to the backend; when the backend
//! reports exhaustion the engine evicts least-recently-used shadow regions (the leaf table of
//! a 2 MiB region, or a 1 GiB region of large leaves), first of the faulting vCPU, then of
//! others, then inactive cached roots, and only then fails upward with
//! [`EngineError::OutOfTables`]. The engine keeps nothing per 4 KiB page: one region record
//! (with a 64-byte prefetch bitmap) per 2 MiB or 1 GiB region, plus per-shadow sets of L1
//! table pages seen and of large shadow pages built.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use caps::NodeId;
use caps::index::NodeIndex;

use crate::backend::{BackendError, Installed, L1Memory, ShadowBackend, ShadowId};
use crate::check::{EptCapabilities, EptViolationQualification, reflected_qualification};
use crate::entry::{EptFlags, Eptp, EptpError, PageSize, Rights};
use crate::walk::{
    Decoded, Ept, EptAttributes, Level, PageTableFormat, Translation, WalkError, walk,
};

/// Largest number of shadow roots a vCPU caches.
pub const MAX_ROOTS: usize = 4;
const NONE: u32 = u32::MAX;

/// Engine parameters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EngineConfig {
    /// What L1 is offered (decides which L1 entries are misconfigurations).
    pub capabilities: EptCapabilities,
    /// Shadow roots cached per vCPU (1 to [`MAX_ROOTS`]).
    pub root_cache: usize,
    /// Prefetch the other present entries of the faulting entry's 64-byte line.
    pub prefetch: bool,
    /// Build 2 MiB and 1 GiB shadow pages where L1 and L0 both allow.
    pub large_pages: bool,
    /// L1 EPT table pages remembered per shadow; beyond this the shadow stops building large
    /// pages until its next flush (bounds memory against a hostile L1).
    pub max_tracked_tables: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            capabilities: EptCapabilities::default(),
            root_cache: MAX_ROOTS,
            prefetch: true,
            large_pages: true,
            max_tracked_tables: 1 << 16,
        }
    }
}

/// A vCPU of the engine.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct VcpuId(pub u32);

/// An exit to inject into L1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum L1Exit {
    /// EPT violation of L1's EPT (exit reason 48).
    EptViolation {
        /// L2 guest-physical address (the guest-physical-address field for L1).
        gpa: u64,
        /// Exit qualification for L1.
        qualification: EptViolationQualification,
    },
    /// EPT misconfiguration of L1's EPT (exit reason 49).
    EptMisconfiguration {
        /// L2 guest-physical address.
        gpa: u64,
    },
}

/// The engine's decision for one EPT violation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Dispatch {
    /// Inject this exit into L1.
    ReflectToL1(L1Exit),
    /// The shadow now maps the address; resume L2.
    Fixed {
        /// Page size installed.
        size: PageSize,
        /// Rights installed.
        rights: Rights,
        /// Neighbouring entries installed too.
        prefetched: u16,
    },
    /// L0 must act on L1 guest-physical `l1_gpa` (page it in, break a copy-on-write, emulate
    /// MMIO), then resume L2, which faults again.
    PassToL0 {
        /// The L1 guest-physical address.
        l1_gpa: u64,
        /// The access L2 attempted (for L1's EPT table pages: a read, or a write to set A/D).
        access: Rights,
    },
}

/// Why the engine could not decide.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum EngineError {
    /// No such vCPU.
    NoSuchVcpu,
    /// The vCPU has no active shadow ([`Engine::activate`] first).
    NoActiveShadow,
    /// L1's EPT pointer fails the VM-entry checks.
    InvalidEptp(EptpError),
    /// The pool is exhausted and nothing is left to evict.
    OutOfTables,
    /// The derivation tree is full.
    OutOfNodes,
    /// L1 kept changing the entry while the engine set its accessed/dirty flags.
    L1Contended,
    /// Another backend failure.
    Backend(BackendError),
}

/// Per-vCPU counters of each path.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Counters {
    /// EPT violations handled.
    pub faults: u64,
    /// Reflected to L1 as EPT violations.
    pub reflected_violations: u64,
    /// Reflected to L1 as EPT misconfigurations.
    pub reflected_misconfigurations: u64,
    /// Fixed in the shadow.
    pub fixed: u64,
    /// Neighbouring entries prefetched.
    pub prefetched: u64,
    /// Passed to L0.
    pub passed_to_l0: u64,
    /// Shadow entries removed because a reflected fault covered them.
    pub reflect_unmaps: u64,
    /// Regions evicted (for this vCPU's faults or pool shrinking).
    pub evictions: u64,
    /// Large shadow pages removed because an L1 table page was found inside.
    pub large_pages_split: u64,
    /// Shadows created.
    pub shadows_created: u64,
    /// Activations served from the root cache.
    pub root_cache_hits: u64,
    /// INVEPT single-context handled.
    pub invept_single: u64,
    /// INVEPT all-context handled.
    pub invept_all: u64,
    /// Shadows an INVEPT left in place: every L1 entry they were built from was unchanged.
    pub invept_kept: u64,
    /// L1 EPT entries whose accessed/dirty flags the engine set.
    pub accessed_dirty_updates: u64,
}

#[derive(Clone, Copy)]
struct RootSlot {
    eptp: Eptp,
    shadow: ShadowId,
    last_used: u64,
}

struct VcpuState {
    slots: [Option<RootSlot>; MAX_ROOTS],
    active: Option<usize>,
    counters: Counters,
    lru_head: u32,
    lru_tail: u32,
}

#[derive(Default)]
struct ShadowInfo {
    vcpu: u32,
    /// L1 EPT table pages the engine walked (a hash set).
    l1_tables: NodeIndex,
    /// The 2 MiB ranges (key: base) and 1 GiB ranges (key: base | 1) holding one of them.
    table_spans: NodeIndex,
    tables_overflow: bool,
    large: BTreeMap<u64, (u64, PageSize)>,
    /// The 64-byte lines of L1's EPT every translation installed since the shadow was last
    /// emptied was walked through, as they were read (`None`: not tracked, or more than
    /// [`VERIFIED_LINES`]). With them an INVEPT can tell that nothing the shadow holds went
    /// stale. Tracking starts at a shadow's first INVEPT: only an L1 that uses INVEPT pays.
    lines: Option<BTreeMap<u64, [u64; 8]>>,
}

/// The most L1 EPT lines a shadow's INVEPT check re-reads; beyond, an INVEPT empties it.
const VERIFIED_LINES: usize = 64;

/// A shadow region: what one leaf table maps (2 MiB of 4 KiB leaves) or one PD maps (1 GiB of
/// large leaves). The unit of LRU eviction.
#[derive(Clone, Copy)]
struct Region {
    shadow: u32,
    key: u64,
    vcpu: u32,
    prev: u32,
    next: u32,
    /// Engine clock at the last use (orders the tails of the per-vCPU lists).
    stamp: u64,
    /// Entries of this region's table the engine installed (prefetch skips them). A hint:
    /// entries removed by L0 under the engine's feet stay marked and are refilled by faults.
    installed: [u64; 8],
}

/// Region key: base address, bit 0 set for a 1 GiB region of large leaves.
fn region_key(l2_base: u64, size: PageSize) -> u64 {
    match size {
        PageSize::Size4K => PageSize::Size2M.align_down(l2_base),
        _ => PageSize::Size1G.align_down(l2_base) | 1,
    }
}

fn region_span(key: u64) -> PageSize {
    if key & 1 == 0 {
        PageSize::Size2M
    } else {
        PageSize::Size1G
    }
}

/// Index of an entry within its region's table.
fn region_slot(l2_base: u64, size: PageSize) -> Option<usize> {
    match size {
        PageSize::Size4K => Some(Level::PT.index(l2_base).get()),
        PageSize::Size2M => Some(Level::PD.index(l2_base).get()),
        PageSize::Size1G => None,
    }
}

#[derive(Default)]
struct Regions {
    nodes: Vec<Region>,
    free: Vec<u32>,
    /// Per shadow, region key -> node (a hash index: the fault path looks regions up).
    index: BTreeMap<u32, NodeIndex>,
}

impl Regions {
    fn get(&self, shadow: u32, key: u64) -> Option<u32> {
        self.index
            .get(&shadow)
            .and_then(|index| index.get(key))
            .map(|(node, _)| node.index())
    }

    fn insert(&mut self, shadow: u32, key: u64, i: u32) {
        self.index
            .entry(shadow)
            .or_default()
            .insert(key, NodeId::from_index(i), 0);
    }

    fn remove(&mut self, shadow: u32, key: u64) {
        if let Some(index) = self.index.get_mut(&shadow) {
            index.remove(key);
            if index.is_empty() {
                self.index.remove(&shadow);
            }
        }
    }

    fn len(&self) -> usize {
        self.index.values().map(NodeIndex::len).sum()
    }
}

/// Upper bound of the heap bytes of a `BTreeMap` with `len` entries of `entry` bytes: leaves
/// hold 11 entries and are at least 5/11 full, internal nodes add 12 pointers per node.
fn btree_bytes(len: usize, entry: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let node = 16 + 11 * entry;
    let leaves = len.div_ceil(5);
    leaves * node + leaves.div_ceil(5) * (node + 12 * 8)
}

/// The shadow-EPT engine of one nested server: all vCPUs of the L1 it serves.
pub struct Engine {
    config: EngineConfig,
    format: Ept,
    vcpus: Vec<VcpuState>,
    shadows: BTreeMap<u32, ShadowInfo>,
    regions: Regions,
    clock: u64,
}

impl Engine {
    /// An engine with no vCPUs.
    pub fn new(config: EngineConfig) -> Self {
        let config = EngineConfig {
            root_cache: config.root_cache.clamp(1, MAX_ROOTS),
            ..config
        };
        Self {
            config,
            format: Ept {
                capabilities: config.capabilities,
            },
            vcpus: Vec::new(),
            shadows: BTreeMap::new(),
            regions: Regions::default(),
            clock: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Adds a vCPU.
    pub fn add_vcpu(&mut self) -> VcpuId {
        self.vcpus.push(VcpuState {
            slots: [None; MAX_ROOTS],
            active: None,
            counters: Counters::default(),
            lru_head: NONE,
            lru_tail: NONE,
        });
        VcpuId(self.vcpus.len() as u32 - 1)
    }

    /// The vCPU's counters.
    pub fn counters(&self, vcpu: VcpuId) -> Option<Counters> {
        self.vcpus.get(vcpu.0 as usize).map(|v| v.counters)
    }

    /// The vCPU's cached shadows (active or not), for the kernel's affinity call.
    pub fn shadows_of(&self, vcpu: VcpuId) -> Vec<ShadowId> {
        self.vcpus
            .get(vcpu.0 as usize)
            .map(|v| v.slots.iter().flatten().map(|s| s.shadow).collect())
            .unwrap_or_default()
    }

    /// The vCPU's cached roots: (L1 EPT pointer, shadow).
    pub fn roots_of(&self, vcpu: VcpuId) -> Vec<(Eptp, ShadowId)> {
        self.vcpus
            .get(vcpu.0 as usize)
            .map(|v| {
                v.slots
                    .iter()
                    .flatten()
                    .map(|s| (s.eptp, s.shadow))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The active shadow and L1 EPT pointer of a vCPU.
    pub fn active(&self, vcpu: VcpuId) -> Option<(Eptp, ShadowId)> {
        let v = self.vcpus.get(vcpu.0 as usize)?;
        let slot = v.slots.get(v.active?)?.as_ref()?;
        Some((slot.eptp, slot.shadow))
    }

    /// L1 enters L2 with EPT pointer `eptp` on `vcpu`: returns the shadow to run L2 on, from the
    /// root cache or newly created (evicting the least recently used cached root if full).
    pub fn activate<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        vcpu: VcpuId,
        eptp: Eptp,
    ) -> Result<ShadowId, EngineError> {
        let caps = self.config.capabilities;
        eptp.check(caps.accessed_dirty, caps.max_phys_bits)
            .map_err(EngineError::InvalidEptp)?;
        self.clock += 1;
        let clock = self.clock;
        let limit = self.config.root_cache;
        let v = self
            .vcpus
            .get_mut(vcpu.0 as usize)
            .ok_or(EngineError::NoSuchVcpu)?;
        let cached = v.slots[..limit]
            .iter()
            .position(|s| s.is_some_and(|s| s.eptp == eptp));
        if let Some(i) = cached
            && let Some(slot) = v.slots[i].as_mut()
        {
            slot.last_used = clock;
            v.active = Some(i);
            v.counters.root_cache_hits += 1;
            return Ok(slot.shadow);
        }
        let victim = match v.slots[..limit].iter().position(Option::is_none) {
            Some(i) => i,
            None => (0..limit)
                .min_by_key(|&i| v.slots[i].map_or(0, |s| s.last_used))
                .unwrap_or(0),
        };
        v.active = None;
        if let Some(old) = v.slots[victim].take() {
            self.drop_shadow_state(old.shadow);
            backend
                .destroy_shadow(old.shadow)
                .map_err(EngineError::Backend)?;
        }
        let shadow = loop {
            match backend.create_shadow() {
                Ok(s) => break s,
                Err(BackendError::OutOfTables) => {
                    if !self.make_room(backend, Some(vcpu.0))? {
                        return Err(EngineError::OutOfTables);
                    }
                }
                Err(e) => return Err(EngineError::Backend(e)),
            }
        };
        self.shadows.insert(
            shadow.0,
            ShadowInfo {
                vcpu: vcpu.0,
                ..ShadowInfo::default()
            },
        );
        let v = &mut self.vcpus[vcpu.0 as usize];
        v.slots[victim] = Some(RootSlot {
            eptp,
            shadow,
            last_used: clock,
        });
        v.active = Some(victim);
        v.counters.shadows_created += 1;
        Ok(shadow)
    }

    /// L1 executed INVEPT single-context for `eptp` on `vcpu`: drops the vCPU's shadows of that
    /// EPT root (the cache slots stay, empty).
    pub fn invept_single_context<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        vcpu: VcpuId,
        eptp: Eptp,
    ) -> Result<(), EngineError> {
        let v = self
            .vcpus
            .get_mut(vcpu.0 as usize)
            .ok_or(EngineError::NoSuchVcpu)?;
        v.counters.invept_single += 1;
        let targets: Vec<ShadowId> = v
            .slots
            .iter()
            .flatten()
            .filter(|s| s.eptp.root() == eptp.root())
            .map(|s| s.shadow)
            .collect();
        for shadow in targets {
            self.invept_shadow(backend, shadow)?;
        }
        Ok(())
    }

    /// L1 executed INVEPT all-context on `vcpu`: drops all the vCPU's shadows.
    pub fn invept_all_context<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        vcpu: VcpuId,
    ) -> Result<(), EngineError> {
        let v = self
            .vcpus
            .get_mut(vcpu.0 as usize)
            .ok_or(EngineError::NoSuchVcpu)?;
        v.counters.invept_all += 1;
        for shadow in self.shadows_of(vcpu) {
            self.invept_shadow(backend, shadow)?;
        }
        Ok(())
    }

    /// Empties `shadow`; with `track`, what it is filled with from now on is tracked for
    /// INVEPT ([`ShadowInfo::lines`]).
    fn empty_shadow<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        shadow: ShadowId,
        track: bool,
    ) -> Result<(), EngineError> {
        let vcpu = self.shadows.get(&shadow.0).map_or(0, |s| s.vcpu);
        self.drop_shadow_state(shadow);
        self.shadows.insert(
            shadow.0,
            ShadowInfo {
                vcpu,
                lines: track.then(BTreeMap::new),
                ..ShadowInfo::default()
            },
        );
        backend.flush(shadow).map_err(EngineError::Backend)
    }

    /// INVEPT for `shadow` (SDM Vol. 3C §29.4.3.1: cached translations derived from the EPT
    /// go). A shadow holds only translations built from present L1 entries; when every
    /// present entry of every L1 line it was built from reads the same now, nothing it holds
    /// is stale and it stays. Otherwise (or untracked) it is emptied, and tracked from then on.
    /// The backend's reads must be fresh (a caching backend drops its lines first).
    fn invept_shadow<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        shadow: ShadowId,
    ) -> Result<(), EngineError> {
        let unchanged = self
            .shadows
            .get(&shadow.0)
            .and_then(|info| info.lines.as_ref())
            .is_some_and(|lines| {
                lines.iter().all(|(&line, before)| {
                    backend
                        .read_l1_line(line)
                        .is_ok_and(|now| before.iter().zip(&now).all(|(b, n)| b & 7 == 0 || b == n))
                })
            });
        if unchanged {
            let v = self.shadows.get(&shadow.0).map_or(0, |s| s.vcpu) as usize;
            if let Some(state) = self.vcpus.get_mut(v) {
                state.counters.invept_kept += 1;
            }
            return Ok(());
        }
        self.empty_shadow(backend, shadow, true)
    }

    /// Records, for a tracked shadow, the L1 entries translation `t` walked through.
    fn track_lines<B: ShadowBackend>(
        &mut self,
        backend: &B,
        shadow: ShadowId,
        t: &Translation<EptAttributes>,
    ) {
        let tracked = self
            .shadows
            .get(&shadow.0)
            .is_some_and(|info| info.lines.is_some());
        if !tracked {
            return;
        }
        for step in t.path.steps() {
            self.track_entry(backend, shadow, step.entry_address(), step.entry);
        }
    }

    /// Records that an entry the shadow was built from, at L1 address `address`, held `value`.
    /// A line is recorded whole when first seen; an entry recorded present with another value
    /// (the shadow then holds translations from both) ends the tracking.
    fn track_entry<B: ShadowBackend>(
        &mut self,
        backend: &B,
        shadow: ShadowId,
        address: u64,
        value: u64,
    ) {
        let Some(info) = self.shadows.get_mut(&shadow.0) else {
            return;
        };
        let Some(lines) = info.lines.as_mut() else {
            return;
        };
        let (line, index) = (address & !63, ((address & 63) / 8) as usize);
        if !lines.contains_key(&line) {
            match backend.read_l1_line(line) {
                Ok(words) if lines.len() < VERIFIED_LINES => {
                    lines.insert(line, words);
                }
                _ => {
                    info.lines = None;
                    return;
                }
            }
        }
        if let Some(words) = lines.get_mut(&line) {
            if words[index] & 7 != 0 && words[index] != value {
                info.lines = None;
            } else {
                words[index] = value;
            }
        }
    }

    /// Forgets the engine's bookkeeping of a shadow (its regions, tables seen, large pages).
    fn drop_shadow_state(&mut self, shadow: ShadowId) {
        self.shadows.remove(&shadow.0);
        let keys: Vec<u32> = self
            .regions
            .index
            .get(&shadow.0)
            .map(|index| index.iter().map(|(_, node, _)| node.index()).collect())
            .unwrap_or_default();
        for i in keys {
            self.region_free(i);
        }
    }

    /// Removes a vCPU's shadows (the vCPU stays, with an empty root cache).
    pub fn reset_vcpu<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        vcpu: VcpuId,
    ) -> Result<(), EngineError> {
        let v = self
            .vcpus
            .get_mut(vcpu.0 as usize)
            .ok_or(EngineError::NoSuchVcpu)?;
        v.active = None;
        let slots: Vec<RootSlot> = v.slots.iter_mut().filter_map(Option::take).collect();
        for slot in slots {
            self.drop_shadow_state(slot.shadow);
            backend
                .destroy_shadow(slot.shadow)
                .map_err(EngineError::Backend)?;
        }
        Ok(())
    }

    /// Handles an EPT violation that L2 took on `vcpu`'s active shadow at `gpa`, with the
    /// exit qualification the processor reported. See the module documentation.
    pub fn handle_ept_violation<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        vcpu: VcpuId,
        gpa: u64,
        qualification: EptViolationQualification,
    ) -> Result<Dispatch, EngineError> {
        let (eptp, shadow) = self.active(vcpu).ok_or(EngineError::NoActiveShadow)?;
        let v = vcpu.0 as usize;
        self.vcpus[v].counters.faults += 1;
        let access = qualification.access();
        let mut translation = None;
        for _ in 0..4 {
            match walk(&self.format, &L1Memory(&*backend), eptp.root(), gpa) {
                Err(WalkError::Memory { table, .. }) => {
                    return Ok(self.pass_to_l0(v, table, Rights::READ));
                }
                Err(WalkError::Invalid { .. }) => {
                    self.reflect_unmap(backend, v, shadow, gpa, qualification)?;
                    self.vcpus[v].counters.reflected_misconfigurations += 1;
                    return Ok(Dispatch::ReflectToL1(L1Exit::EptMisconfiguration { gpa }));
                }
                Err(WalkError::NotPresent { .. }) => {
                    return self.reflect_violation(
                        backend,
                        v,
                        shadow,
                        gpa,
                        qualification,
                        Rights::empty(),
                    );
                }
                Ok(t) if !t.rights.contains(access & Rights::RWX) => {
                    let rights = t.rights & Rights::RWX;
                    return self.reflect_violation(backend, v, shadow, gpa, qualification, rights);
                }
                Ok(t) => {
                    self.learn_tables(backend, v, shadow, &t)?;
                    if !eptp.accessed_dirty() {
                        translation = Some(t);
                        break;
                    }
                    match self.set_accessed_dirty(backend, v, &t, access) {
                        Ok(true) => {
                            translation = Some(t);
                            break;
                        }
                        Ok(false) => continue,
                        Err(table) => return Ok(self.pass_to_l0(v, table, Rights::WRITE)),
                    }
                }
            }
        }
        let Some(t) = translation else {
            return Err(EngineError::L1Contended);
        };
        let mut rights = t.rights & Rights::RWX;
        if eptp.accessed_dirty() && !t.attributes.dirty && !access.contains(Rights::WRITE) {
            // Write-protect until the first write, which faults and sets the dirty flag.
            rights.remove(Rights::WRITE);
        }
        let size = self.shadow_size(shadow, &t);
        let installed = loop {
            match self.install(backend, shadow, gpa, t.address, size, rights, &t) {
                Ok(i) => break i,
                Err(BackendError::OutOfTables) => {
                    if !self.make_room(backend, Some(vcpu.0))? {
                        return Err(EngineError::OutOfTables);
                    }
                }
                Err(BackendError::NotBacked { .. }) => {
                    return Ok(self.pass_to_l0(v, t.address, access));
                }
                Err(BackendError::OutOfNodes) => return Err(EngineError::OutOfNodes),
                Err(e) => return Err(EngineError::Backend(e)),
            }
        };
        // Whatever was installed (even with fewer rights than the access needs) is tracked.
        self.track_lines(backend, shadow, &t);
        if !installed.rights.contains(access & Rights::RWX) {
            return Ok(self.pass_to_l0(v, t.address, access));
        }
        let prefetched = if self.config.prefetch {
            self.prefetch(backend, shadow, eptp, gpa, &t)?
        } else {
            0
        };
        let c = &mut self.vcpus[v].counters;
        c.fixed += 1;
        c.prefetched += u64::from(prefetched);
        Ok(Dispatch::Fixed {
            size: installed.size,
            rights: installed.rights,
            prefetched,
        })
    }

    fn pass_to_l0(&mut self, v: usize, l1_gpa: u64, access: Rights) -> Dispatch {
        self.vcpus[v].counters.passed_to_l0 += 1;
        Dispatch::PassToL0 { l1_gpa, access }
    }

    fn reflect_violation<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        v: usize,
        shadow: ShadowId,
        gpa: u64,
        incoming: EptViolationQualification,
        l1_rights: Rights,
    ) -> Result<Dispatch, EngineError> {
        self.reflect_unmap(backend, v, shadow, gpa, incoming)?;
        self.vcpus[v].counters.reflected_violations += 1;
        let qualification = reflected_qualification(incoming, l1_rights);
        Ok(Dispatch::ReflectToL1(L1Exit::EptViolation {
            gpa,
            qualification,
        }))
    }

    /// A fault reflected to L1 invalidates the cached translations of its address, as the
    /// processor's own fault would: if the processor reported that the shadow granted some
    /// rights there (bits 5:3), the covering shadow entry goes.
    fn reflect_unmap<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        v: usize,
        shadow: ShadowId,
        gpa: u64,
        incoming: EptViolationQualification,
    ) -> Result<(), EngineError> {
        if incoming.entry_rights().is_empty() {
            return Ok(());
        }
        self.vcpus[v].counters.reflect_unmaps += 1;
        backend
            .unmap(shadow, gpa, PageSize::Size4K)
            .map_err(EngineError::Backend)
    }

    /// Records the L1 EPT table pages `t` used; a large shadow page found to cover one of
    /// them is removed (it will be rebuilt smaller).
    fn learn_tables<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        v: usize,
        shadow: ShadowId,
        t: &Translation<EptAttributes>,
    ) -> Result<(), EngineError> {
        let limit = self.config.max_tracked_tables;
        let Some(info) = self.shadows.get_mut(&shadow.0) else {
            return Ok(());
        };
        for step in t.path.steps() {
            let table = step.table;
            if info.tables_overflow || info.l1_tables.contains_key(table) {
                continue;
            }
            if info.l1_tables.len() >= limit {
                info.tables_overflow = true;
                info.l1_tables = NodeIndex::new();
                info.table_spans = NodeIndex::new();
                continue;
            }
            let none = NodeId::from_index(0);
            info.l1_tables.insert(table, none, 0);
            info.table_spans
                .insert(PageSize::Size2M.align_down(table), none, 0);
            info.table_spans
                .insert(PageSize::Size1G.align_down(table) | 1, none, 0);
            if info.large.is_empty() {
                continue;
            }
            let low = table.saturating_sub(PageSize::Size1G.bytes() - 1);
            let covering: Vec<u64> = info
                .large
                .range(low..=table)
                .filter(|(l1, (_, size))| table < *l1 + size.bytes())
                .map(|(l1, _)| *l1)
                .collect();
            for l1 in covering {
                if let Some((l2, size)) = info.large.remove(&l1) {
                    backend
                        .unmap(shadow, l2, size)
                        .map_err(EngineError::Backend)?;
                    self.vcpus[v].counters.large_pages_split += 1;
                }
            }
        }
        if info.tables_overflow && !info.large.is_empty() {
            // Every large page may now cover an unknown table page: drop them all.
            let all: Vec<(u64, PageSize)> = info.large.values().copied().collect();
            info.large.clear();
            for (l2, size) in all {
                backend
                    .unmap(shadow, l2, size)
                    .map_err(EngineError::Backend)?;
                self.vcpus[v].counters.large_pages_split += 1;
            }
        }
        Ok(())
    }

    /// Sets the accessed flag of every entry `t` used, and the dirty flag of the leaf for a
    /// write (Vol. 3C §29.3.5), with compare-exchange. `Ok(false)`: an entry changed under us
    /// (walk again). `Err(table)`: L0 does not let L1's table page be written.
    fn set_accessed_dirty<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        v: usize,
        t: &Translation<EptAttributes>,
        access: Rights,
    ) -> Result<bool, u64> {
        let steps = t.path.steps();
        for (i, step) in steps.iter().enumerate() {
            let mut want = step.entry | EptFlags::ACCESSED.bits();
            if i + 1 == steps.len() && access.contains(Rights::WRITE) {
                want |= EptFlags::DIRTY.bits();
            }
            if want == step.entry {
                continue;
            }
            match backend.compare_exchange_l1(step.entry_address(), step.entry, want) {
                Ok(true) => self.vcpus[v].counters.accessed_dirty_updates += 1,
                Ok(false) => return Ok(false),
                Err(_) => return Err(step.table),
            }
        }
        Ok(true)
    }

    /// The largest shadow page for translation `t`: at most L1's page, and never a large
    /// page whose L1 range holds an L1 EPT table page the engine has walked.
    fn shadow_size(&self, shadow: ShadowId, t: &Translation<EptAttributes>) -> PageSize {
        if !self.config.large_pages {
            return PageSize::Size4K;
        }
        let info = self.shadows.get(&shadow.0);
        for size in PageSize::DESCENDING {
            if size > t.size || (size == PageSize::Size1G && !self.config.capabilities.pages_1g) {
                continue;
            }
            if size == PageSize::Size4K {
                break;
            }
            let base = size.align_down(t.address);
            let key = if size == PageSize::Size1G {
                base | 1
            } else {
                base
            };
            let blocked = info.is_none_or(|i| i.tables_overflow || i.table_spans.contains_key(key));
            if !blocked {
                return size;
            }
        }
        PageSize::Size4K
    }

    #[allow(clippy::too_many_arguments)]
    fn install<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        shadow: ShadowId,
        l2_gpa: u64,
        l1_gpa: u64,
        size: PageSize,
        rights: Rights,
        t: &Translation<EptAttributes>,
    ) -> Result<Installed, BackendError> {
        let a = t.attributes;
        let installed = backend.install(
            shadow,
            l2_gpa,
            l1_gpa,
            size,
            rights,
            a.memtype,
            a.ignore_pat,
        )?;
        if !installed.rights.is_empty() {
            let l2 = installed.size.align_down(l2_gpa);
            self.touch(shadow, l2, installed.size);
            if installed.size != PageSize::Size4K
                && let Some(info) = self.shadows.get_mut(&shadow.0)
            {
                info.large
                    .insert(installed.size.align_down(l1_gpa), (l2, installed.size));
            }
        }
        Ok(installed)
    }

    /// Installs the other present, valid entries of the faulting entry's 64-byte line of L1's
    /// table (up to 7) that the engine has not installed already. Failures are skipped; pool
    /// exhaustion ends prefetching without evicting.
    fn prefetch<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        shadow: ShadowId,
        eptp: Eptp,
        gpa: u64,
        t: &Translation<EptAttributes>,
    ) -> Result<u16, EngineError> {
        let leaf = t.leaf();
        let Some(level) = Level::new(leaf.level) else {
            return Ok(0);
        };
        let Some(leaf_size) = level.leaf_size() else {
            return Ok(0);
        };
        let table_span = level.span() << Level::INDEX_BITS;
        let table_base = gpa & !(table_span - 1);
        let first = leaf.index.get() & !7;
        // The line the walk just read (cached by a caching backend). Entries with no rights
        // hold nothing to prefetch: a sparse table costs no decoding and no region lookup.
        let Ok(line) = backend.read_l1_line(leaf.table + first as u64 * 8) else {
            return Ok(0);
        };
        let mut above = None;
        let mut count = 0u16;
        for j in first..first + 8 {
            let raw = line[j - first];
            if j == leaf.index.get() || raw & 7 == 0 {
                continue;
            }
            let above = *above.get_or_insert_with(|| {
                let mut rights = Rights::RWX;
                for step in &t.path.steps()[..t.path.steps().len().saturating_sub(1)] {
                    if let Some(l) = Level::new(step.level)
                        && let Decoded::Table { rights: r, .. } = self.format.decode(l, step.entry)
                    {
                        rights &= r;
                    }
                }
                rights
            });
            let Decoded::Leaf {
                address,
                size,
                rights,
                attributes,
            } = self.format.decode(level, raw)
            else {
                continue;
            };
            let n_l2 = table_base + j as u64 * level.span();
            if self.is_installed(shadow, n_l2, leaf_size) {
                continue;
            }
            let mut rights = rights & above;
            if eptp.accessed_dirty() {
                if !attributes.accessed {
                    continue;
                }
                if !attributes.dirty {
                    rights.remove(Rights::WRITE);
                }
            }
            if rights.is_empty() {
                continue;
            }
            let mut n = *t;
            n.address = address;
            n.frame = address;
            n.size = size;
            n.attributes = attributes;
            let size = self.shadow_size(shadow, &n);
            match self.install(backend, shadow, n_l2, address, size, rights, &n) {
                Ok(i) if !i.rights.is_empty() => {
                    count += 1;
                    self.track_entry(backend, shadow, leaf.table + j as u64 * 8, raw);
                }
                Ok(_) | Err(BackendError::NotBacked { .. }) | Err(BackendError::Misaligned) => {}
                Err(BackendError::OutOfTables) | Err(BackendError::OutOfNodes) => break,
                Err(e) => return Err(EngineError::Backend(e)),
            }
        }
        Ok(count)
    }

    fn is_installed(&self, shadow: ShadowId, l2_base: u64, size: PageSize) -> bool {
        let Some(slot) = region_slot(l2_base, size) else {
            return false;
        };
        let key = region_key(l2_base, size);
        self.regions
            .get(shadow.0, key)
            .and_then(|i| self.regions.nodes.get(i as usize))
            .is_some_and(|r| r.installed[slot / 64] & (1 << (slot % 64)) != 0)
    }

    /// Marks the region of a fresh entry most recently used (creating it if new).
    fn touch(&mut self, shadow: ShadowId, l2_base: u64, size: PageSize) {
        let key = region_key(l2_base, size);
        let vcpu = self.shadows.get(&shadow.0).map_or(0, |s| s.vcpu);
        let i = match self.regions.get(shadow.0, key) {
            Some(i) => {
                self.lru_unlink(i);
                i
            }
            None => {
                let region = Region {
                    shadow: shadow.0,
                    key,
                    vcpu,
                    prev: NONE,
                    next: NONE,
                    stamp: 0,
                    installed: [0; 8],
                };
                let i = match self.regions.free.pop() {
                    Some(i) => {
                        self.regions.nodes[i as usize] = region;
                        i
                    }
                    None => {
                        self.regions.nodes.push(region);
                        self.regions.nodes.len() as u32 - 1
                    }
                };
                self.regions.insert(shadow.0, key, i);
                i
            }
        };
        self.clock += 1;
        let region = &mut self.regions.nodes[i as usize];
        region.stamp = self.clock;
        if let Some(slot) = region_slot(l2_base, size) {
            region.installed[slot / 64] |= 1 << (slot % 64);
        }
        self.lru_push_front(i);
    }

    fn lru_unlink(&mut self, i: u32) {
        let Region {
            prev, next, vcpu, ..
        } = self.regions.nodes[i as usize];
        let Some(v) = self.vcpus.get_mut(vcpu as usize) else {
            return;
        };
        if prev == NONE {
            v.lru_head = next;
        } else {
            self.regions.nodes[prev as usize].next = next;
        }
        if next == NONE {
            v.lru_tail = prev;
        } else {
            self.regions.nodes[next as usize].prev = prev;
        }
        let r = &mut self.regions.nodes[i as usize];
        r.prev = NONE;
        r.next = NONE;
    }

    fn lru_push_front(&mut self, i: u32) {
        let vcpu = self.regions.nodes[i as usize].vcpu;
        let Some(v) = self.vcpus.get_mut(vcpu as usize) else {
            return;
        };
        let old = v.lru_head;
        v.lru_head = i;
        if old == NONE {
            v.lru_tail = i;
        } else {
            self.regions.nodes[old as usize].prev = i;
        }
        let r = &mut self.regions.nodes[i as usize];
        r.prev = NONE;
        r.next = old;
    }

    fn region_free(&mut self, i: u32) {
        self.lru_unlink(i);
        let r = self.regions.nodes[i as usize];
        self.regions.remove(r.shadow, r.key);
        self.regions.nodes[i as usize].installed = [0; 8];
        self.regions.free.push(i);
    }

    /// Evicts the least recently used region of `vcpu` (or of anyone), else an inactive cached
    /// root. Returns whether anything was freed.
    fn make_room<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        vcpu: Option<u32>,
    ) -> Result<bool, EngineError> {
        let own = vcpu
            .and_then(|v| self.vcpus.get(v as usize))
            .map_or(NONE, |v| v.lru_tail);
        let victim = if own != NONE {
            Some(own)
        } else {
            // The globally least recently used region is the oldest of the per-vCPU tails.
            let tails = self.vcpus.iter().map(|v| v.lru_tail).filter(|&t| t != NONE);
            tails.min_by_key(|&t| self.regions.nodes[t as usize].stamp)
        };
        if let Some(i) = victim {
            let r = self.regions.nodes[i as usize];
            let span = region_span(r.key);
            let base = r.key & !1;
            self.region_free(i);
            if span == PageSize::Size1G {
                // The 2 MiB regions inside (a scan of this shadow's regions: evictions are
                // rare, faults are not).
                let end = base + span.bytes();
                let inner: Vec<u32> = self
                    .regions
                    .index
                    .get(&r.shadow)
                    .map(|index| {
                        index
                            .iter()
                            .filter(|&(key, _, _)| key & 1 == 0 && (base..end).contains(&key))
                            .map(|(_, node, _)| node.index())
                            .collect()
                    })
                    .unwrap_or_default();
                for j in inner {
                    self.region_free(j);
                }
            }
            backend
                .unmap(ShadowId(r.shadow), base, span)
                .map_err(EngineError::Backend)?;
            if let Some(v) = self.vcpus.get_mut(vcpu.unwrap_or(r.vcpu) as usize) {
                v.counters.evictions += 1;
            }
            return Ok(true);
        }
        // Last resort: destroy an inactive cached root (own vCPU first).
        let order: Vec<usize> = match vcpu {
            Some(v) => core::iter::once(v as usize)
                .chain(0..self.vcpus.len())
                .collect(),
            None => (0..self.vcpus.len()).collect(),
        };
        for v in order {
            let Some(state) = self.vcpus.get_mut(v) else {
                continue;
            };
            let active = state.active;
            let Some(i) = (0..MAX_ROOTS).find(|&i| Some(i) != active && state.slots[i].is_some())
            else {
                continue;
            };
            let Some(slot) = state.slots[i].take() else {
                continue;
            };
            self.drop_shadow_state(slot.shadow);
            backend
                .destroy_shadow(slot.shadow)
                .map_err(EngineError::Backend)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The server wants `pages` pool pages back: reclaims free ones, evicting LRU regions
    /// (of any vCPU) and inactive roots as needed. Returns how many pages came back.
    pub fn shrink_pool<B: ShadowBackend>(
        &mut self,
        backend: &mut B,
        pages: usize,
    ) -> Result<usize, EngineError> {
        let mut got = 0;
        loop {
            got += backend
                .reclaim_table_pages(pages - got)
                .map_err(EngineError::Backend)?;
            if got >= pages || !self.make_room(backend, None)? {
                return Ok(got);
            }
        }
    }

    /// Regions the engine tracks (for tests and accounting).
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Heap and inline bytes of the engine's bookkeeping: vCPU states, region records and
    /// their index, per-shadow sets. B-tree sizes are upper bounds (see `btree_bytes`).
    pub fn bookkeeping_bytes(&self) -> usize {
        use core::mem::size_of;
        let vcpus = self.vcpus.capacity() * size_of::<VcpuState>();
        let regions = self.regions.nodes.capacity() * size_of::<Region>()
            + self.regions.free.capacity() * size_of::<u32>()
            + btree_bytes(
                self.regions.index.len(),
                size_of::<u32>() + size_of::<NodeIndex>(),
            )
            + self
                .regions
                .index
                .values()
                .map(NodeIndex::bytes)
                .sum::<usize>();
        let shadows = btree_bytes(
            self.shadows.len(),
            size_of::<u32>() + size_of::<ShadowInfo>(),
        ) + self
            .shadows
            .values()
            .map(|s| {
                s.l1_tables.bytes()
                    + s.table_spans.bytes()
                    + s.lines.as_ref().map_or(0, |lines| {
                        btree_bytes(lines.len(), size_of::<u64>() + size_of::<[u64; 8]>())
                    })
                    + btree_bytes(
                        s.large.len(),
                        size_of::<u64>() + size_of::<(u64, PageSize)>(),
                    )
            })
            .sum::<usize>();
        size_of::<Self>() + vcpus + regions + shadows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_keys_separate_leaf_tables_from_large_page_regions() {
        assert_eq!(region_key(0x20_3000, PageSize::Size4K), 0x20_0000);
        assert_eq!(region_key(0x4020_0000, PageSize::Size2M), 0x4000_0001);
        assert_eq!(region_span(0x4000_0001), PageSize::Size1G);
        assert_eq!(region_slot(0x20_3000, PageSize::Size4K), Some(3));
        assert_eq!(region_slot(0x4060_0000, PageSize::Size2M), Some(3));
    }

    #[test]
    fn btree_estimate_is_monotonic_and_zero_when_empty() {
        assert_eq!(btree_bytes(0, 16), 0);
        assert!(btree_bytes(100, 16) <= btree_bytes(101, 16));
        assert!(btree_bytes(1000, 20) / 1000 < 64);
    }
}
