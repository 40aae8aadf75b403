//! Shadow EPTs over the kernel: the nested VMM's system-call [`ShadowBackend`]
//! ([`KernelBackend`]) and [`Nested`], which runs the `ept` crate's shadow engine, unchanged,
//! for the vCPUs of an L1 hypervisor and talks to the L0 pager.
//!
//! # The backend
//! - **A shadow is a kernel EPT object** (`EptCreate`) whose tables and bookkeeping come from
//!   memory the VMM donates; its selector is its [`ShadowId`] and the EPT L2's vCPU is bound
//!   to. The kernel has no call that destroys an EPT object, so a destroyed shadow is emptied
//!   and kept for the next `create_shadow`.
//! - **`install` is one `EptMap`** with L1's EPT object as the source, at the L1 and L2
//!   addresses of the faulting page and the largest size the engine allows. The kernel walks
//!   L1's EPT, answers `NotBacked` when L1 holds nothing there (→ the engine's *pass to L0*),
//!   clamps the size (to L1's page and the addresses' alignment: it maps the page *containing*
//!   them), the rights (to L1's) and the memory type (UC with ignore-PAT where L1's page is
//!   UC), and records the entry as a child of L1's mapping: when the pager unmaps that
//!   mapping, the entry goes, in every shadow, with nothing here involved. Its results become
//!   the engine's [`Installed`].
//! - **Replacing.** `EptMap` refuses an occupied slot (`AlreadyMapped`), and the kernel keeps a
//!   table page once a smaller leaf needed it. So on `AlreadyMapped` the backend empties the
//!   range with one `EptUnmapRange` and tries again; then, smaller sizes. The backend keeps
//!   no record of the leaves: the kernel's range unmap finds them.
//! - **Memory.** The pool is the [`ShadowPool`]'s memory (more with [`Nested::grow_pool`]).
//!   Kernel pools are per EPT object, so the backend keeps the VMM's memory as a reserve and
//!   donates [`DONATION_PAGES`]-page pieces (`MemSplit`, `EptDonate`) to whichever shadow
//!   answers `OutOfMemory`, then retries. With the reserve empty it first takes free pool
//!   pages back from emptied shadows (`EptReclaim`); only then does it answer `OutOfTables`,
//!   and the engine evicts (which frees the 64-byte mapping records, not table pages: the
//!   kernel does not free tables). [`Nested::shrink_pool`] takes free pages back from the
//!   kernel pools into the reserve.
//! - **`unmap` and `flush`** are one `EptUnmapRange` each (`flush` over the whole
//!   guest-physical space). The kernel invalidates the shadow on every CPU that may cache it
//!   once per call (its `drop_mappings`), so `flush` needs no separate `EptInvalidate`.
//! - **Reading L1's EPT** is `EptRead` through a [`TableCache`] of 64-byte lines (4 system
//!   calls per cold walk otherwise, and 7 more reads for prefetching). The cache's rules
//!   (`rt::nested::TableCache`) are the architecture's for paging-structure caches: present
//!   entries may be served stale until L1's INVEPT, not-present ones never are (a mapping L1
//!   adds is seen at once, no INVEPT needed), the lines of a walk that ended in a fault for L1
//!   are dropped, INVEPT drops all, and a revocation by the pager or a write by the VMM drops
//!   the lines of that range. The engine relies on stale-until-INVEPT anyway.
//! - **`compare_exchange_l1`** (L1's EPT accessed/dirty flags) is a fresh `EptRead`, compare,
//!   `EptWrite`: not atomic against another L1 vCPU writing the same entry at that moment
//!   (the kernel has no compare-exchange). The filtered capabilities do not offer EPT A/D to
//!   L1 (`docs/nested.md`), so the engine never calls it there.
//!
//! # Dispatch ([`Nested::l2_ept_violation`])
//! Each L2 EPT violation is counted on exactly one path: *fixed in the vEPT*, *reflected to
//! L1* (violation, exit 48, or misconfiguration, exit 49) or *passed to L0*. For the last, the
//! VMM calls the pager's PROVIDE for the L1 page the engine names and dispatches again (up
//! to [`PROVIDE_ROUNDS`] times: L1's table page, then the data page), and reports what the
//! retry gave. A walk served cached lines that ends in a misconfiguration, in a violation of a
//! present translation (too few rights) or in a pass to L0 is repeated with fresh reads
//! first: a processor never caches a misconfigured entry, L1 may have granted more rights
//! without INVEPT (the SDM would allow the spurious violation, but it costs L1 an exit), and
//! the pager's counts must be exact. A walk that ends at a not-present entry never needs it:
//! the cache never serves a not-present entry from an earlier walk.
//!
//! # Migration
//! Nothing here depends on a physical CPU. The kernel's `VcpuSetAffinity` flushes a moved
//! vCPU's EPT on its new CPU (`flush_on_arrival`) and every rebinding INVEPTs the new EPT, so
//! [`Nested::migrate`] only records the move.

