//! The reference model: a deliberately simple composition of L1's EPT and L0's map, kept as
//! plain ordered maps of leaves, that the engine is checked against.
//!
//! Nothing here walks a page table. [`L1EptModel`] is a map from L2 ranges to L1 ranges with
//! rights, plus the placement of the tables that hold it ([`L1EptModel::materialize`]
//! writes those tables into L1 memory for the real walker to read); [`L0Model`] maps L1
//! ranges to host ranges. [`expected`] says what the hardware would do for an access: the
//! exit L1 must see, the L0 fault, or the composed translation. [`History`] records every
//! value L1's EPT held and when, and the invalidations (INVEPT, reflected faults) of each
//! vCPU, to decide what a real TLB may still hold.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::backend::shadow_memory_type;
use crate::check::EptCapabilities;
use crate::entry::{MemType, PAGE_SIZE, PageSize, Rights};

/// One leaf of L1's EPT, possibly misconfigured (rights and memory type are raw).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ModelLeaf {
    /// L2 guest-physical base (aligned to `size`).
    pub l2: u64,
    /// Page size.
    pub size: PageSize,
    /// L1 guest-physical base (aligned to `size`).
    pub l1: u64,
    /// Bits 2:0 as written (may be write-without-read or execute-only).
    pub rights: Rights,
    /// Bits 5:3 as written (may be reserved).
    pub memtype_bits: u8,
    /// Bit 6.
    pub ignore_pat: bool,
}

impl ModelLeaf {
    /// Whether the processor accepts this leaf (no misconfiguration), given `caps`.
    pub fn is_valid(&self, caps: &EptCapabilities) -> bool {
        let r = self.rights;
        let write_without_read = r.contains(Rights::WRITE) && !r.contains(Rights::READ);
        let execute_only = r == Rights::EXECUTE && !caps.execute_only;
        let large_unsupported = self.size == PageSize::Size1G && !caps.pages_1g;
        !r.is_empty()
            && !write_without_read
            && !execute_only
            && !large_unsupported
            && MemType::from_bits(self.memtype_bits).is_some()
    }

    /// Whether the leaf covers `gpa`.
    pub fn covers(&self, gpa: u64) -> bool {
        self.l2 <= gpa && gpa < self.l2 + self.size.bytes()
    }

    /// The raw entry.
    pub fn raw(&self) -> u64 {
        let mut raw = (self.l1 & 0x000f_ffff_ffff_f000) | u64::from(self.rights.bits() & 0b111);
        raw |= u64::from(self.memtype_bits & 0b111) << 3;
        if self.ignore_pat {
            raw |= 1 << 6;
        }
        if self.size != PageSize::Size4K {
            raw |= 1 << 7;
        }
        raw
    }
}

/// L1's EPT as a map of leaves and the L1 pages its tables occupy. All non-leaf entries
/// grant read, write and execute.
#[derive(Clone, Debug)]
pub struct L1EptModel {
    /// Leaves by L2 base; never overlapping.
    pub leaves: BTreeMap<u64, ModelLeaf>,
    /// L1 address of the PML4 table.
    pub root: u64,
    /// PDPT pages by `l2 >> 39`, PD pages by `l2 >> 30`, PT pages by `l2 >> 21`.
    tables: [BTreeMap<u64, u64>; 3],
    free_table_pages: Vec<u64>,
}

/// A write L1 makes to its own memory to realise a model change.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct L1Write {
    /// L1 guest-physical address of the entry.
    pub address: u64,
    /// Value.
    pub value: u64,
}

fn shift_of(level: usize) -> u32 {
    12 + 9 * level as u32
}

impl L1EptModel {
    /// An empty EPT whose tables will occupy `table_pages` (L1 addresses), the first being
    /// the root.
    pub fn new(mut table_pages: Vec<u64>) -> Self {
        table_pages.reverse();
        let root = table_pages.pop().unwrap_or(0);
        Self {
            leaves: BTreeMap::new(),
            root,
            tables: Default::default(),
            free_table_pages: table_pages,
        }
    }

