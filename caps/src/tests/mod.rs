//! Host tests: unit tests for each rule and property tests against reference models.

mod derivation;

mod capabilities;

use crate::derivation::{NodeStorage, SliceStorage, VecStorage};

/// Storage statistics the model checks against.
pub(crate) trait Counted: NodeStorage {
    fn live(&self) -> usize;
    fn free_slots(&self) -> usize;
    fn total(&self) -> usize;
}

impl Counted for VecStorage {
    fn live(&self) -> usize {
        self.live_count()
    }
    fn free_slots(&self) -> usize {
        self.free_count()
    }
    fn total(&self) -> usize {
        self.slab_len()
    }
}

impl Counted for SliceStorage<'_> {
    fn live(&self) -> usize {
        self.live_count()
    }
    fn free_slots(&self) -> usize {
        self.free_count()
    }
    fn total(&self) -> usize {
        self.capacity()
    }
}
