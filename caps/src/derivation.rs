//! The derivation tree (mapping database): who derived what from whom, for capabilities and mappings.
//!
//! One implementation serves the whole project: the capability system records which capability
//! was delegated from which, and the `ept` crate records which guest mapping was derived from
//! which source mapping. Revoking a node removes everything derived from it.
//!
//! Nodes live in a [`NodeStorage`]: a growable slab on the host (`VecStorage`, behind the
//! `alloc` feature) or a fixed slice of memory the caller donates ([`SliceStorage`]), which is
//! what the kernel uses. Links are 32-bit node indices; siblings are doubly linked, so deriving a
//! node and unlinking a node are O(1), and revoking is O(number of descendants). Every walk is
//! iterative: nothing here recurses, so deep trees cannot overflow a small kernel stack.
//!
//! Keys are opaque `u64`s to the tree; [`NodeKey`] is the shared encoding.
//!
//! A [`NodeId`] names a storage slot. After a node is removed its slot may be reused, so a stale
//! id either fails with [`DeriveError::NoSuchNode`] (slot free) or names the new node (slot
//! reused). Owners of ids (capability slots, EPT entries) must drop an id when the
//! node is removed; the `on_remove` callbacks exist for exactly that.

pub use crate::key::{KeyError, NodeKey};
#[cfg(any(test, feature = "alloc"))]
pub use crate::storage::VecStorage;
pub use crate::storage::{NodeStorage, SliceStorage};

/// Index value meaning "no node" in a link field.
pub(crate) const NIL: u32 = u32::MAX;
/// Value of the `parent` field that marks a storage slot as free.
pub(crate) const VACANT: u32 = u32::MAX - 1;
/// Largest number of nodes any storage may hold: indices `0..MAX_NODES` never collide with the
/// `NIL` and `VACANT` sentinels.
pub const MAX_NODES: usize = VACANT as usize;

/// The name of a node: an index into its [`NodeStorage`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct NodeId(u32);

impl NodeId {
    /// The id of storage slot `index`. Any value is accepted; out-of-range ids simply name no
    /// node.
    pub const fn from_index(index: u32) -> Self {
        Self(index)
    }

    /// The storage slot this id names.
    pub const fn index(self) -> u32 {
        self.0
    }

    fn from_link(link: u32) -> Option<Self> {
        (link != NIL && link != VACANT).then_some(Self(link))
    }
}

/// One node of the derivation tree, as kept in storage.
///
/// Links are indices (`u32::MAX` = none). A free storage slot is marked by a sentinel in the
/// `parent` field and threads the free list through `next_sibling`; see [`Node::vacant`].
/// Every bit pattern is a valid `Node`, so storage can be carved out of raw donated memory.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Node {
    key: u64,
    parent: u32,
    first_child: u32,
    next_sibling: u32,
    prev_sibling: u32,
}

const _: () = assert!(core::mem::size_of::<Node>() == 24);
const _: () = assert!(core::mem::align_of::<Node>() == 8);

impl Node {
    /// A detached node carrying `key` (no parent, children or siblings).
    pub const fn new(key: u64) -> Self {
        Self {
            key,
            parent: NIL,
            first_child: NIL,
            next_sibling: NIL,
            prev_sibling: NIL,
        }
    }

    /// A free storage slot whose free-list successor is `next`. For [`NodeStorage`]
    /// implementations.
    pub const fn vacant(next: Option<NodeId>) -> Self {
        let next = match next {
            Some(id) => id.0,
            None => NIL,
        };
        Self {
            key: 0,
            parent: VACANT,
            first_child: NIL,
            next_sibling: next,
            prev_sibling: NIL,
        }
    }

    /// Whether this slot is free (made by [`Node::vacant`]).
    pub const fn is_vacant(&self) -> bool {
        self.parent == VACANT
    }

    /// The free-list successor of a vacant slot (`None` for live nodes and the list's end).
    pub fn next_vacant(&self) -> Option<NodeId> {
        if self.is_vacant() {
            NodeId::from_link(self.next_sibling)
        } else {
            None
        }
    }

    /// The node's key.
    pub const fn key(&self) -> u64 {
        self.key
    }

    /// The node this one was derived from (`None` for roots and vacant slots).
    pub fn parent(&self) -> Option<NodeId> {
        NodeId::from_link(self.parent)
    }

    /// The most recently derived child.
    pub fn first_child(&self) -> Option<NodeId> {
        if self.is_vacant() {
            None
        } else {
            NodeId::from_link(self.first_child)
        }
    }

    /// The next (older) sibling.
    pub fn next_sibling(&self) -> Option<NodeId> {
        if self.is_vacant() {
            None
        } else {
            NodeId::from_link(self.next_sibling)
        }
    }