    /// The leaf covering `gpa`.
    pub fn lookup(&self, gpa: u64) -> Option<&ModelLeaf> {
        self.leaves
            .range(..=gpa)
            .next_back()
            .map(|(_, l)| l)
            .filter(|l| l.covers(gpa))
    }

    /// The table page referenced from an entry at `level` (0 = PML4E, so 0 = PDPT, 1 = PD,
    /// 2 = PT) for `gpa`.
    pub fn table(&self, level: usize, gpa: u64) -> Option<u64> {
        let key = gpa >> shift_of(3 - level);
        self.tables.get(level)?.get(&key).copied()
    }

    /// All table pages in use (root first).
    pub fn table_pages(&self) -> Vec<u64> {
        let mut out = Vec::from([self.root]);
        for t in &self.tables {
            out.extend(t.values().copied());
        }
        out
    }

    /// The entry address for `gpa` at model level `level` (0 = PML4 ... 3 = PT), if the table
    /// exists.
    fn entry_address(&self, level: usize, gpa: u64) -> Option<u64> {
        let table = if level == 0 {
            Some(self.root)
        } else {
            self.table(level - 1, gpa)
        }?;
        Some(table + ((gpa >> shift_of(3 - level)) & 511) * 8)
    }

    /// Maps `leaf`, replacing overlapping leaves; returns the writes L1 makes (tables first,
    /// leaf last), or `None` when no table page is left.
    pub fn map(&mut self, leaf: ModelLeaf) -> Option<Vec<L1Write>> {
        let mut writes = Vec::new();
        let end = leaf.l2 + leaf.size.bytes();
        let overlapping: Vec<u64> = self
            .leaves
            .range(..end)
            .filter(|(_, l)| l.l2 + l.size.bytes() > leaf.l2)
            .map(|(&k, _)| k)
            .collect();
        for k in overlapping {
            writes.extend(self.unmap(k));
        }
        let leaf_level = 4 - usize::from(leaf.size.level()); // 1 = PDPT, 2 = PD, 3 = PT
        for level in 0..leaf_level {
            // The table referenced from an entry at `level` (0 = PML4E): `tables[level]`.
            let key = leaf.l2 >> shift_of(3 - level);
            if self.tables[level].contains_key(&key) {
                continue;
            }
            let page = self.free_table_pages.pop()?;
            // A fresh table: clear it, then link it.
            for i in 0..512 {
                writes.push(L1Write {
                    address: page + i * 8,
                    value: 0,
                });
            }
            self.tables[level].insert(key, page);
            let at = self.entry_address(level, leaf.l2)?;
            writes.push(L1Write {
                address: at,
                value: page | 0b111,
            });
        }
        // A large leaf replaces whatever table hung below its entry.
        if leaf_level < 3 {
            for deeper in leaf_level..3 {
                let lo = leaf.l2 >> shift_of(3 - deeper);
                let hi = (end - 1) >> shift_of(3 - deeper);
                let keys: Vec<u64> = self.tables[deeper]
                    .range(lo..=hi)
                    .map(|(&k, _)| k)
                    .collect();
                for k in keys {
                    self.tables[deeper].remove(&k);
                }
            }
        }
        let at = self.entry_address(leaf_level, leaf.l2)?;
        writes.push(L1Write {
            address: at,
            value: leaf.raw(),
        });
        self.leaves.insert(leaf.l2, leaf);
        Some(writes)
    }

    /// Unmaps the leaf at L2 base `l2`; returns the write (none if there was no leaf).
    pub fn unmap(&mut self, l2: u64) -> Vec<L1Write> {
        let Some(leaf) = self.leaves.remove(&l2) else {
            return Vec::new();
        };
        let leaf_level = 4 - usize::from(leaf.size.level());
        self.entry_address(leaf_level, l2)
            .map(|address| L1Write { address, value: 0 })
            .into_iter()
            .collect()
    }