use abi::{EndpointRights, EptRights, MemoryRights, ObjectKind, Status};
use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::ops::Range;
use ept::backend::{BackendError, Installed, ShadowBackend, ShadowId};
use ept::check::{EptCapabilities, EptViolationQualification};
use ept::entry::{Eptp, MemType, PageSize, Rights};
use ept::shadow::{Counters as EngineCounters, Dispatch, Engine, EngineConfig, EngineError};
use ept::shadow::{L1Exit, VcpuId};
use ept::walk::MemoryError;
use rt::Selector;
use rt::layout::{SELF_PD, SLOTS};
use rt::nested::pager::{self, Layout, Revoked};
use rt::nested::{self, MAX_WORDS, Mapped, TableCache, map_flags};
use rt::sys;
use rt::vmx;
use vcpu::controls::EptVpidCapabilities;

/// Pages per donation to a shadow's kernel pool (one piece of the reserve).
/// Every guest-physical address a 4-level EPT translates (`flush` unmaps this range).
const GUEST_PHYSICAL_SPAN: u64 = 1 << 48;
pub const DONATION_PAGES: u64 = 1 << DONATION_ORDER;
const DONATION_ORDER: u64 = 5;
/// Lines of the L1 EPT table cache (64 bytes each, and 16 bytes of tag and stamp: 20 KiB of
/// heap). A walk touches 4 lines; L1's tables for the nested scenario fit many times over.
pub const CACHE_LINES: usize = 256;
/// PROVIDE calls for one L2 violation at most (L1's table page, then its data page, twice).
pub const PROVIDE_ROUNDS: u32 = 4;
/// vCPUs of L1 at most.
pub const MAX_VCPUS: usize = 64;
/// Exit reasons for L1 (Vol. 3D Appendix C).
pub const EXIT_EPT_VIOLATION: u32 = 48;
pub const EXIT_EPT_MISCONFIGURATION: u32 = 49;

/// What the engine gets to know about the EPT offered to L1, from the IA32_VMX_EPT_VPID_CAP
/// value L1 is shown (the filtered one) and the physical-address width.
pub fn offered_ept_capabilities(ept_vpid_cap: u64, max_phys_bits: u8) -> EptCapabilities {
    let caps = EptVpidCapabilities::from_bits_truncate(ept_vpid_cap);
    EptCapabilities {
        max_phys_bits,
        execute_only: caps.contains(EptVpidCapabilities::EXECUTE_ONLY),
        pages_1g: caps.contains(EptVpidCapabilities::PAGES_1G),
        accessed_dirty: caps.contains(EptVpidCapabilities::ACCESSED_DIRTY_FLAGS),
    }
}

/// The memory and slots the VMM gives the shadows.
#[derive(Clone, Debug)]
pub struct ShadowPool {
    /// Memory the VMM holds for shadow tables (WRITE, DELEGATE). It is split and donated a
    /// piece at a time; a donated piece is the kernel's (its mappings go).
    pub memory: Selector,
    /// Empty slots of the VMM's space the backend may use: one per shadow EPT object, pool
    /// pieces on their way to a donation, pages taken back from kernel pools.
    pub slots: Range<Selector>,
}

/// Why a [`Nested`] call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedError {
    /// A capability handed to [`Nested::new`] is not what it must be.
    BadCapability(Status),
    /// vCPU index beyond [`MAX_VCPUS`].
    NoSuchVcpu,
    /// The shadow engine failed. `Backend(NoSuchShadow)` with [`Nested::last_error`] set
    /// means a system call failed unexpectedly.
    Engine(EngineError),
    /// The pager refused PROVIDE or REVOKE for this L1 address (`OutOfRange`: L1 maps L2 to
    /// memory it does not have; `OutOfMemory`: the pager's frames are used up).
    Pager { l1_gpa: u64, status: Status },
    /// Another system call failed.
    Status(Status),
}

/// The outcome of one L2 EPT violation, for the VMX emulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L2Fault {
    /// The shadow maps the address now: resume L2.
    Fixed,
    /// Inject this exit into L1 (reason 48 with the qualification, or 49 with 0; the
    /// guest-physical address; the guest-linear address comes from the real exit).
    ReflectToL1 {
        exit_reason: u32,
        qualification: u64,
        gpa: u64,
    },
    /// The L0 pager provided L1 memory (one or more PROVIDE calls) and the violation was
    /// dispatched again: what that gave (never `PassedToL0Then` again).
    PassedToL0Then(Box<L2Fault>),
    /// Nothing more to do now: resume L2; if the access still faults, it comes back (after
    /// [`PROVIDE_ROUNDS`] PROVIDE calls that did not make the page usable).
    Retry,
    /// The violation cannot be served (the pager refused the L1 address, or the engine or a
    /// system call failed): end the guest, or give L1 a machine check.
    Failed(NestedError),
}

