//! Test world: the in-memory backend, the engine, the reference model of both maps, and the
//! checks run after every step.
#![allow(dead_code)]

use std::collections::BTreeMap;

use caps::derivation::NodeKey;
use ept::check::EptCapabilities;
use ept::entry::{Eptp, MemType, PAGE_SIZE, PageSize, Rights};
use ept::memory_backend::{
    HardwareFault, HostRegion, L1_SPACE, MemoryBackend, MemoryBackendConfig, RevocationMode,
};
use ept::model::{Cached, Expected, History, L0Leaf, L0Model, L1EptModel, ModelLeaf, expected};
use ept::shadow::{Dispatch, Engine, EngineConfig, L1Exit, VcpuId};

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;
/// L1 EPT table pages of EPT `i` start here (L0 maps this area with 4 KiB pages).
pub const TABLE_AREA: u64 = GIB;
pub const TABLE_PAGES_PER_EPT: u64 = 96;

pub struct World {
    pub backend: MemoryBackend,
    pub engine: Engine,
    pub caps: EptCapabilities,
    pub l0: L0Model,
    pub revoked: BTreeMap<u64, L0Leaf>,
    pub epts: Vec<L1EptModel>,
    pub eptps: Vec<Eptp>,
    pub vcpus: Vec<VcpuId>,
    pub cpu_of: Vec<usize>,
    pub active_ept: Vec<usize>,
    pub region: HostRegion,
    pub spare: HostRegion,
    pub spare_next: u64,
    pub history: History,
    pub l1_memory: u64,
}

#[derive(Clone, Copy)]
pub struct WorldConfig {
    pub vcpus: usize,
    pub epts: usize,
    pub cpus: usize,
    pub pool: usize,
    pub engine: EngineConfig,
    /// L0 maps [0, 1 GiB) with one 1 GiB page (else 2 MiB pages).
    pub l0_1g: bool,
    /// 2 MiB chunks of [1 GiB, 2 GiB) that L0 maps with 4 KiB pages (besides the table area).
    pub split_chunks: u64,
    pub revocation: RevocationMode,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            vcpus: 2,
            epts: 2,
            cpus: 3,
            pool: 256,
            engine: EngineConfig::default(),
            l0_1g: true,
            split_chunks: 2,
            revocation: RevocationMode::Targeted,
        }
    }
}

pub fn leaf(l2: u64, size: PageSize, l1: u64, rights: Rights) -> ModelLeaf {
    ModelLeaf {
        l2,
        size,
        l1,
        rights,
        memtype_bits: 6,
        ignore_pat: false,
    }
}

impl World {
    pub fn new(cfg: WorldConfig) -> Self {
        let mut backend = MemoryBackend::new(MemoryBackendConfig {
            cpus: cfg.cpus,
            revocation: cfg.revocation,
            initial_pool_pages: cfg.pool,
        });
        let l1_memory = 2 * GIB;
        let region = backend.add_host_region(l1_memory / PAGE_SIZE).unwrap();
        let spare = backend.add_host_region(4096).unwrap();
        let mut world = Self {
            backend,
            engine: Engine::new(cfg.engine),
            caps: cfg.engine.capabilities,
            l0: L0Model::default(),
            revoked: BTreeMap::new(),
            epts: Vec::new(),
            eptps: Vec::new(),
            vcpus: Vec::new(),
            cpu_of: Vec::new(),
            active_ept: Vec::new(),
            region,
            spare,
            spare_next: spare.base(),
            history: History::default(),
            l1_memory,
        };
        let wb = MemType::WriteBack;
        if cfg.l0_1g {
            world.l0_map(0, region.base(), PageSize::Size1G, Rights::RWX, wb);
        } else {
            for c in 0..512 {
                world.l0_map(
                    c * 2 * MIB,
                    region.base() + c * 2 * MIB,
                    PageSize::Size2M,
                    Rights::RWX,
                    wb,
                );
            }
        }
        let table_chunks = (cfg.epts as u64 * TABLE_PAGES_PER_EPT * PAGE_SIZE).div_ceil(2 * MIB);
        for c in 0..512u64 {
            let l1 = GIB + c * 2 * MIB;
            if c < table_chunks + cfg.split_chunks {
                for p in 0..512 {
                    let a = l1 + p * PAGE_SIZE;
                    world.l0_map(a, region.base() + a, PageSize::Size4K, Rights::RWX, wb);
                }
            } else {
                world.l0_map(l1, region.base() + l1, PageSize::Size2M, Rights::RWX, wb);
            }
        }
        for e in 0..cfg.epts as u64 {
            let base = TABLE_AREA + e * TABLE_PAGES_PER_EPT * PAGE_SIZE;
            let pages = (0..TABLE_PAGES_PER_EPT)
                .map(|i| base + i * PAGE_SIZE)
                .collect();
            let model = L1EptModel::new(pages);
            let eptp = Eptp::new(model.root, false);
            world.epts.push(model);
            world.eptps.push(eptp);
            let writes = world.epts[e as usize].materialize();
            for w in writes {
                world.backend.write_l1(w.address, w.value).unwrap();
            }
        }
        for _ in 0..cfg.vcpus {
            let v = world.engine.add_vcpu();
            world.vcpus.push(v);
            world.cpu_of.push(v.0 as usize % cfg.cpus);
            world.active_ept.push(0);
        }
        for v in 0..cfg.vcpus {
            world.switch(v, 0);
        }
        world
    }