    /// The previous (younger) sibling.
    pub fn prev_sibling(&self) -> Option<NodeId> {
        if self.is_vacant() {
            None
        } else {
            NodeId::from_link(self.prev_sibling)
        }
    }
}

/// Why a derivation-tree operation failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DeriveError {
    /// The storage has no free node.
    OutOfNodes,
    /// The id names no live node (out of range or freed).
    NoSuchNode,
    /// A walk met a link to a missing node. Only possible if nodes were freed or overwritten
    /// through [`DerivationTree::storage_mut`]; the operation stopped part-way.
    Inconsistent,
}

/// A forest of nodes, each derived from at most one parent.
pub struct DerivationTree<S: NodeStorage> {
    storage: S,
    len: usize,
}

impl<S: NodeStorage> DerivationTree<S> {
    /// A tree over `storage`, which must hold no live nodes (a fresh storage).
    pub const fn new(storage: S) -> Self {
        Self { storage, len: 0 }
    }

    fn node(&self, link: u32) -> Option<&Node> {
        if link == NIL || link == VACANT {
            return None;
        }
        self.storage.get(NodeId(link)).filter(|n| !n.is_vacant())
    }

    fn node_mut(&mut self, link: u32) -> Option<&mut Node> {
        if link == NIL || link == VACANT {
            return None;
        }
        self.storage
            .get_mut(NodeId(link))
            .filter(|n| !n.is_vacant())
    }

    fn alloc(&mut self, node: Node) -> Result<NodeId, DeriveError> {
        let id = self.storage.alloc(node).ok_or(DeriveError::OutOfNodes)?;
        if id.0 == NIL || id.0 == VACANT {
            // A storage handing out a sentinel index cannot be linked; give it back.
            self.storage.free(id);
            return Err(DeriveError::OutOfNodes);
        }
        self.len += 1;
        Ok(id)
    }

    fn release(&mut self, id: NodeId) {
        self.storage.free(id);
        self.len = self.len.saturating_sub(1);
    }

    /// Adds a node with no parent.
    pub fn insert_root(&mut self, key: u64) -> Result<NodeId, DeriveError> {
        self.alloc(Node::new(key))
    }

    /// Adds a node derived from `parent`. O(1).
    pub fn derive(&mut self, parent: NodeId, key: u64) -> Result<NodeId, DeriveError> {
        let old_first = self
            .node(parent.0)
            .ok_or(DeriveError::NoSuchNode)?
            .first_child;
        let id = self.alloc(Node {
            key,
            parent: parent.0,
            next_sibling: old_first,
            ..Node::new(0)
        })?;
        if let Some(sibling) = self.node_mut(old_first) {
            sibling.prev_sibling = id.0;
        }
        if let Some(p) = self.node_mut(parent.0) {
            p.first_child = id.0;
        }
        Ok(id)
    }

    /// Whether `id` names a live node.
    pub fn contains(&self, id: NodeId) -> bool {
        self.node(id.0).is_some()
    }

    /// The key of node `id`.
    pub fn key(&self, id: NodeId) -> Option<u64> {
        self.node(id.0).map(|n| n.key)
    }

    /// Replaces the key of node `id`.
    pub fn set_key(&mut self, id: NodeId, key: u64) -> Result<(), DeriveError> {
        self.node_mut(id.0).ok_or(DeriveError::NoSuchNode)?.key = key;
        Ok(())
    }

    /// The node `id` was derived from (`None` for roots and dead ids).
    pub fn parent(&self, id: NodeId) -> Option<NodeId> {
        self.node(id.0).and_then(Node::parent)
    }

    /// The nodes derived directly from `id`, youngest first. Empty for dead ids.
    pub fn children(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let first = self.node(id.0).map_or(NIL, |n| n.first_child);
        Links {
            tree: self,
            next: first,
            budget: self.len,
        }
    }

    /// All strict descendants of `id` in pre-order (each node before its children). Empty for
    /// dead ids. Iterative, O(1) extra space.
    pub fn descendants(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let first = self.node(id.0).map_or(NIL, |n| n.first_child);
        Descendants {
            tree: self,
            root: id.0,
            next: first,
            budget: self.len,
        }
    }

    /// Whether `ancestor` is a strict ancestor of `id`. O(depth).
    pub fn is_ancestor(&self, ancestor: NodeId, id: NodeId) -> bool {
        let mut cur = self.parent(id);
        let mut budget = self.len;
        while let Some(p) = cur {
            if p == ancestor {
                return true;
            }
            if budget == 0 {
                return false;
            }
            budget -= 1;
            cur = self.parent(p);
        }
        false
    }