/// Per-vCPU counts of the paths. Every L2 EPT violation counts once in `violations` and once
/// in exactly one of `fixed_in_vept`, `reflected_to_l1`, `passed_to_l0` and `failed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub violations: u64,
    /// Fixed in the vEPT at the first dispatch.
    pub fixed_in_vept: u64,
    /// Reflected to L1 at the first dispatch (violations and misconfigurations).
    pub reflected_to_l1: u64,
    /// Of those, EPT misconfigurations.
    pub reflected_misconfigurations: u64,
    /// Passed to the L0 pager (then counted below by what the retry gave).
    pub passed_to_l0: u64,
    /// Failed without a pager's help (engine or system-call errors).
    pub failed: u64,
    /// Passed to L0, then fixed / reflected / left to retry / failed.
    pub l0_then_fixed: u64,
    pub l0_then_reflected: u64,
    pub l0_then_retry: u64,
    pub l0_then_failed: u64,
    /// PROVIDE calls made.
    pub provides: u64,
    /// Dispatches repeated with fresh reads of L1's EPT.
    pub fresh_redispatches: u64,
    /// L1's INVEPTs handled, single-context and all-context.
    pub invept_single: u64,
    pub invept_all: u64,
    /// Moves to another physical CPU.
    pub migrations: u64,
}

impl Counters {
    /// Shadow faults the VMM fixed: at the first dispatch or after the pager acted (port
    /// 0xf7 of `docs/nested.md`).
    pub fn shadow_faults(&self) -> u64 {
        self.fixed_in_vept + self.l0_then_fixed
    }
}

/// The backend's own counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// `EptMap` calls that installed a shadow entry.
    pub installs: u64,
    /// Installs that had to unmap what was there, or fall back to a smaller size.
    pub replaced: u64,
    pub smaller_after_conflict: u64,
    /// Leaves unmapped (by `unmap`, `flush`, `destroy_shadow`, replacements).
    pub unmapped: u64,
    /// Shadow EPT objects created, reused.
    pub objects_created: u64,
    pub objects_reused: u64,
    /// Pages donated to kernel pools, taken back.
    pub pages_donated: u64,
    pub pages_reclaimed: u64,
    /// `EptRead` calls for the engine's walks (cache misses), cache hits.
    pub table_reads: u64,
    pub table_hits: u64,
}

/// A slot bitmap over a range of the VMM's selectors.
#[derive(Debug)]
struct SlotRange {
    first: Selector,
    count: u64,
    used: Vec<u64>,
}

impl SlotRange {
    fn new(range: Range<Selector>) -> Self {
        let count = range.end.saturating_sub(range.start);
        Self {
            first: range.start,
            count,
            used: alloc::vec![0; count.div_ceil(64) as usize],
        }
    }

    fn alloc(&mut self) -> Option<Selector> {
        for (i, word) in self.used.iter_mut().enumerate() {
            if *word != u64::MAX {
                let bit = u64::from((!*word).trailing_zeros());
                let index = i as u64 * 64 + bit;
                if index >= self.count {
                    return None;
                }
                *word |= 1 << bit;
                return Some(self.first + index);
            }
        }
        None
    }

    fn free(&mut self, selector: Selector) {
        if let Some(index) = selector.checked_sub(self.first).filter(|&i| i < self.count) {
            self.used[(index / 64) as usize] &= !(1 << (index % 64));
        }
    }
}

/// Memory of the VMM's not yet donated to any kernel pool.
#[derive(Debug, Default)]
struct Reserve {
    /// Memory capabilities: (selector, pages, pages split off so far).
    pieces: Vec<(Selector, u64, u64)>,
    /// Single pages taken back from kernel pools (their own capabilities, in our slots).
    loose: Vec<Selector>,
}

impl Reserve {
    fn pages(&self) -> u64 {
        self.pieces
            .iter()
            .map(|&(_, n, used)| n - used)
            .sum::<u64>()
            + self.loose.len() as u64
    }
}

/// The system-call [`ShadowBackend`] (see the module documentation).
pub struct KernelBackend {
    l1_ept: Selector,
    slots: SlotRange,
    reserve: Reserve,
    shadows: BTreeSet<Selector>,
    /// Emptied shadow objects, for reuse.
    idle: Vec<Selector>,
    cache: RefCell<TableCache>,
    stats: BackendStats,
    /// The last unexpected status of a system call.
    last_error: Cell<Option<Status>>,
}

impl KernelBackend {
    fn new(l1_ept: Selector, pool: ShadowPool, pool_pages: u64) -> Self {
        Self {
            l1_ept,
            slots: SlotRange::new(pool.slots),
            reserve: Reserve {
                pieces: alloc::vec![(pool.memory, pool_pages, 0)],
                loose: Vec::new(),
            },
            shadows: BTreeSet::new(),
            idle: Vec::new(),
            cache: RefCell::new(TableCache::new(CACHE_LINES)),
            stats: BackendStats::default(),
            last_error: Cell::new(None),
        }
    }

    fn fail(&self, status: Status) -> BackendError {
        log::warn!("shadow backend: unexpected {status:?}");
        self.last_error.set(Some(status));
        BackendError::NoSuchShadow
    }

    /// A piece of the reserve in a slot of its own, and its pages.
    fn take_piece(&mut self) -> Option<(Selector, u64)> {
        if let Some(page) = self.reserve.loose.pop() {
            return Some((page, 1));
        }
        let slot = self.slots.alloc()?;
        for piece in &mut self.reserve.pieces {
            let (memory, pages, used) = *piece;
            let left = pages - used;
            if left == 0 {
                continue;
            }
            // Pieces are naturally aligned: whole donations while they fit, then pages.
            let order = if left >= DONATION_PAGES && used.is_multiple_of(DONATION_PAGES) {
                DONATION_ORDER
            } else {
                0
            };
            match sys::mem_split(memory, used, order, slot) {
                Ok(()) => {
                    piece.2 += 1 << order;
                    return Some((slot, 1 << order));
                }
                Err(e) => {
                    log::warn!("shadow pool: MemSplit of {memory} at page {used}: {e:?}");
                    self.last_error.set(Some(e));
                    piece.2 = pages;
                }
            }
        }
        self.slots.free(slot);
        None
    }

