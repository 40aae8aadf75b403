//! The interface through which the shadow-EPT engine changes shadow tables, and the
//! memory-type rule every backend applies.
//!
//! The engine decides; the backend (the kernel, through system calls, or the in-memory
//! backend of host tests) checks and does. In particular the backend, not the engine, walks
//! L0's map of L1 for every install, clamps the page size and rights to what L0 gives L1, and
//! records the shadow entry as a derivation-tree child of L0's mapping: isolation never
//! depends on the engine being right.

use crate::entry::{MemType, PageSize, Rights};
use crate::walk::{MemoryError, PhysMemory};

/// A shadow EPT, named by the backend.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct ShadowId(pub u32);

/// What an install actually put in the shadow: at most what was asked, clamped by L0.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Installed {
    /// Page size of the entry (at most the requested `max_size` and L0's page size).
    pub size: PageSize,
    /// Rights of the entry: requested rights AND L0's rights. Empty means nothing was
    /// installed because L0 grants none of the requested rights.
    pub rights: Rights,
    /// Memory type written (see [`shadow_memory_type`]).
    pub memtype: MemType,
    /// Ignore-PAT written.
    pub ignore_pat: bool,
}

/// Why a backend operation failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum BackendError {
    /// L0 does not back L1 guest-physical `l1_gpa` (never populated, ballooned out, MMIO):
    /// the L0 pager must act.
    NotBacked {
        /// The L1 guest-physical address asked for.
        l1_gpa: u64,
    },
    /// The pool of shadow-table pages is exhausted: evict and retry, or donate pages.
    OutOfTables,
    /// The derivation tree has no free node.
    OutOfNodes,
    /// No shadow with that id.
    NoSuchShadow,
    /// L2 and L1 addresses whose offsets within the page size asked for differ.
    Misaligned,
}

/// What the engine needs from whoever owns the shadow tables.
pub trait ShadowBackend {
    /// Creates an empty shadow EPT (one root table page from the pool).
    fn create_shadow(&mut self) -> Result<ShadowId, BackendError>;

    /// Destroys a shadow: its entries, their derivation nodes and all its table pages (back to
    /// the pool). Its root may be cached by any CPU: the backend sees to it that no CPU uses
    /// it again before that CPU invalidates it.
    fn destroy_shadow(&mut self, shadow: ShadowId) -> Result<(), BackendError>;

    /// Installs a shadow leaf mapping the page containing L2 guest-physical `l2_gpa` to
    /// whatever L0 maps at L1 guest-physical `l1_gpa`; the two addresses must have the same
    /// offset within a `max_size` page. The backend walks L0's map of L1 at `l1_gpa`, uses the
    /// smaller of `max_size` and L0's page size (the page of that size containing the two
    /// addresses), `rights` AND L0's rights, and the memory type of
    /// [`shadow_memory_type`]; it replaces whatever the shadow held over that range, and
    /// records the entry as a derivation-tree child of L0's mapping node, so that L0 revoking
    /// or changing that mapping removes exactly this entry.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        shadow: ShadowId,
        l2_gpa: u64,
        l1_gpa: u64,
        max_size: PageSize,
        rights: Rights,
        memtype: MemType,
        ignore_pat: bool,
    ) -> Result<Installed, BackendError>;

    /// Removes every shadow leaf overlapping `[l2_gpa, l2_gpa + size)` (a leaf reaching
    /// beyond the range goes entirely), frees the tables this leaves empty, and makes sure no
    /// CPU keeps using the removed translations.
    fn unmap(&mut self, shadow: ShadowId, l2_gpa: u64, size: PageSize) -> Result<(), BackendError>;

    /// Empties the shadow (as [`Self::unmap`] over everything) and invalidates it (INVEPT).
    fn flush(&mut self, shadow: ShadowId) -> Result<(), BackendError>;

    /// Gives `pages` more pages to the shadow-table pool; returns how many were taken.
    fn donate_table_pages(&mut self, pages: usize) -> Result<usize, BackendError>;

    /// Takes up to `pages` free pages out of the pool; returns how many came back.
    fn reclaim_table_pages(&mut self, pages: usize) -> Result<usize, BackendError>;

    /// Reads L1 guest-physical memory (for the walk of L1's EPT). Fails when L0 does not back
    /// the page (for instance because it was revoked under the reader's feet).
    fn read_l1(&self, l1_gpa: u64) -> Result<u64, MemoryError>;

    /// Reads the eight u64 of the 64-byte line holding `l1_gpa` (prefetching reads a whole
    /// line of L1's table). A backend with a cheaper bulk read overrides this.
    fn read_l1_line(&self, l1_gpa: u64) -> Result<[u64; 8], MemoryError> {
        let line = l1_gpa & !63;
        let mut words = [0; 8];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.read_l1(line + 8 * i as u64)?;
        }
        Ok(words)
    }

    /// Atomically replaces the u64 at L1 guest-physical `l1_gpa` with `new` if it still holds
    /// `expected` (for setting L1's EPT accessed and dirty flags). Returns whether it did.
    fn compare_exchange_l1(
        &mut self,
        l1_gpa: u64,
        expected: u64,
        new: u64,
    ) -> Result<bool, MemoryError>;
}

/// L1 guest-physical memory as seen through a backend, for the walker.
pub struct L1Memory<'a, B: ?Sized>(pub &'a B);

impl<B: ShadowBackend + ?Sized> PhysMemory for L1Memory<'_, B> {
    fn read_u64(&self, address: u64) -> Result<u64, MemoryError> {
        self.0.read_l1(address)
    }
}

/// The memory-type rule for a shadow entry.
///
/// A shadow entry gets the memory type and ignore-PAT bit that L1's EPT entry asks for,
/// except that a page L0 maps uncacheable stays uncacheable: then the entry is UC with
/// ignore-PAT set. Ignore-PAT matters: with PAT consulted, an EPT type of UC combined with a
/// PAT type of WC gives WC (Vol. 3C §29.3.7.2 refers to the MTRR/PAT combination of Vol. 3A
/// §13.5.2.2, where UC with PAT WC is WC), so L2 could otherwise make L0's UC page
/// write-combining. Other L0 types do not override L1's choice: L1 owns the caching policy of
/// memory it was given as cacheable.
pub const fn shadow_memory_type(l1: MemType, l1_ignore_pat: bool, l0: MemType) -> (MemType, bool) {
    match l0 {
        MemType::Uncacheable => (MemType::Uncacheable, true),
        _ => (l1, l1_ignore_pat),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_type_is_l1s_unless_l0_maps_uncacheable() {
        assert_eq!(
            shadow_memory_type(MemType::WriteCombining, false, MemType::WriteBack),
            (MemType::WriteCombining, false)
        );
        assert_eq!(
            shadow_memory_type(MemType::WriteBack, true, MemType::WriteThrough),
            (MemType::WriteBack, true)
        );
        for l1 in [
            MemType::WriteBack,
            MemType::WriteCombining,
            MemType::Uncacheable,
        ] {
            for ipat in [false, true] {
                assert_eq!(
                    shadow_memory_type(l1, ipat, MemType::Uncacheable),
                    (MemType::Uncacheable, true)
                );
            }
        }
    }
}