    pub fn l0_map(&mut self, l1: u64, host: u64, size: PageSize, rights: Rights, memtype: MemType) {
        self.backend
            .l0_map(l1, host, size, rights, memtype)
            .unwrap();
        let old: Vec<u64> = self
            .l0
            .leaves
            .range(..l1 + size.bytes())
            .filter(|(_, l)| l.l1 + l.size.bytes() > l1)
            .map(|(&k, _)| k)
            .collect();
        for k in old {
            self.l0.leaves.remove(&k);
        }
        self.l0.leaves.insert(
            l1,
            L0Leaf {
                l1,
                size,
                host,
                rights,
                memtype,
            },
        );
        self.revoked.remove(&l1);
    }

    pub fn l0_revoke(&mut self, l1: u64) {
        let Some(leaf) = self.l0.lookup(l1).copied() else {
            return;
        };
        self.backend.l0_unmap(leaf.l1, leaf.size).unwrap();
        self.l0.leaves.remove(&leaf.l1);
        self.revoked.insert(leaf.l1, leaf);
    }

    pub fn l0_protect(&mut self, l1: u64, rights: Rights) {
        let Some(leaf) = self.l0.lookup(l1).copied() else {
            return;
        };
        self.backend.l0_protect(leaf.l1, rights).unwrap();
        self.l0.leaves.insert(leaf.l1, L0Leaf { rights, ..leaf });
    }

    /// L0's pager: make `l1` backed with full rights (restore a revoked leaf, lift a
    /// protection).
    pub fn l0_page_in(&mut self, l1: u64) {
        if let Some((&k, &leaf)) = self.revoked.range(..=l1).next_back()
            && leaf.l1 <= l1
            && l1 < leaf.l1 + leaf.size.bytes()
        {
            self.revoked.remove(&k);
            self.l0_map(leaf.l1, leaf.host, leaf.size, Rights::RWX, leaf.memtype);
            return;
        }
        if let Some(leaf) = self.l0.lookup(l1).copied()
            && leaf.rights != Rights::RWX
        {
            self.l0_protect(leaf.l1, Rights::RWX);
        }
    }

    /// L0 moves the 4 KiB L1 page at `l1` to a fresh host frame, copying its contents.
    pub fn l0_move(&mut self, l1: u64) {
        let Some(leaf) = self.l0.lookup(l1).copied() else {
            return;
        };
        if leaf.size != PageSize::Size4K
            || self.spare_next >= self.spare.base() + self.spare.pages * PAGE_SIZE
        {
            return;
        }
        let new = self.spare_next;
        self.spare_next += PAGE_SIZE;
        for i in 0..512 {
            let v = self.backend.read_host(leaf.host + i * 8);
            self.backend.write_host(new + i * 8, v);
        }
        self.l0_map(leaf.l1, new, leaf.size, leaf.rights, leaf.memtype);
    }

    /// L1 writes its own memory (L0 pages in what it must first).
    pub fn l1_write(&mut self, address: u64, value: u64) {
        if self
            .l0
            .lookup(address)
            .is_none_or(|l| !l.rights.contains(Rights::READ | Rights::WRITE))
        {
            self.l0_page_in(address);
        }
        self.backend.write_l1(address, value).unwrap();
    }

    /// L1 changes EPT `ept` to hold `leaf` (or removes the leaf at `unmap`), optionally
    /// followed by INVEPT single-context on every vCPU.
    pub fn l1_map(&mut self, ept: usize, leaf: ModelLeaf, invept: bool) -> bool {
        let end = leaf.l2 + leaf.size.bytes();
        let removed: Vec<ModelLeaf> = self.epts[ept]
            .leaves
            .range(..end)
            .filter(|(_, l)| l.l2 + l.size.bytes() > leaf.l2)
            .map(|(_, l)| *l)
            .collect();
        let Some(writes) = self.epts[ept].map(leaf) else {
            return false;
        };
        for w in writes {
            self.l1_write(w.address, w.value);
        }
        self.history.write(ept, &removed, Some(leaf));
        if invept {
            self.invept_everywhere(ept);
        }
        true
    }

