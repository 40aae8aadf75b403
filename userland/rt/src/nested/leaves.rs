//! The leaves a user-level owner put into an EPT object: `EptUnmap` needs each leaf's exact
//! address and order, and the kernel offers no range unmap, so the owner remembers them.
//!
//! 4 KiB leaves cost one bit each, in a 512-bit map per 2 MiB region; 2 MiB and 1 GiB leaves
//! one map entry each. The record may be *stale* in one direction only: a leaf the kernel
//! removed on its own (a revocation of its derivation parent) may still be listed, and
//! unmapping it answers `NotMapped`. A leaf the kernel holds is always listed, as long as
//! every successful `EptMap` is [`Leaves::insert`]ed.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use ept::entry::PageSize;

const SMALL: u64 = 4096;
const REGION: u64 = 2 << 20;

/// The leaves of one EPT object, by guest-physical base address and size.
#[derive(Clone, Debug, Default)]
pub struct Leaves {
    /// 2 MiB region base → one bit per 4 KiB leaf.
    small: BTreeMap<u64, [u64; 8]>,
    /// Base → size of each 2 MiB or 1 GiB leaf.
    large: BTreeMap<u64, PageSize>,
    count: usize,
}

fn bit(address: u64) -> (usize, u64) {
    let index = ((address % REGION) / SMALL) as usize;
    (index / 64, 1 << (index % 64))
}

impl Leaves {
    pub fn new() -> Self {
        Self::default()
    }

    /// Leaves recorded.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Records the leaf of `size` at `base` (aligned down to `size`).
    pub fn insert(&mut self, base: u64, size: PageSize) {
        let base = size.align_down(base);
        let added = match size {
            PageSize::Size4K => {
                let (word, mask) = bit(base);
                let map = self.small.entry(base - base % REGION).or_insert([0; 8]);
                let added = map[word] & mask == 0;
                map[word] |= mask;
                added
            }
            _ => self.large.insert(base, size) != Some(size),
        };
        if added {
            self.count += 1;
        }
    }