    /// Detaches live node `link` from its parent and siblings. O(1).
    fn unlink(&mut self, link: u32) {
        let Some(&Node {
            parent,
            next_sibling,
            prev_sibling,
            ..
        }) = self.node(link)
        else {
            return;
        };
        if let Some(prev) = self.node_mut(prev_sibling) {
            prev.next_sibling = next_sibling;
        } else if let Some(p) = self.node_mut(parent)
            && p.first_child == link
        {
            p.first_child = next_sibling;
        }
        if let Some(next) = self.node_mut(next_sibling) {
            next.prev_sibling = prev_sibling;
        }
        if let Some(n) = self.node_mut(link) {
            n.parent = NIL;
            n.next_sibling = NIL;
            n.prev_sibling = NIL;
        }
    }

    /// Removes every strict descendant of `id`, calling `on_remove(node, key)` for each after it
    /// is freed (children before their parents). Returns how many were removed. `id` itself
    /// stays. O(number of descendants), iterative.
    pub fn revoke(
        &mut self,
        id: NodeId,
        on_remove: &mut impl FnMut(NodeId, u64),
    ) -> Result<usize, DeriveError> {
        if self.node(id.0).is_none() {
            return Err(DeriveError::NoSuchNode);
        }
        let root = id.0;
        let mut cur = root;
        let mut removed = 0usize;
        // Every live node is descended into at most once; more means a cycle in the links.
        let mut budget = self.len;
        loop {
            let Some(&Node {
                key,
                parent,
                first_child,
                ..
            }) = self.node(cur)
            else {
                return Err(DeriveError::Inconsistent);
            };
            if first_child != NIL {
                if budget == 0 {
                    return Err(DeriveError::Inconsistent);
                }
                budget -= 1;
                cur = first_child;
                continue;
            }
            if cur == root {
                return Ok(removed);
            }
            // `cur` is a leaf strictly below `root`: free it and resume at its parent.
            self.unlink(cur);
            self.release(NodeId(cur));
            removed += 1;
            on_remove(NodeId(cur), key);
            cur = parent;
        }
    }

    /// Removes `id` and every node derived from it, calling `on_remove` for each (children
    /// before parents, `id` last). Returns how many were removed.
    pub fn remove(
        &mut self,
        id: NodeId,
        on_remove: &mut impl FnMut(NodeId, u64),
    ) -> Result<usize, DeriveError> {
        let removed = self.revoke(id, on_remove)?;
        let key = self.node(id.0).ok_or(DeriveError::Inconsistent)?.key;
        self.unlink(id.0);
        self.release(id);
        on_remove(id, key);
        Ok(removed + 1)
    }

    /// Number of live nodes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree has no nodes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The node storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The node storage, mutably (for example to account or grow it). Freeing or allocating
    /// nodes through it behind the tree's back breaks the tree: operations then fail with
    /// [`DeriveError::Inconsistent`] or act on the wrong nodes, though they never panic.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// Gives the storage back.
    pub fn into_storage(self) -> S {
        self.storage
    }
}

/// Walks a sibling list.
struct Links<'t, S: NodeStorage> {
    tree: &'t DerivationTree<S>,
    next: u32,
    budget: usize,
}

impl<S: NodeStorage> Iterator for Links<'_, S> {
    type Item = NodeId;

    fn next(&mut self) -> Option<NodeId> {
        let node = self.tree.node(self.next)?;
        if self.budget == 0 {
            return None;
        }
        self.budget -= 1;
        let id = NodeId(self.next);
        self.next = node.next_sibling;
        Some(id)
    }
}

/// Pre-order walk of a subtree using parent links instead of a stack.
struct Descendants<'t, S: NodeStorage> {
    tree: &'t DerivationTree<S>,
    root: u32,
    next: u32,
    budget: usize,
}

impl<S: NodeStorage> Iterator for Descendants<'_, S> {
    type Item = NodeId;

    fn next(&mut self) -> Option<NodeId> {
        let node = self.tree.node(self.next)?;
        if self.budget == 0 {
            return None;
        }
        self.budget -= 1;
        let id = NodeId(self.next);
        self.next = NIL;
        if node.first_child != NIL {
            self.next = node.first_child;
            return Some(id);
        }
        // Climb until a node below the root has a next sibling.
        let mut cur = id.0;
        let mut climb = self.tree.len;
        while cur != self.root && climb > 0 {
            climb -= 1;
            let Some(n) = self.tree.node(cur) else { break };
            if n.next_sibling != NIL {
                self.next = n.next_sibling;
                break;
            }
            cur = n.parent;
        }
        Some(id)
    }
}