    /// Takes up to `pages` free pages out of the kernel pools of emptied shadows (all
    /// shadows with `live`) into the reserve. Returns how many came.
    fn reclaim(&mut self, pages: u64, live: bool) -> u64 {
        let mut objects: Vec<Selector> = self.idle.clone();
        if live {
            objects.extend(self.shadows.iter().copied());
        }
        let mut got = 0;
        for object in objects {
            while got < pages {
                let Some(slot) = self.slots.alloc() else {
                    return got;
                };
                match vmx::ept_reclaim(object, slot, 1) {
                    Ok(1) => {
                        self.reserve.loose.push(slot);
                        got += 1;
                    }
                    _ => {
                        self.slots.free(slot);
                        break;
                    }
                }
            }
        }
        self.stats.pages_reclaimed += got;
        got
    }

    /// Donates one piece of the reserve to `shadow`'s kernel pool (taking pages back from
    /// emptied shadows if the reserve is empty). Returns whether it did.
    fn grow(&mut self, shadow: Selector) -> bool {
        if self.reserve.pages() == 0 && self.reclaim(DONATION_PAGES, false) == 0 {
            return false;
        }
        let Some((piece, pages)) = self.take_piece() else {
            return false;
        };
        match vmx::ept_donate(shadow, piece) {
            Ok(_) => {
                self.slots.free(piece);
                self.stats.pages_donated += pages;
                true
            }
            Err(e) => {
                let _ = sys::cap_delete(piece);
                self.slots.free(piece);
                self.fail(e);
                false
            }
        }
    }