    pub fn l1_unmap(&mut self, ept: usize, l2: u64, invept: bool) {
        let Some(old) = self.epts[ept].leaves.get(&l2).copied() else {
            return;
        };
        for w in self.epts[ept].unmap(l2) {
            self.l1_write(w.address, w.value);
        }
        self.history.write(ept, &[old], None);
        if invept {
            self.invept_everywhere(ept);
        }
    }

    pub fn invept_everywhere(&mut self, ept: usize) {
        for v in 0..self.vcpus.len() {
            self.invept(v, ept, false);
        }
    }

    pub fn invept(&mut self, v: usize, ept: usize, all: bool) {
        if all {
            self.engine
                .invept_all_context(&mut self.backend, self.vcpus[v])
                .unwrap();
            for e in 0..self.epts.len() {
                self.history.invept(v, e);
            }
        } else {
            self.engine
                .invept_single_context(&mut self.backend, self.vcpus[v], self.eptps[ept])
                .unwrap();
            self.history.invept(v, ept);
        }
    }

    /// L1 enters L2 on vCPU `v` with EPT `ept`.
    pub fn switch(&mut self, v: usize, ept: usize) {
        let shadow = self
            .engine
            .activate(&mut self.backend, self.vcpus[v], self.eptps[ept])
            .unwrap();
        self.active_ept[v] = ept;
        self.backend.set_affinity(shadow, self.cpu_of[v]).unwrap();
    }

    /// The kernel's affinity call moves vCPU `v` to `cpu`.
    pub fn migrate(&mut self, v: usize, cpu: usize) {
        self.cpu_of[v] = cpu;
        for s in self.engine.shadows_of(self.vcpus[v]) {
            self.backend.set_affinity(s, cpu).unwrap();
        }
    }

    pub fn ept_of(&self, eptp: Eptp) -> usize {
        self.eptps.iter().position(|&e| e == eptp).unwrap()
    }

    /// L2 on vCPU `v` accesses `gpa`; faults go to the engine; reflected faults and L0 faults
    /// are handled by a cooperative L1 and L0. Checks every dispatch against the model and
    /// that the access completes. Returns the dispatches seen.
    pub fn access(&mut self, v: usize, gpa: u64, access: Rights) -> Result<Vec<Dispatch>, String> {
        self.access_with(v, gpa, access, true)
    }

    pub fn access_with(
        &mut self,
        v: usize,
        gpa: u64,
        access: Rights,
        cooperate: bool,
    ) -> Result<Vec<Dispatch>, String> {
        let mut seen = Vec::new();
        let mut must_hit = false;
        for _ in 0..12 {
            let ept = self.active_ept[v];
            let (_, shadow) = self
                .engine
                .active(self.vcpus[v])
                .ok_or("no active shadow")?;
            let q = match self.backend.access(shadow, gpa, access) {
                Ok(_) => return Ok(seen),
                Err(HardwareFault::EptMisconfiguration) => {
                    return Err("shadow misconfigured".into());
                }
                Err(HardwareFault::EptViolation(q)) => q,
            };
            if must_hit {
                return Err(format!(
                    "fault at {gpa:#x} {access:?} repeats right after a fix: {seen:?}"
                ));
            }
            let d = self
                .engine
                .handle_ept_violation(&mut self.backend, self.vcpus[v], gpa, q)
                .map_err(|e| format!("engine error {e:?}"))?;
            seen.push(d);
            let model = expected(&self.epts[ept], &self.l0, &self.caps, gpa, access);
            match d {
                Dispatch::ReflectToL1(L1Exit::EptViolation {
                    gpa: g,
                    qualification,
                }) => {
                    if g != gpa || qualification.access() != access {
                        return Err(format!("reflected {d:?} for {gpa:#x} {access:?}"));
                    }
                    if model != Expected::Violation(qualification.entry_rights()) {
                        return Err(format!("reflected {d:?} but hardware would give {model:?}"));
                    }
                    self.history.reflected(v, ept, gpa);
                    if !cooperate {
                        return Ok(seen);
                    }
                    self.l1_fix(ept, gpa, access);
                }
                Dispatch::ReflectToL1(L1Exit::EptMisconfiguration { gpa: g }) => {
                    if g != gpa || model != Expected::Misconfiguration {
                        return Err(format!("reflected {d:?} but hardware would give {model:?}"));
                    }
                    self.history.reflected(v, ept, gpa);
                    if !cooperate {
                        return Ok(seen);
                    }
                    self.l1_fix(ept, gpa, access);
                }
                Dispatch::PassToL0 { l1_gpa, access: a } => {
                    if model != Expected::PassToL0(l1_gpa) {
                        return Err(format!(
                            "{d:?} for {gpa:#x} {access:?} but model says {model:?}"
                        ));
                    }
                    if a != access && a != Rights::READ {
                        return Err(format!("{d:?} carries the wrong access"));
                    }
                    if !cooperate {
                        return Ok(seen);
                    }
                    self.l0_page_in(l1_gpa);
                }
                Dispatch::Fixed { rights, .. } => {
                    let Expected::Fix { rights: want, .. } = model else {
                        return Err(format!(
                            "fixed {gpa:#x} {access:?} but model says {model:?}"
                        ));
                    };
                    if !want.contains(rights) || !rights.contains(access) {
                        return Err(format!(
                            "fixed with {rights:?}, model {want:?}, access {access:?}"
                        ));
                    }
                    must_hit = true;
                }
            }
        }
        Err(format!(
            "access {gpa:#x} {access:?} on vCPU {v} makes no progress: {seen:?}"
        ))
    }

