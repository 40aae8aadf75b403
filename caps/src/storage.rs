//! Where derivation-tree nodes live: a host slab or a slice of donated memory.

use crate::derivation::{MAX_NODES, Node, NodeId};

/// Memory for derivation-tree nodes.
///
/// Implementations hand out slots by index and must never return an id for which `get` then
/// fails. Ids at or above [`MAX_NODES`] are never valid.
pub trait NodeStorage {
    /// The live node `id`, or `None` if `id` is out of range or free.
    fn get(&self, id: NodeId) -> Option<&Node>;
    /// The live node `id`, mutably, or `None` if `id` is out of range or free.
    fn get_mut(&mut self, id: NodeId) -> Option<&mut Node>;
    /// Stores `node` in a free slot; `None` when no slot is free.
    fn alloc(&mut self, node: Node) -> Option<NodeId>;
    /// Frees slot `id`. Freeing a free or out-of-range slot does nothing.
    fn free(&mut self, id: NodeId);
    /// Bytes of memory this storage holds, for memory accounting.
    fn bytes_used(&self) -> usize;
}

fn slot_index(id: NodeId) -> usize {
    // u32 -> usize is lossless on every target this crate supports (32 and 64 bit).
    id.index() as usize
}

fn node_id(index: usize) -> Option<NodeId> {
    if index < MAX_NODES {
        u32::try_from(index).ok().map(NodeId::from_index)
    } else {
        None
    }
}

/// Fixed-capacity storage over a caller-provided slice, with the free list threaded through the
/// free nodes. No allocation: this is what the kernel uses over donated memory.
pub struct SliceStorage<'a> {
    nodes: &'a mut [Node],
    free_head: Option<NodeId>,
    free_count: usize,
}

impl<'a> SliceStorage<'a> {
    /// A storage with no capacity (every `alloc` fails); replace it once memory is donated.
    pub const fn empty() -> Self {
        Self {
            nodes: &mut [],
            free_head: None,
            free_count: 0,
        }
    }

    /// Takes over `nodes`, discarding their contents; all slots start free. Slots beyond
    /// [`MAX_NODES`] are left unused. O(len).
    pub fn new(nodes: &'a mut [Node]) -> Self {
        let usable = nodes.len().min(MAX_NODES);
        for (i, slot) in nodes.iter_mut().enumerate().take(usable) {
            let next = if i + 1 < usable { node_id(i + 1) } else { None };
            *slot = Node::vacant(next);
        }
        Self {
            nodes,
            free_head: node_id(0).filter(|_| usable > 0),
            free_count: usable,
        }
    }

    /// Number of slots this storage can ever hand out.
    pub fn capacity(&self) -> usize {
        self.nodes.len().min(MAX_NODES)
    }

    /// Number of free slots.
    pub fn free_count(&self) -> usize {
        self.free_count
    }

    /// Number of live nodes.
    pub fn live_count(&self) -> usize {
        self.capacity().saturating_sub(self.free_count)
    }
}

impl NodeStorage for SliceStorage<'_> {
    fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(slot_index(id)).filter(|n| !n.is_vacant())
    }

    fn get_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.nodes
            .get_mut(slot_index(id))
            .filter(|n| !n.is_vacant())
    }

    fn alloc(&mut self, node: Node) -> Option<NodeId> {
        if node.is_vacant() {
            return None;
        }
        let id = self.free_head?;
        let slot = self
            .nodes
            .get_mut(slot_index(id))
            .filter(|n| n.is_vacant())?;
        self.free_head = slot.next_vacant();
        *slot = node;
        self.free_count = self.free_count.saturating_sub(1);
        Some(id)
    }

    fn free(&mut self, id: NodeId) {
        if slot_index(id) >= self.capacity() {
            return;
        }
        let head = self.free_head;
        if let Some(slot) = self
            .nodes
            .get_mut(slot_index(id))
            .filter(|n| !n.is_vacant())
        {
            *slot = Node::vacant(head);
            self.free_head = Some(id);
            self.free_count += 1;
        }
    }

    fn bytes_used(&self) -> usize {
        core::mem::size_of_val(self.nodes)
    }
}

#[cfg(any(test, feature = "alloc"))]
pub use vec_storage::VecStorage;

#[cfg(any(test, feature = "alloc"))]
mod vec_storage {
    use super::{NodeStorage, node_id, slot_index};
    use crate::derivation::{MAX_NODES, Node, NodeId};
    use alloc::vec::Vec;

    /// Growable host storage: a slab over `Vec<Node>` with a free list threaded through free
    /// slots and an optional capacity limit (to exercise exhaustion in tests).
    #[derive(Default)]
    pub struct VecStorage {
        nodes: Vec<Node>,
        free_head: Option<NodeId>,
        free_count: usize,
        limit: Option<usize>,
    }

    impl VecStorage {
        /// An empty, unlimited slab (`const`, so a kernel can keep it in a `static`).
        pub const fn new() -> Self {
            Self {
                nodes: Vec::new(),
                free_head: None,
                free_count: 0,
                limit: None,
            }
        }

        /// An empty slab that never holds more than `limit` nodes.
        pub fn with_limit(limit: usize) -> Self {
            Self {
                limit: Some(limit),
                ..Self::default()
            }
        }

        /// Number of slots ever created (live + free).
        pub fn slab_len(&self) -> usize {
            self.nodes.len()
        }

        /// Number of free slots in the slab.
        pub fn free_count(&self) -> usize {
            self.free_count
        }

        /// Number of live nodes.
        pub fn live_count(&self) -> usize {
            self.nodes.len().saturating_sub(self.free_count)
        }
    }

    impl NodeStorage for VecStorage {
        fn get(&self, id: NodeId) -> Option<&Node> {
            self.nodes.get(slot_index(id)).filter(|n| !n.is_vacant())
        }

        fn get_mut(&mut self, id: NodeId) -> Option<&mut Node> {
            self.nodes
                .get_mut(slot_index(id))
                .filter(|n| !n.is_vacant())
        }

        fn alloc(&mut self, node: Node) -> Option<NodeId> {
            if node.is_vacant() {
                return None;
            }
            if let Some(id) = self.free_head {
                let slot = self
                    .nodes
                    .get_mut(slot_index(id))
                    .filter(|n| n.is_vacant())?;
                self.free_head = slot.next_vacant();
                *slot = node;
                self.free_count = self.free_count.saturating_sub(1);
                return Some(id);
            }
            let limit = self.limit.unwrap_or(MAX_NODES).min(MAX_NODES);
            if self.nodes.len() >= limit {
                return None;
            }
            let id = node_id(self.nodes.len())?;
            self.nodes.try_reserve(1).ok()?;
            self.nodes.push(node);
            Some(id)
        }

        fn free(&mut self, id: NodeId) {
            let head = self.free_head;
            if let Some(slot) = self
                .nodes
                .get_mut(slot_index(id))
                .filter(|n| !n.is_vacant())
            {
                *slot = Node::vacant(head);
                self.free_head = Some(id);
                self.free_count += 1;
            }
        }

        fn bytes_used(&self) -> usize {
            self.nodes.capacity() * core::mem::size_of::<Node>()
        }
    }
}