    /// Unmaps every leaf of `shadow` overlapping `[base, base + length)` (one
    /// `EptUnmapRange`); returns whether there was any.
    fn unmap_range(&mut self, shadow: Selector, base: u64, length: u64) -> bool {
        match vmx::ept_unmap_range(shadow, base, length) {
            Ok(n) => {
                self.stats.unmapped += n;
                n != 0
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// Unmaps every leaf of `shadow`.
    fn empty(&mut self, shadow: Selector) {
        self.unmap_range(shadow, 0, GUEST_PHYSICAL_SPAN);
    }

    fn shadow(&self, id: ShadowId) -> Result<Selector, BackendError> {
        let selector = Selector::from(id.0);
        if self.shadows.contains(&selector) {
            Ok(selector)
        } else {
            Err(BackendError::NoSuchShadow)
        }
    }
}

fn smaller(size: PageSize) -> Option<PageSize> {
    match size {
        PageSize::Size1G => Some(PageSize::Size2M),
        PageSize::Size2M => Some(PageSize::Size4K),
        PageSize::Size4K => None,
    }
}

impl ShadowBackend for KernelBackend {
    fn create_shadow(&mut self) -> Result<ShadowId, BackendError> {
        if let Some(object) = self.idle.pop() {
            self.shadows.insert(object);
            self.stats.objects_reused += 1;
            return Ok(ShadowId(object as u32));
        }
        let Some(slot) = self.slots.alloc() else {
            return Err(BackendError::OutOfTables);
        };
        let Some((piece, pages)) = self.take_piece() else {
            self.slots.free(slot);
            return Err(BackendError::OutOfTables);
        };
        match vmx::ept_create(SELF_PD, slot, piece) {
            Ok(()) => {
                self.slots.free(piece);
                self.stats.pages_donated += pages;
                self.stats.objects_created += 1;
                self.shadows.insert(slot);
                Ok(ShadowId(slot as u32))
            }
            Err(e) => {
                let _ = sys::cap_delete(piece);
                self.slots.free(piece);
                self.slots.free(slot);
                if e == Status::OutOfMemory {
                    Err(BackendError::OutOfTables)
                } else {
                    Err(self.fail(e))
                }
            }
        }
    }

    fn destroy_shadow(&mut self, shadow: ShadowId) -> Result<(), BackendError> {
        let selector = self.shadow(shadow)?;
        self.empty(selector);
        self.shadows.remove(&selector);
        self.idle.push(selector);
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
        let selector = self.shadow(shadow)?;
        if (l2_gpa ^ l1_gpa) & 0xfff != 0 {
            return Err(BackendError::Misaligned);
        }
        let rights = rights & Rights::RWX;
        if rights.is_empty() {
            return Ok(Installed {
                size: PageSize::Size4K,
                rights,
                memtype,
                ignore_pat,
            });
        }
        let (l2, l1) = (l2_gpa & !0xfff, l1_gpa & !0xfff);
        let mut size = max_size;
        let mut cleared = false;
        // Each round either returns or changes something (a donation, a removal, a smaller
        // size); the bound only guards against a kernel that keeps answering the same.
        for _ in 0..16 {
            let flags = map_flags(rights, size, memtype, ignore_pat);
            match vmx::ept_map(selector, self.l1_ept, l1, l2, flags) {
                Ok((order, got_rights, got_memtype)) => {
                    let Some(mapped) = Mapped::decode(order, got_rights, got_memtype) else {
                        return Err(self.fail(Status::Inconsistent));
                    };
                    self.stats.installs += 1;
                    return Ok(Installed {
                        size: mapped.size,
                        rights: mapped.rights,
                        memtype: mapped.memtype,
                        ignore_pat: mapped.ignore_pat(memtype, ignore_pat),
                    });
                }
                Err(Status::NotBacked) => return Err(BackendError::NotBacked { l1_gpa }),
                Err(Status::OutOfMemory) => {
                    if !self.grow(selector) {
                        return Err(BackendError::OutOfTables);
                    }
                }
                Err(Status::OutOfNodes) => return Err(BackendError::OutOfNodes),
                Err(Status::AlreadyMapped) => {
                    if !cleared {
                        // Whatever leaf translates the page goes (of any size).
                        cleared = true;
                        if self.unmap_range(selector, l2, PageSize::Size4K.bytes()) {
                            self.stats.replaced += 1;
                            continue;
                        }
                    }
                    if let Some(s) = smaller(size) {
                        // Smaller leaves, or the table page they left, occupy the range.
                        size = s;
                        self.stats.smaller_after_conflict += 1;
                    } else {
                        return Err(self.fail(Status::AlreadyMapped));
                    }
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        Err(self.fail(Status::Inconsistent))
    }

    fn unmap(&mut self, shadow: ShadowId, l2_gpa: u64, size: PageSize) -> Result<(), BackendError> {
        let selector = self.shadow(shadow)?;
        self.unmap_range(selector, size.align_down(l2_gpa), size.bytes());
        Ok(())
    }

    fn flush(&mut self, shadow: ShadowId) -> Result<(), BackendError> {
        let selector = self.shadow(shadow)?;
        self.empty(selector);
        Ok(())
    }

    fn donate_table_pages(&mut self, pages: usize) -> Result<usize, BackendError> {
        let shadows: Vec<Selector> = self.shadows.iter().copied().collect();
        let mut given = 0usize;
        'outer: while given < pages {
            let before = given;
            for &shadow in &shadows {
                let reserve = self.reserve.pages();
                if given >= pages || reserve == 0 || !self.grow(shadow) {
                    break 'outer;
                }
                given += (reserve - self.reserve.pages()) as usize;
            }
            if given == before {
                break;
            }
        }
        Ok(given)
    }

    fn reclaim_table_pages(&mut self, pages: usize) -> Result<usize, BackendError> {
        Ok(self.reclaim(pages as u64, true) as usize)
    }

    fn read_l1(&self, l1_gpa: u64) -> Result<u64, MemoryError> {
        let mut cache = self.cache.borrow_mut();
        cache
            .read(l1_gpa & !7, |line, words| {
                nested::ept_read(self.l1_ept, line, words)
            })
            .map_err(|status| {
                if status != Status::NotBacked {
                    self.last_error.set(Some(status));
                }
                MemoryError::NotBacked { address: l1_gpa }
            })
    }

    fn read_l1_line(&self, l1_gpa: u64) -> Result<[u64; 8], MemoryError> {
        let mut cache = self.cache.borrow_mut();
        cache
            .read_line(l1_gpa, |line, words| {
                nested::ept_read(self.l1_ept, line, words)
            })
            .map_err(|status| {
                if status != Status::NotBacked {
                    self.last_error.set(Some(status));
                }
                MemoryError::NotBacked { address: l1_gpa }
            })
    }

    fn compare_exchange_l1(
        &mut self,
        l1_gpa: u64,
        expected: u64,
        new: u64,
    ) -> Result<bool, MemoryError> {
        let address = l1_gpa & !7;
        self.cache.borrow_mut().forget_range(address, 8);
        let mut now = [0];
        nested::ept_read(self.l1_ept, address, &mut now)
            .map_err(|_| MemoryError::NotBacked { address })?;
        if now[0] != expected {
            return Ok(false);
        }
        nested::ept_write(self.l1_ept, address, &[new])
            .map_err(|_| MemoryError::ReadOnly { address })?;
        Ok(true)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct VcpuRecord {
    counters: Counters,
    cpu: Option<u64>,
}

/// The nested VMM's shadow EPTs for one L1 hypervisor: the engine, the system-call backend,
/// the L0 pager's endpoint and the per-vCPU counters.
pub struct Nested {
    engine: Engine,
    backend: KernelBackend,
    pager: Selector,
    vcpus: Vec<VcpuRecord>,
    revocations: u64,
}

/// Checks that `selector` holds a capability of `kind` with at least `rights`; returns the
/// kind-specific detail.
fn check_capability(selector: Selector, kind: ObjectKind, rights: u32) -> Result<u64, NestedError> {
    let info = sys::cap_info(selector).map_err(NestedError::BadCapability)?;
    if info.kind() != Some(kind) {
        return Err(NestedError::BadCapability(Status::WrongType));
    }
    if info.rights & rights != rights {
        return Err(NestedError::BadCapability(Status::InsufficientRights));
    }
    Ok(info.detail)
}

/// The memory capability's pages, if it can be donated.
fn pool_pages(memory: Selector) -> Result<u64, NestedError> {
    let order = check_capability(
        memory,
        ObjectKind::Memory,
        (MemoryRights::WRITE | MemoryRights::DELEGATE).bits(),
    )?;
    1u64.checked_shl(order as u32)
        .filter(|_| order < 40)
        .ok_or(NestedError::BadCapability(Status::OutOfRange))
}

impl Nested {
    /// Shadows for the L1 whose EPT object is `l1_ept` (MAP, MAP_SOURCE: from the pager's
    /// `L1_EPT` reply), with the L0 pager at `pager` (CALL), shadow memory and slots from
    /// `pool`, and the engine's defaults for an L1 offered `capabilities`
    /// ([`offered_ept_capabilities`]).
    pub fn new(
        l1_ept: Selector,
        pager: Selector,
        pool: ShadowPool,
        capabilities: EptCapabilities,
    ) -> Result<Self, NestedError> {
        let config = EngineConfig {
            capabilities,
            ..EngineConfig::default()
        };
        Self::with_config(l1_ept, pager, pool, config)
    }

    /// [`Nested::new`] with the whole engine configuration.
    pub fn with_config(
        l1_ept: Selector,
        pager: Selector,
        pool: ShadowPool,
        config: EngineConfig,
    ) -> Result<Self, NestedError> {
        check_capability(
            l1_ept,
            ObjectKind::Ept,
            (EptRights::MAP | EptRights::MAP_SOURCE).bits(),
        )?;
        check_capability(pager, ObjectKind::Endpoint, EndpointRights::CALL.bits())?;
        let pages = pool_pages(pool.memory)?;
        if pool.slots.is_empty() || pool.slots.end > SLOTS {
            return Err(NestedError::BadCapability(Status::InvalidSelector));
        }
        Ok(Self {
            engine: Engine::new(config),
            backend: KernelBackend::new(l1_ept, pool, pages),
            pager,
            vcpus: Vec::new(),
            revocations: 0,
        })
    }

    /// L1's EPT object (for L1's vCPUs).
    pub fn l1_ept(&self) -> Selector {
        self.backend.l1_ept
    }

    fn vcpu(&mut self, vcpu: usize) -> Result<VcpuId, NestedError> {
        if vcpu >= MAX_VCPUS {
            return Err(NestedError::NoSuchVcpu);
        }
        while self.vcpus.len() <= vcpu {
            self.engine.add_vcpu();
            self.vcpus.push(VcpuRecord::default());
        }
        Ok(VcpuId(vcpu as u32))
    }

    /// L1 enters L2 on `vcpu` with EPT pointer `l1_eptp`: returns the shadow EPT object L2's
    /// vCPU must be bound to (from the vCPU's root cache, or new). Call it at every VM entry
    /// into L2 and rebind when the answer changes. `Engine(InvalidEptp)` for an EPTP that
    /// VM entry would refuse.
    pub fn activate(&mut self, vcpu: usize, l1_eptp: u64) -> Result<Selector, NestedError> {
        let id = self.vcpu(vcpu)?;
        self.engine
            .activate(&mut self.backend, id, Eptp(l1_eptp))
            .map(|s| Selector::from(s.0))
            .map_err(NestedError::Engine)
    }

    /// One engine dispatch, with the cache rules of the module documentation.
    fn dispatch(
        &mut self,
        id: VcpuId,
        gpa: u64,
        qualification: EptViolationQualification,
    ) -> Result<Dispatch, EngineError> {
        self.backend.cache.borrow_mut().begin();
        let first = self
            .engine
            .handle_ept_violation(&mut self.backend, id, gpa, qualification)?;
        let refresh = match first {
            Dispatch::Fixed { .. } => false,
            Dispatch::PassToL0 { .. }
            | Dispatch::ReflectToL1(L1Exit::EptMisconfiguration { .. }) => true,
            // Too few rights in a present translation: L1 may have granted more since.
            Dispatch::ReflectToL1(L1Exit::EptViolation { qualification, .. }) => {
                !qualification.entry_rights().is_empty()
            }
        };
        let dispatch = if refresh && self.backend.cache.borrow().used_earlier_lines() {
            self.backend.cache.borrow_mut().forget_used();
            self.backend.cache.borrow_mut().begin();
            if let Some(r) = self.vcpus.get_mut(id.0 as usize) {
                r.counters.fresh_redispatches += 1;
            }
            self.engine
                .handle_ept_violation(&mut self.backend, id, gpa, qualification)?
        } else {
            first
        };
        if !matches!(dispatch, Dispatch::Fixed { .. }) {
            self.backend.cache.borrow_mut().forget_used();
        }
        Ok(dispatch)
    }

    /// An EPT violation L2 took on `vcpu` at guest-physical `gpa`, with the exit
    /// qualification the processor gave: fixes it, or says what L1 must see, calling the L0
    /// pager when L1's memory must be provided first (see the module documentation). Never
    /// panics on what L1's EPT holds.
    pub fn l2_ept_violation(&mut self, vcpu: usize, gpa: u64, qualification: u64) -> L2Fault {
        let id = match self.vcpu(vcpu) {
            Ok(id) => id,
            Err(e) => return L2Fault::Failed(e),
        };
        let q = EptViolationQualification::from_bits_truncate(qualification);
        self.vcpus[vcpu].counters.violations += 1;
        let mut provides = 0;
        let outcome = loop {
            match self.dispatch(id, gpa, q) {
                Err(e) => break L2Fault::Failed(NestedError::Engine(e)),
                Ok(Dispatch::Fixed { .. }) => break L2Fault::Fixed,
                Ok(Dispatch::ReflectToL1(L1Exit::EptViolation { gpa, qualification })) => {
                    break L2Fault::ReflectToL1 {
                        exit_reason: EXIT_EPT_VIOLATION,
                        qualification: qualification.bits(),
                        gpa,
                    };
                }
                Ok(Dispatch::ReflectToL1(L1Exit::EptMisconfiguration { gpa })) => {
                    break L2Fault::ReflectToL1 {
                        exit_reason: EXIT_EPT_MISCONFIGURATION,
                        qualification: 0,
                        gpa,
                    };
                }
                Ok(Dispatch::PassToL0 { l1_gpa, .. }) => {
                    if provides == PROVIDE_ROUNDS {
                        break L2Fault::Retry;
                    }
                    provides += 1;
                    self.vcpus[vcpu].counters.provides += 1;
                    if let Err(status) = pager::provide(self.pager, l1_gpa) {
                        break L2Fault::Failed(NestedError::Pager { l1_gpa, status });
                    }
                }
            }
        };
        let c = &mut self.vcpus[vcpu].counters;
        if provides == 0 {
            match &outcome {
                L2Fault::Fixed => c.fixed_in_vept += 1,
                L2Fault::ReflectToL1 { exit_reason, .. } => {
                    c.reflected_to_l1 += 1;
                    if *exit_reason == EXIT_EPT_MISCONFIGURATION {
                        c.reflected_misconfigurations += 1;
                    }
                }
                _ => c.failed += 1,
            }
            return outcome;
        }
        c.passed_to_l0 += 1;
        match &outcome {
            L2Fault::Fixed => c.l0_then_fixed += 1,
            L2Fault::ReflectToL1 { .. } => c.l0_then_reflected += 1,
            L2Fault::Retry => c.l0_then_retry += 1,
            _ => c.l0_then_failed += 1,
        }
        L2Fault::PassedToL0Then(Box::new(outcome))
    }

    /// L1 executed INVEPT of `kind` (1 single-context for `eptp`, 2 all-context) on `vcpu`.
    /// The VMX emulation has checked the type and operands (VMfail otherwise).
    pub fn invept(&mut self, vcpu: usize, kind: u64, eptp: u64) -> Result<(), NestedError> {
        let id = self.vcpu(vcpu)?;
        self.backend.cache.borrow_mut().clear();
        let c = &mut self.vcpus[vcpu].counters;
        let result = match kind {
            1 => {
                c.invept_single += 1;
                self.engine
                    .invept_single_context(&mut self.backend, id, Eptp(eptp))
            }
            2 => {
                c.invept_all += 1;
                self.engine.invept_all_context(&mut self.backend, id)
            }
            _ => return Err(NestedError::Status(Status::InvalidArgument)),
        };
        result.map_err(NestedError::Engine)
    }

    /// L1 asked (port 0xf6) to have the on-demand page at `l1_gpa` revoked: the pager's
    /// REVOKE. The kernel removes the derived shadow entries; here only the cached lines of
    /// that page go.
    pub fn revoke_l1_page(&mut self, l1_gpa: u64) -> Result<Revoked, NestedError> {
        let revoked = pager::revoke(self.pager, l1_gpa)
            .map_err(|status| NestedError::Pager { l1_gpa, status })?;
        self.backend
            .cache
            .borrow_mut()
            .forget_range(l1_gpa & !(pager::PAGE - 1), pager::PAGE);
        self.revocations += 1;
        Ok(revoked)
    }

    /// Shadow faults fixed for `vcpu` so far (port 0xf7).
    pub fn shadow_faults(&self, vcpu: usize) -> u64 {
        self.counters(vcpu).shadow_faults()
    }

    /// The path counters of `vcpu` (zero for a vCPU never seen).
    pub fn counters(&self, vcpu: usize) -> Counters {
        self.vcpus.get(vcpu).map(|r| r.counters).unwrap_or_default()
    }

    /// The engine's own counters of `vcpu` (they count a dispatch repeated with fresh reads
    /// twice).
    pub fn engine_counters(&self, vcpu: usize) -> Option<EngineCounters> {
        self.engine.counters(VcpuId(vcpu as u32))
    }

    /// The backend's counts, with the cache's.
    pub fn backend_stats(&self) -> BackendStats {
        let cache = self.backend.cache.borrow().stats();
        BackendStats {
            table_reads: cache.misses,
            table_hits: cache.hits,
            ..self.backend.stats
        }
    }

    /// The last unexpected status a system call of the backend returned.
    pub fn last_error(&self) -> Option<Status> {
        self.backend.last_error.get()
    }

    /// Pages of the reserve (not donated to any kernel pool).
    pub fn reserve_pages(&self) -> u64 {
        self.backend.reserve.pages()
    }

    /// Pages revoked through [`Nested::revoke_l1_page`].
    pub fn revocations(&self) -> u64 {
        self.revocations
    }

    /// The L0 pager's counters.
    pub fn pager_counts(&self) -> Result<pager::Counts, NestedError> {
        pager::counts(self.pager).map_err(NestedError::Status)
    }

    /// `vcpu` (both its L1 and L2 vCPU objects) was moved to physical CPU `cpu`. The kernel
    /// flushes on arrival; nothing to do here but count.
    pub fn migrate(&mut self, vcpu: usize, cpu: u64) {
        if self.vcpu(vcpu).is_ok() {
            let r = &mut self.vcpus[vcpu];
            if r.cpu.is_some_and(|c| c != cpu) {
                r.counters.migrations += 1;
            }
            r.cpu = Some(cpu);
        }
    }

    /// Drops `vcpu`'s shadows (L1's VMXOFF, or the vCPU's end).
    pub fn reset_vcpu(&mut self, vcpu: usize) -> Result<(), NestedError> {
        let id = self.vcpu(vcpu)?;
        self.engine
            .reset_vcpu(&mut self.backend, id)
            .map_err(NestedError::Engine)
    }

    /// Adds `memory` (WRITE, DELEGATE) to the shadows' reserve.
    pub fn grow_pool(&mut self, memory: Selector) -> Result<(), NestedError> {
        let pages = pool_pages(memory)?;
        self.backend.reserve.pieces.push((memory, pages, 0));
        Ok(())
    }

    /// Takes up to `pages` free pages back from the shadows' kernel pools (emptied shadows
    /// first) into the reserve. Returns how many came back. Not `Engine::shrink_pool`: it
    /// evicts until enough pages come back, and since the kernel frees no table page on
    /// unmap, eviction returns none — it would empty every shadow for nothing.
    pub fn shrink_pool(&mut self, pages: usize) -> usize {
        self.backend.reclaim(pages as u64, true) as usize
    }

    /// Reads L1 guest-physical memory from `l1_gpa` (8-byte aligned) through L1's EPT.
    pub fn read_l1(&self, l1_gpa: u64, out: &mut [u64]) -> Result<(), Status> {
        for (i, chunk) in out.chunks_mut(MAX_WORDS).enumerate() {
            let at = l1_gpa
                .checked_add((i * MAX_WORDS * 8) as u64)
                .ok_or(Status::OutOfRange)?;
            nested::ept_read(self.backend.l1_ept, at, chunk)?;
        }
        Ok(())
    }

    /// Writes `words` to L1 guest-physical memory from `l1_gpa` (8-byte aligned).
    pub fn write_l1(&mut self, l1_gpa: u64, words: &[u64]) -> Result<(), Status> {
        self.backend
            .cache
            .borrow_mut()
            .forget_range(l1_gpa, (words.len() * 8) as u64);
        for (i, chunk) in words.chunks(MAX_WORDS).enumerate() {
            let at = l1_gpa
                .checked_add((i * MAX_WORDS * 8) as u64)
                .ok_or(Status::OutOfRange)?;
            nested::ept_write(self.backend.l1_ept, at, chunk)?;
        }
        Ok(())
    }

    /// Writes `bytes` to L1 guest-physical memory from `l1_gpa` (any alignment: partial words
    /// are read, merged and written back). For loading L1's image into the backed region,
    /// which the pager zeroed.
    pub fn write_l1_bytes(&mut self, l1_gpa: u64, bytes: &[u8]) -> Result<(), Status> {
        let mut at = l1_gpa;
        let mut rest = bytes;
        let mut words = [0u64; MAX_WORDS];
        while !rest.is_empty() {
            let offset = (at % 8) as usize;
            if offset != 0 || rest.len() < 8 {
                let n = (8 - offset).min(rest.len());
                let mut word = [0];
                self.read_l1(at - offset as u64, &mut word)?;
                let mut b = word[0].to_le_bytes();
                b[offset..offset + n].copy_from_slice(&rest[..n]);
                self.write_l1(at - offset as u64, &[u64::from_le_bytes(b)])?;
                at = at.checked_add(n as u64).ok_or(Status::OutOfRange)?;
                rest = &rest[n..];
                continue;
            }
            let n = (rest.len() / 8).min(MAX_WORDS);
            for (w, b) in words.iter_mut().zip(rest.chunks_exact(8)).take(n) {
                let mut le = [0u8; 8];
                le.copy_from_slice(b);
                *w = u64::from_le_bytes(le);
            }
            self.write_l1(at, &words[..n])?;
            at = at.checked_add(n as u64 * 8).ok_or(Status::OutOfRange)?;
            rest = &rest[n * 8..];
        }
        Ok(())
    }

    /// Asks the pager for L1's EPT into the VMM's empty slot `dest` and returns the layout
    /// (before [`Nested::new`]).
    pub fn fetch_l1_ept(pager: Selector, dest: Selector) -> Result<Layout, NestedError> {
        pager::fetch_l1_ept(pager, dest).map_err(NestedError::Status)
    }
}