    /// Forgets the leaf of `size` at `base`; returns whether it was recorded.
    pub fn remove(&mut self, base: u64, size: PageSize) -> bool {
        let base = size.align_down(base);
        let removed = match size {
            PageSize::Size4K => {
                let region = base - base % REGION;
                let (word, mask) = bit(base);
                match self.small.get_mut(&region) {
                    Some(map) if map[word] & mask != 0 => {
                        map[word] &= !mask;
                        if map.iter().all(|&w| w == 0) {
                            self.small.remove(&region);
                        }
                        true
                    }
                    _ => false,
                }
            }
            _ => {
                if self.large.get(&base) == Some(&size) {
                    self.large.remove(&base);
                    true
                } else {
                    false
                }
            }
        };
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Whether the leaf of `size` at `base` is recorded.
    pub fn contains(&self, base: u64, size: PageSize) -> bool {
        let base = size.align_down(base);
        match size {
            PageSize::Size4K => {
                let (word, mask) = bit(base);
                self.small
                    .get(&(base - base % REGION))
                    .is_some_and(|m| m[word] & mask != 0)
            }
            _ => self.large.get(&base) == Some(&size),
        }
    }

    /// The recorded leaves that translate `address` (at most one per size).
    pub fn covering(&self, address: u64) -> Vec<(u64, PageSize)> {
        PageSize::DESCENDING
            .into_iter()
            .map(|size| (size.align_down(address), size))
            .filter(|&(base, size)| self.contains(base, size))
            .collect()
    }

    /// The recorded leaves overlapping `[start, start + length)`, a larger leaf reaching
    /// beyond the range included.
    pub fn overlapping(&self, start: u64, length: u64) -> Vec<(u64, PageSize)> {
        let end = start.saturating_add(length);
        let mut found = Vec::new();
        if start >= end {
            return found;
        }
        // A large leaf overlapping the range starts at or after the 1 GiB boundary below it.
        let low = PageSize::Size1G.align_down(start);
        for (&base, &size) in self.large.range(low..end) {
            if base.saturating_add(size.bytes()) > start {
                found.push((base, size));
            }
        }
        for (&region, map) in self.small.range(start - start % REGION..end) {
            for (word, &bits) in map.iter().enumerate() {
                let mut bits = bits;
                while bits != 0 {
                    let index = word as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let base = region + index * SMALL;
                    if base >= start.saturating_sub(SMALL - 1) && base < end {
                        found.push((base, PageSize::Size4K));
                    }
                }
            }
        }
        found
    }

    /// Forgets every leaf and returns them.
    pub fn take_all(&mut self) -> Vec<(u64, PageSize)> {
        let all = self.overlapping(0, u64::MAX);
        *self = Self::default();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn insert_remove_and_count_each_leaf_once() {
        let mut l = Leaves::new();
        l.insert(0x1234_5000, PageSize::Size4K);
        l.insert(0x1234_5fff, PageSize::Size4K);
        l.insert(4 * MIB, PageSize::Size2M);
        l.insert(GIB, PageSize::Size1G);
        assert_eq!(l.len(), 3);
        assert!(l.contains(0x1234_5000, PageSize::Size4K));
        assert!(!l.contains(0x1234_6000, PageSize::Size4K));
        assert!(l.remove(0x1234_5000, PageSize::Size4K));
        assert!(!l.remove(0x1234_5000, PageSize::Size4K));
        assert!(!l.remove(4 * MIB, PageSize::Size1G), "size must match");
        assert!(l.remove(4 * MIB, PageSize::Size2M));
        assert_eq!(l.len(), 1);
        assert!(l.small.is_empty(), "an emptied region's map goes");
    }

    #[test]
    fn covering_finds_the_leaf_of_each_size_that_translates_an_address() {
        let mut l = Leaves::new();
        l.insert(GIB + 6 * MIB + 0x3000, PageSize::Size4K);
        l.insert(GIB + 6 * MIB, PageSize::Size2M);
        l.insert(GIB, PageSize::Size1G);
        let c = l.covering(GIB + 6 * MIB + 0x3abc);
        assert_eq!(
            c,
            [
                (GIB, PageSize::Size1G),
                (GIB + 6 * MIB, PageSize::Size2M),
                (GIB + 6 * MIB + 0x3000, PageSize::Size4K)
            ]
        );
        assert_eq!(l.covering(GIB + 8 * MIB), [(GIB, PageSize::Size1G)]);
        assert!(l.covering(5 * GIB).is_empty());
    }

    #[test]
    fn overlapping_includes_large_leaves_reaching_into_the_range_and_nothing_outside() {
        let mut l = Leaves::new();
        l.insert(0, PageSize::Size1G);
        l.insert(GIB + 2 * MIB, PageSize::Size2M);
        l.insert(GIB + 4 * MIB - 0x1000, PageSize::Size4K);
        l.insert(GIB + 4 * MIB, PageSize::Size4K);
        l.insert(GIB + 6 * MIB, PageSize::Size4K);
        let got: BTreeSet<_> = l.overlapping(GIB + 3 * MIB, 3 * MIB).into_iter().collect();
        let want: BTreeSet<_> = [
            (GIB + 2 * MIB, PageSize::Size2M),
            (GIB + 4 * MIB - 0x1000, PageSize::Size4K),
            (GIB + 4 * MIB, PageSize::Size4K),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want);
        assert_eq!(l.overlapping(GIB - 1, 1), [(0, PageSize::Size1G)]);
        assert!(l.overlapping(GIB + 6 * MIB, 0).is_empty());
        assert_eq!(
            l.overlapping(GIB + 6 * MIB + 0x800, 0x10),
            [(GIB + 6 * MIB, PageSize::Size4K)],
            "a range inside a 4 KiB leaf finds it"
        );
    }

    #[test]
    fn take_all_returns_every_leaf_and_empties_the_record() {
        let mut l = Leaves::new();
        let mut want = BTreeSet::new();
        for i in 0..700u64 {
            let a = i * 0x1000 * 3;
            l.insert(a, PageSize::Size4K);
            want.insert((a, PageSize::Size4K));
        }
        l.insert(64 * GIB, PageSize::Size1G);
        want.insert((64 * GIB, PageSize::Size1G));
        l.insert(!(GIB - 1), PageSize::Size1G);
        want.insert((!(GIB - 1), PageSize::Size1G));
        assert_eq!(l.len(), want.len());
        let got: BTreeSet<_> = l.take_all().into_iter().collect();
        assert_eq!(got, want);
        assert!(l.is_empty());
        assert!(l.overlapping(0, u64::MAX).is_empty());
    }
}