    /// Every write that builds the whole EPT: zeroed tables, table links, leaves.
    pub fn materialize(&self) -> Vec<L1Write> {
        let mut writes = Vec::new();
        for page in self.table_pages() {
            writes.extend((0..512).map(|i| L1Write {
                address: page + i * 8,
                value: 0,
            }));
        }
        for (level, t) in self.tables.iter().enumerate() {
            for (&key, &page) in t {
                let gpa = key << shift_of(3 - level);
                if let Some(at) = self.entry_address(level, gpa) {
                    writes.push(L1Write {
                        address: at,
                        value: page | 0b111,
                    });
                }
            }
        }
        for leaf in self.leaves.values() {
            let leaf_level = 4 - usize::from(leaf.size.level());
            if let Some(at) = self.entry_address(leaf_level, leaf.l2) {
                writes.push(L1Write {
                    address: at,
                    value: leaf.raw(),
                });
            }
        }
        writes
    }
}

/// One leaf of L0's map of L1.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct L0Leaf {
    /// L1 guest-physical base.
    pub l1: u64,
    /// Page size.
    pub size: PageSize,
    /// Host physical base.
    pub host: u64,
    /// Rights L0 gives.
    pub rights: Rights,
    /// Memory type.
    pub memtype: MemType,
}

/// L0's map of L1 as a map of leaves.
#[derive(Clone, Debug, Default)]
pub struct L0Model {
    /// Leaves by L1 base; never overlapping.
    pub leaves: BTreeMap<u64, L0Leaf>,
}

impl L0Model {
    /// The leaf covering L1 address `l1`.
    pub fn lookup(&self, l1: u64) -> Option<&L0Leaf> {
        self.leaves
            .range(..=l1)
            .next_back()
            .map(|(_, l)| l)
            .filter(|l| l.l1 <= l1 && l1 < l.l1 + l.size.bytes())
    }

    /// The host address of `l1` and the leaf.
    pub fn translate(&self, l1: u64) -> Option<(u64, &L0Leaf)> {
        self.lookup(l1).map(|l| (l.host + (l1 - l.l1), l))
    }

    /// Whether host range `[host, host + len)` lies in one leaf's image with at least
    /// `rights`: what isolation demands of every shadow entry.
    pub fn gives(&self, host: u64, len: u64, rights: Rights) -> bool {
        self.leaves.values().any(|l| {
            l.host <= host && host + len <= l.host + l.size.bytes() && l.rights.contains(rights)
        })
    }
}

/// What the hardware would do for an L2 access, per the model.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Expected {
    /// EPT violation of L1's EPT with these rights in qualification bits 5:3.
    Violation(Rights),
    /// EPT misconfiguration of L1's EPT.
    Misconfiguration,
    /// L0 must act at this L1 address (an L1 EPT table page or the data page).
    PassToL0(u64),
    /// Translates to this host address with these composed rights.
    Fix {
        /// Host address.
        host: u64,
        /// L1 rights AND L0 rights.
        rights: Rights,
    },
}

/// What the composition says for an access of `gpa`: L1's tables are read top-down (each
/// must be readable through L0), then the leaf is judged, then L0 is asked.
pub fn expected(
    l1: &L1EptModel,
    l0: &L0Model,
    caps: &EptCapabilities,
    gpa: u64,
    access: Rights,
) -> Expected {
    let readable = |page: u64| {
        l0.lookup(page)
            .is_some_and(|l| l.rights.contains(Rights::READ))
    };
    let gpa = gpa & ((1 << 48) - 1);
    let leaf = l1.lookup(gpa);
    let leaf_level = leaf.map_or(3, |l| 4 - usize::from(l.size.level()));
    if !readable(l1.root) {
        return Expected::PassToL0(l1.root);
    }
    for level in 0..3 {
        if level + 1 > leaf_level && leaf.is_some() {
            break;
        }
        match l1.table(level, gpa) {
            Some(page) if !readable(page) => return Expected::PassToL0(page),
            Some(_) => {}
            None => return Expected::Violation(Rights::empty()),
        }
    }
    let Some(leaf) = leaf else {
        return Expected::Violation(Rights::empty());
    };
    if !leaf.is_valid(caps) {
        return Expected::Misconfiguration;
    }
    if !leaf.rights.contains(access) {
        return Expected::Violation(leaf.rights);
    }
    let l1_address = leaf.l1 + (gpa - leaf.l2);
    match l0.translate(l1_address) {
        Some((host, l)) if (leaf.rights & l.rights).contains(access) => Expected::Fix {
            host,
            rights: leaf.rights & l.rights,
        },
        _ => Expected::PassToL0(l1_address),
    }
}

