//! `NodeIndex`: from an address to the derivation-tree node of the mapping there — an
//! open-addressing hash table (linear probing, backward-shift deletion), so the kernel's map
//! and unmap paths find a mapping's node in a few instructions instead of a B-tree walk.

use crate::derivation::NodeId;
use alloc::vec::Vec;

const EMPTY: u64 = u64::MAX;

/// Address -> (node, tag). Keys are page addresses (any u64 but `u64::MAX`); the tag is a
/// small caller-defined value (the page size of the mapping, say).
#[derive(Default)]
pub struct NodeIndex {
    slots: Vec<(u64, u32, u8)>,
    len: usize,
}

impl NodeIndex {
    pub const fn new() -> Self {
        Self {
            slots: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the table occupies (for memory accounting).
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<(u64, u32, u8)>()
    }

    fn home(&self, key: u64) -> usize {
        let mask = self.slots.len() - 1;
        ((key >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) as usize & mask
    }

    fn find(&self, key: u64) -> Option<usize> {
        if self.slots.is_empty() || key == EMPTY {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].0;
            if k == key {
                return Some(i);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Every (key, node, tag) recorded, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, NodeId, u8)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.0 != EMPTY)
            .map(|&(k, n, t)| (k, NodeId::from_index(n), t))
    }

    /// The node and tag recorded for `key`.
    pub fn get(&self, key: u64) -> Option<(NodeId, u8)> {
        self.find(key)
            .map(|i| (NodeId::from_index(self.slots[i].1), self.slots[i].2))
    }

    pub fn contains_key(&self, key: u64) -> bool {
        self.find(key).is_some()
    }

    /// Records `key`; false (and no change) if it is already there or is `u64::MAX`.
    pub fn insert(&mut self, key: u64, node: NodeId, tag: u8) -> bool {
        if key == EMPTY || self.contains_key(key) {
            return false;
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        while self.slots[i].0 != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = (key, node.index(), tag);
        self.len += 1;
        true
    }

    /// Removes `key`, returning what was recorded.
    pub fn remove(&mut self, key: u64) -> Option<(NodeId, u8)> {
        let mut hole = self.find(key)?;
        let removed = (NodeId::from_index(self.slots[hole].1), self.slots[hole].2);
        let mask = self.slots.len() - 1;
        self.slots[hole].0 = EMPTY;
        self.len -= 1;
        // Backward-shift: move later members of the probe run into the hole when their home
        // is not after it (cyclically), so lookups never stop early at a gap.
        let mut i = (hole + 1) & mask;
        while self.slots[i].0 != EMPTY {
            let home = self.home(self.slots[i].0);
            let distance_i = i.wrapping_sub(home) & mask;
            let distance_hole = hole.wrapping_sub(home) & mask;
            if distance_hole <= distance_i {
                self.slots[hole] = self.slots[i];
                self.slots[i].0 = EMPTY;
                hole = i;
            }
            i = (i + 1) & mask;
        }
        // Shrink when an eighth full (to a quarter full): a table that once held many keys
        // neither keeps their memory nor makes `iter` walk their slots.
        if self.slots.len() > 16 && self.len * 8 < self.slots.len() {
            self.resize(self.slots.len() / 2);
        }
        Some(removed)
    }

    fn grow(&mut self) {
        self.resize((self.slots.len() * 2).max(16));
    }

    fn resize(&mut self, size: usize) {
        let old = core::mem::replace(&mut self.slots, alloc::vec![(EMPTY, 0, 0); size]);
        self.len = 0;
        for (k, n, t) in old {
            if k != EMPTY {
                self.insert(k, NodeId::from_index(n), t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    #[test]
    fn emptied_tables_shrink_and_keep_their_keys() {
        let mut index = NodeIndex::new();
        for page in 0..1000u64 {
            assert!(index.insert(page << 12, NodeId::from_index(page as u32), 0));
        }
        let full = index.bytes();
        for page in 3..1000u64 {
            assert!(index.remove(page << 12).is_some());
        }
        assert!(
            index.bytes() * 32 <= full,
            "{} of {full} bytes",
            index.bytes()
        );
        assert_eq!(index.iter().count(), 3);
        for page in 0..3u64 {
            assert_eq!(
                index.get(page << 12).map(|(n, _)| n.index()),
                Some(page as u32)
            );
        }
    }

    proptest! {
        #[test]
        fn index_behaves_like_an_ordered_map(ops in proptest::collection::vec((0u8..3, 0u64..64, 0u32..1000), 0..400)) {
            let mut index = NodeIndex::new();
            let mut model = BTreeMap::new();
            for (op, page, node) in ops {
                // Few distinct keys: many collisions and removals inside probe runs.
                let key = page << 12;
                match op {
                    0 => {
                        let fresh = !model.contains_key(&key);
                        prop_assert_eq!(index.insert(key, NodeId::from_index(node), (node % 3) as u8), fresh);
                        model.entry(key).or_insert((node, (node % 3) as u8));
                    }
                    1 => {
                        let expected = model.remove(&key).map(|(n, t)| (NodeId::from_index(n), t));
                        prop_assert_eq!(index.remove(key), expected);
                    }
                    _ => {}
                }
                prop_assert_eq!(index.len(), model.len());
                for (k, (n, t)) in &model {
                    prop_assert_eq!(index.get(*k), Some((NodeId::from_index(*n), *t)));
                }
                prop_assert_eq!(index.get(key).is_some(), model.contains_key(&key));
            }
        }
    }

    #[test]
    fn the_empty_marker_is_not_a_key() {
        let mut index = NodeIndex::new();
        assert!(!index.insert(u64::MAX, NodeId::from_index(1), 0));
        assert_eq!(index.get(u64::MAX), None);
    }
}