    /// A cooperative L1: maps the faulting page (4 KiB, full rights) or repairs its entry.
    fn l1_fix(&mut self, ept: usize, gpa: u64, access: Rights) {
        let page = gpa & !(PAGE_SIZE - 1);
        let rights = Rights::READ | Rights::WRITE | (access & Rights::EXECUTE);
        match self.epts[ept].lookup(gpa).copied() {
            Some(old) => {
                let fixed = ModelLeaf {
                    rights: rights | old.rights & Rights::RWX | Rights::READ,
                    memtype_bits: 6,
                    ..old
                };
                self.l1_map(ept, fixed, false);
            }
            None => {
                let l1 = (page.wrapping_mul(0x9e37_79b9) % self.l1_memory) & !(PAGE_SIZE - 1);
                self.l1_map(ept, leaf(page, PageSize::Size4K, l1, rights), false);
            }
        }
    }

    /// Isolation and fidelity of every shadow entry and every usable TLB entry; derivation
    /// parents; pool accounting.
    pub fn check(&self) -> Result<(), String> {
        let mut owner = BTreeMap::new();
        for (v, &vcpu) in self.vcpus.iter().enumerate() {
            for (eptp, shadow) in self.engine.roots_of(vcpu) {
                let ept = self.ept_of(eptp);
                let root = self
                    .backend
                    .shadow_root(shadow)
                    .ok_or("cached shadow missing")?;
                owner.insert(root, (v, ept));
                for l in self.backend.leaves(shadow) {
                    let len = l.size.bytes();
                    if !self.l0.gives(l.host, len, l.rights) {
                        return Err(format!(
                            "isolation: vCPU {v} shadow maps {l:?}, L0 does not give it"
                        ));
                    }
                    let c = Cached {
                        l2: l.base,
                        len,
                        host: l.host,
                        rights: l.rights,
                        memtype: Some((l.memtype, l.ignore_pat)),
                    };
                    if !self.history.may_hold(v, ept, &self.l0, &self.caps, &c) {
                        return Err(format!(
                            "fidelity: vCPU {v} EPT {ept} shadow holds {l:?}, never held by L1 since invalidation"
                        ));
                    }
                    let node = l.node.ok_or("shadow leaf without node")?;
                    let parent = self
                        .backend
                        .tree()
                        .parent(node)
                        .ok_or("shadow node without parent")?;
                    let key = self.backend.tree().key(parent).and_then(NodeKey::unpack);
                    let Some(NodeKey::Mapping {
                        space: L1_SPACE,
                        page,
                        ..
                    }) = key
                    else {
                        return Err(format!("shadow node parent is {key:?}"));
                    };
                    let l0 = self
                        .l0
                        .lookup(page * PAGE_SIZE)
                        .ok_or("parent names an unmapped L1 page")?;
                    if !(l0.host <= l.host && l.host + len <= l0.host + l0.size.bytes()) {
                        return Err(format!("derivation parent {l0:?} does not cover {l:?}"));
                    }
                }
            }
        }
        for (cpu, root, page, e) in self.backend.usable_tlb_entries() {
            let Some(&(v, ept)) = owner.get(&root) else {
                return Err(format!(
                    "usable TLB entry on CPU {cpu} for a root no shadow owns"
                ));
            };
            if !self.l0.gives(e.host_page, PAGE_SIZE, e.rights) {
                return Err(format!(
                    "isolation: TLB of CPU {cpu} maps {page:#x} to {e:?}"
                ));
            }
            let c = Cached {
                l2: page,
                len: PAGE_SIZE,
                host: e.host_page,
                rights: e.rights,
                memtype: None,
            };
            if !self.history.may_hold(v, ept, &self.l0, &self.caps, &c) {
                return Err(format!(
                    "fidelity: TLB of CPU {cpu} holds {page:#x} -> {e:?} for vCPU {v}"
                ));
            }
        }
        if !self.backend.pool_consistent() {
            return Err("pool accounting".into());
        }
        Ok(())
    }
}