/// One value L1's EPT held, and when.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Held {
    /// The value.
    pub leaf: ModelLeaf,
    /// Time it was written.
    pub since: u64,
    /// Time it was overwritten or removed (`None`: still held).
    pub until: Option<u64>,
}

/// Every value each L1 EPT held, and each vCPU's invalidations of each EPT.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Held values per EPT.
    pub held: BTreeMap<usize, Vec<Held>>,
    /// Last INVEPT per (vCPU, EPT).
    pub invept: BTreeMap<(usize, usize), u64>,
    /// Last reflected fault per (vCPU, EPT, 4 KiB page).
    pub faults: BTreeMap<(usize, usize, u64), u64>,
    /// Logical clock.
    pub now: u64,
}

/// A shadow or TLB translation to judge.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Cached {
    /// L2 base.
    pub l2: u64,
    /// Bytes covered.
    pub len: u64,
    /// Host base.
    pub host: u64,
    /// Rights.
    pub rights: Rights,
    /// Memory type and ignore-PAT, if known (TLB entries do not record them).
    pub memtype: Option<(MemType, bool)>,
}

impl History {
    /// Advances the clock.
    pub fn tick(&mut self) -> u64 {
        self.now += 1;
        self.now
    }

    /// Records that EPT `ept` now holds `leaf` (and that what it overlapped ended).
    pub fn write(&mut self, ept: usize, removed: &[ModelLeaf], leaf: Option<ModelLeaf>) {
        let now = self.tick();
        let held = self.held.entry(ept).or_default();
        for r in removed {
            for h in held.iter_mut() {
                if h.until.is_none() && h.leaf == *r {
                    h.until = Some(now);
                }
            }
        }
        if let Some(leaf) = leaf {
            held.push(Held {
                leaf,
                since: now,
                until: None,
            });
        }
    }

    /// `vcpu` executed INVEPT for `ept`.
    pub fn invept(&mut self, vcpu: usize, ept: usize) {
        let now = self.tick();
        self.invept.insert((vcpu, ept), now);
    }

    /// A fault at `gpa` was reflected to L1 on `vcpu` under `ept`.
    pub fn reflected(&mut self, vcpu: usize, ept: usize, gpa: u64) {
        let now = self.tick();
        self.faults.insert((vcpu, ept, gpa & !(PAGE_SIZE - 1)), now);
    }

    /// Whether `vcpu` running on EPT `ept` may hold translation `c`: some value L1's EPT held
    /// for the whole range, not ended before the last invalidation covering any page of it,
    /// valid, with at least the rights, composing through L0 (now) to exactly `c.host`, with
    /// the memory-type rule.
    pub fn may_hold(
        &self,
        vcpu: usize,
        ept: usize,
        l0: &L0Model,
        caps: &EptCapabilities,
        c: &Cached,
    ) -> bool {
        let mut invalidated = self.invept.get(&(vcpu, ept)).copied().unwrap_or(0);
        let lo = (vcpu, ept, c.l2);
        let hi = (vcpu, ept, c.l2 + c.len - 1);
        if let Some(t) = self.faults.range(lo..=hi).map(|(_, &t)| t).max() {
            invalidated = invalidated.max(t);
        }
        let Some(held) = self.held.get(&ept) else {
            return false;
        };
        held.iter().any(|h| {
            let l = &h.leaf;
            if h.until.is_some_and(|u| u <= invalidated) || !l.is_valid(caps) {
                return false;
            }
            let covers = l.l2 <= c.l2 && c.l2 + c.len <= l.l2 + l.size.bytes();
            if !covers || !l.rights.contains(c.rights) {
                return false;
            }
            let l1 = l.l1 + (c.l2 - l.l2);
            let Some((host, l0leaf)) = l0.translate(l1) else {
                return false;
            };
            if host != c.host
                || !l0leaf.rights.contains(c.rights)
                || l1 + c.len > l0leaf.l1 + l0leaf.size.bytes()
            {
                return false;
            }
            match (c.memtype, MemType::from_bits(l.memtype_bits)) {
                (None, _) => true,
                (Some(got), Some(mt)) => {
                    got == shadow_memory_type(mt, l.ignore_pat, l0leaf.memtype)
                }
                (Some(_), None) => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(l2: u64, size: PageSize, l1: u64, rights: Rights) -> ModelLeaf {
        ModelLeaf {
            l2,
            size,
            l1,
            rights,
            memtype_bits: 6,
            ignore_pat: false,
        }
    }

    #[test]
    fn composition_follows_both_maps() {
        let mut l1 = L1EptModel::new((0..8).map(|i| 0x10_0000 + i * 0x1000).collect());
        l1.map(leaf(
            0x4000,
            PageSize::Size4K,
            0x9000,
            Rights::READ | Rights::WRITE,
        ))
        .unwrap();
        let mut l0 = L0Model::default();
        for page in (0x10_0000..0x10_8000).step_by(0x1000).chain([0x9000]) {
            l0.leaves.insert(
                page,
                L0Leaf {
                    l1: page,
                    size: PageSize::Size4K,
                    host: page + 0x1_0000_0000,
                    rights: Rights::READ,
                    memtype: MemType::WriteBack,
                },
            );
        }
        let caps = EptCapabilities::default();
        assert_eq!(
            expected(&l1, &l0, &caps, 0x4123, Rights::READ),
            Expected::Fix {
                host: 0x1_0000_9123,
                rights: Rights::READ
            }
        );
        assert_eq!(
            expected(&l1, &l0, &caps, 0x4123, Rights::WRITE),
            Expected::PassToL0(0x9123)
        );
        assert_eq!(
            expected(&l1, &l0, &caps, 0x4123, Rights::EXECUTE),
            Expected::Violation(Rights::READ | Rights::WRITE)
        );
        assert_eq!(
            expected(&l1, &l0, &caps, 0x5000, Rights::READ),
            Expected::Violation(Rights::empty())
        );
        l0.leaves.remove(&l1.root);
        assert_eq!(
            expected(&l1, &l0, &caps, 0x4123, Rights::READ),
            Expected::PassToL0(l1.root)
        );
    }

    #[test]
    fn history_forgets_values_ended_before_invept() {
        let mut h = History::default();
        let a = leaf(0, PageSize::Size4K, 0x1000, Rights::READ);
        let b = leaf(0, PageSize::Size4K, 0x2000, Rights::READ);
        let mut l0 = L0Model::default();
        for p in [0x1000u64, 0x2000] {
            l0.leaves.insert(
                p,
                L0Leaf {
                    l1: p,
                    size: PageSize::Size4K,
                    host: p,
                    rights: Rights::RWX,
                    memtype: MemType::WriteBack,
                },
            );
        }
        let caps = EptCapabilities::default();
        let c = Cached {
            l2: 0,
            len: 4096,
            host: 0x1000,
            rights: Rights::READ,
            memtype: None,
        };
        h.write(0, &[], Some(a));
        h.write(0, &[a], Some(b));
        assert!(
            h.may_hold(0, 0, &l0, &caps, &c),
            "stale value allowed before INVEPT"
        );
        h.invept(0, 0);
        assert!(!h.may_hold(0, 0, &l0, &caps, &c), "not after");
        assert!(h.may_hold(1, 0, &l0, &caps, &c), "INVEPT is per vCPU");
        h.reflected(1, 0, 0x10);
        assert!(
            !h.may_hold(1, 0, &l0, &caps, &c),
            "a reflected fault invalidates its page"
        );
    }
}
