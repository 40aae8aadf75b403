//! A cache of L1's EPT table entries for the nested VMM's walks, by 64-byte line.
//!
//! Every L1 EPT entry the shadow engine reads would otherwise be one `EptRead` system call (4
//! per walk, 7 more for prefetching neighbours). The cache keeps the 8-entry line each read
//! falls in, direct-mapped, and serves later reads from it under the rules the architecture
//! gives a processor's paging-structure caches (Vol. 3C §29.4):
//!
//! 1. **Present entries may be stale; absent ones may not.** An entry whose bits 2:0 are set
//!    is served from the line whenever it was fetched, as a processor may use a cached entry
//!    until INVEPT. An entry with bits 2:0 clear is served only from a line fetched during
//!    the current walk ([`TableCache::begin`]); otherwise the line is fetched again, as a
//!    processor never caches a not-present entry: a mapping L1 adds is seen at once, with no
//!    INVEPT, exactly as on hardware.
//! 2. **A fault invalidates what its walk used.** After a walk that ends in a fault reflected
//!    to L1 (or passed to L0), the caller drops the lines it read ([`TableCache::forget_used`]),
//!    as an EPT violation or misconfiguration invalidates the cached translations of its
//!    address.
//! 3. **INVEPT drops everything** ([`TableCache::clear`]), whatever its type: lines are not
//!    tagged by EPT root, and a fresher view is always allowed.
//! 4. **L1 memory changed by others** — the L0 pager revoking a page, the VMM writing into
//!    L1 — drops the lines of that range ([`TableCache::forget_range`]).
//!
//! The caller also learns whether a walk was served any line fetched before it
//! ([`TableCache::used_earlier_lines`]), to repeat with fresh reads a walk that ended in an
//! EPT misconfiguration (a processor never caches a misconfigured entry), in too few rights
//! (L1 may have granted more without INVEPT) or in a pass to L0 (the pager's counts must be
//! exact).

use alloc::vec;
use alloc::vec::Vec;

/// u64 entries in a line.
pub const LINE_WORDS: usize = 8;
const LINE_BYTES: u64 = (LINE_WORDS * 8) as u64;
/// Lines one walk may remember as used; beyond, `forget_used` clears the whole cache.
const USED_MAX: usize = 16;
/// Tag of an empty slot (a line address always has bits 5:0 clear).
const EMPTY: u64 = 1;

#[derive(Clone, Copy)]
struct Line {
    tag: u64,
    /// The walk that fetched it.
    walk: u64,
    words: [u64; LINE_WORDS],
}

/// Hits and misses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

/// A direct-mapped cache of L1 EPT table lines (see the module documentation).
pub struct TableCache {
    lines: Vec<Line>,
    walk: u64,
    used: [u64; USED_MAX],
    used_len: usize,
    used_overflow: bool,
    used_earlier: bool,
    stats: CacheStats,
}

impl core::fmt::Debug for TableCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TableCache")
            .field("lines", &self.lines.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl TableCache {
    /// A cache of `lines` lines (rounded up to a power of two, at least 1).
    pub fn new(lines: usize) -> Self {
        let n = lines.max(1).next_power_of_two();
        Self {
            lines: vec![
                Line {
                    tag: EMPTY,
                    walk: 0,
                    words: [0; LINE_WORDS],
                };
                n
            ],
            walk: 1,
            used: [0; USED_MAX],
            used_len: 0,
            used_overflow: false,
            used_earlier: false,
            stats: CacheStats::default(),
        }
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// The slot of a line: a multiplicative hash of the line number, so that the lines at the
    /// same offset of different table pages (a walk's usual pattern) spread out.
    fn set(&self, line: u64) -> usize {
        let bits = self.lines.len().trailing_zeros();
        if bits == 0 {
            return 0;
        }
        ((line >> 6).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    /// Starts a walk: what it reads is "used", and lines fetched from now on count as fresh.
    pub fn begin(&mut self) {
        self.walk += 1;
        self.used_len = 0;
        self.used_overflow = false;
        self.used_earlier = false;
    }

    fn note_used(&mut self, line: u64, earlier: bool) {
        self.used_earlier |= earlier;
        if self.used[..self.used_len].contains(&line) {
            return;
        }
        if self.used_len < USED_MAX {
            self.used[self.used_len] = line;
            self.used_len += 1;
        } else {
            self.used_overflow = true;
        }
    }

    /// Reads the u64 at `address` (rounded down to 8), from the cache or, under the rules
    /// above, by `fetch`ing its 64-byte line (`fetch(line address, words)`). A failed fetch
    /// caches nothing.
    pub fn read<E>(
        &mut self,
        address: u64,
        fetch: impl FnOnce(u64, &mut [u64; LINE_WORDS]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let line = address & !(LINE_BYTES - 1);
        let index = ((address % LINE_BYTES) / 8) as usize;
        let set = self.set(line);
        let slot = &self.lines[set];
        if slot.tag == line {
            let value = slot.words[index];
            let fresh = slot.walk == self.walk;
            if value & 7 != 0 || fresh {
                self.stats.hits += 1;
                self.note_used(line, !fresh);
                return Ok(value);
            }
        }
        let mut words = [0; LINE_WORDS];
        fetch(line, &mut words)?;
        self.stats.misses += 1;
        self.lines[set] = Line {
            tag: line,
            walk: self.walk,
            words,
        };
        self.note_used(line, false);
        Ok(words[index])
    }

    /// The whole line holding `address`, from the cache or fetched. Not-present entries in it
    /// may be stale (rule 1 does not apply): for prefetching, where a stale not-present entry
    /// only means a neighbour is not prefetched.
    pub fn read_line<E>(
        &mut self,
        address: u64,
        fetch: impl FnOnce(u64, &mut [u64; LINE_WORDS]) -> Result<(), E>,
    ) -> Result<[u64; LINE_WORDS], E> {
        let line = address & !(LINE_BYTES - 1);
        let set = self.set(line);
        if self.lines[set].tag == line {
            self.stats.hits += 1;
            let fresh = self.lines[set].walk == self.walk;
            self.note_used(line, !fresh);
            return Ok(self.lines[set].words);
        }
        let mut words = [0; LINE_WORDS];
        fetch(line, &mut words)?;
        self.stats.misses += 1;
        self.lines[set] = Line {
            tag: line,
            walk: self.walk,
            words,
        };
        self.note_used(line, false);
        Ok(words)
    }

    /// Whether the current walk was served a line fetched before it began.
    pub fn used_earlier_lines(&self) -> bool {
        self.used_earlier
    }

    fn forget_line(&mut self, line: u64) {
        let set = self.set(line);
        if self.lines[set].tag == line {
            self.lines[set].tag = EMPTY;
        }
    }

    /// Drops the lines the current walk read.
    pub fn forget_used(&mut self) {
        if self.used_overflow {
            self.clear();
            return;
        }
        for i in 0..self.used_len {
            self.forget_line(self.used[i]);
        }
        self.used_len = 0;
    }

    /// Drops the lines of `[address, address + length)`.
    pub fn forget_range(&mut self, address: u64, length: u64) {
        let first = address & !(LINE_BYTES - 1);
        let end = address.saturating_add(length);
        if end.saturating_sub(first) / LINE_BYTES >= self.lines.len() as u64 {
            self.clear();
            return;
        }
        let mut line = first;
        while line < end {
            self.forget_line(line);
            line += LINE_BYTES;
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        for line in &mut self.lines {
            line.tag = EMPTY;
        }
        self.used_len = 0;
        self.used_overflow = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// L1 memory: address → u64 (absent words read as 0), and the fetches made.
    struct Memory {
        words: BTreeMap<u64, u64>,
        fetches: RefCell<Vec<u64>>,
    }

    impl Memory {
        fn new() -> Self {
            Self {
                words: BTreeMap::new(),
                fetches: RefCell::new(Vec::new()),
            }
        }

        fn fetch(&self, line: u64, out: &mut [u64; LINE_WORDS]) -> Result<(), ()> {
            if line >= 1 << 40 {
                return Err(());
            }
            self.fetches.borrow_mut().push(line);
            for (i, w) in out.iter_mut().enumerate() {
                *w = self.words.get(&(line + i as u64 * 8)).copied().unwrap_or(0);
            }
            Ok(())
        }

        fn fetched(&self) -> usize {
            self.fetches.borrow().len()
        }
    }

    fn read(c: &mut TableCache, m: &Memory, a: u64) -> u64 {
        c.read(a, |l, w| m.fetch(l, w)).unwrap()
    }

    #[test]
    fn present_entries_are_served_from_a_line_fetched_by_an_earlier_walk() {
        let mut m = Memory::new();
        m.words.insert(0x1000, 0x2007);
        m.words.insert(0x1008, 0x3007);
        let mut c = TableCache::new(64);
        c.begin();
        assert_eq!(read(&mut c, &m, 0x1000), 0x2007);
        assert_eq!(read(&mut c, &m, 0x1008), 0x3007);
        assert_eq!(m.fetched(), 1, "one fetch per line");
        c.begin();
        m.words.insert(0x1000, 0x9007); // L1 remaps without INVEPT
        assert_eq!(read(&mut c, &m, 0x1000), 0x2007, "stale until INVEPT");
        assert!(c.used_earlier_lines());
        c.clear(); // INVEPT
        c.begin();
        assert_eq!(read(&mut c, &m, 0x1000), 0x9007);
        assert!(!c.used_earlier_lines());
    }

    #[test]
    fn an_absent_entry_is_fetched_again_unless_its_line_was_fetched_by_this_walk() {
        let mut m = Memory::new();
        m.words.insert(0x1000, 0x2007);
        let mut c = TableCache::new(64);
        c.begin();
        assert_eq!(read(&mut c, &m, 0x1010), 0);
        assert_eq!(read(&mut c, &m, 0x1018), 0, "same walk: no refetch");
        assert_eq!(m.fetched(), 1);
        m.words.insert(0x1010, 0x5007); // L1 adds a mapping, no INVEPT needed
        c.begin();
        assert_eq!(read(&mut c, &m, 0x1000), 0x2007);
        assert_eq!(m.fetched(), 1);
        assert_eq!(
            read(&mut c, &m, 0x1010),
            0x5007,
            "the new mapping is seen at once"
        );
        assert_eq!(m.fetched(), 2);
    }

    #[test]
    fn forget_used_drops_exactly_the_lines_of_the_walk() {
        let mut m = Memory::new();
        for a in [0x1000u64, 0x2000, 0x3000] {
            m.words.insert(a, a | 7);
        }
        let mut c = TableCache::new(64);
        c.begin();
        read(&mut c, &m, 0x3000);
        c.begin();
        read(&mut c, &m, 0x1000);
        read(&mut c, &m, 0x2000);
        c.forget_used();
        c.begin();
        read(&mut c, &m, 0x3000);
        assert_eq!(m.fetched(), 3, "the other walk's line stays");
        read(&mut c, &m, 0x1000);
        read(&mut c, &m, 0x2000);
        assert_eq!(m.fetched(), 5);
    }

    #[test]
    fn forget_range_drops_the_lines_of_a_page() {
        let mut m = Memory::new();
        m.words.insert(0x1000, 7);
        m.words.insert(0x1ff8, 7);
        m.words.insert(0x2000, 7);
        let mut c = TableCache::new(1024);
        c.begin();
        for a in [0x1000, 0x1ff8, 0x2000] {
            read(&mut c, &m, a);
        }
        c.forget_range(0x1000, 0x1000);
        c.begin();
        for a in [0x1000, 0x1ff8, 0x2000] {
            read(&mut c, &m, a);
        }
        assert_eq!(m.fetched(), 5, "0x2000's line was kept");
        c.forget_range(0, u64::MAX);
        c.begin();
        read(&mut c, &m, 0x2000);
        assert_eq!(m.fetched(), 6);
    }

    #[test]
    fn failed_fetches_cache_nothing_and_colliding_lines_evict_each_other() {
        let m = Memory::new();
        let mut c = TableCache::new(1);
        c.begin();
        assert!(c.read(1 << 41, |l, w| m.fetch(l, w)).is_err());
        let mut m = m;
        m.words.insert(0x40, 7);
        m.words.insert(0x80, 7);
        read(&mut c, &m, 0x40);
        read(&mut c, &m, 0x80);
        c.begin();
        read(&mut c, &m, 0x40);
        assert_eq!(m.fetched(), 3);
        assert_eq!(c.stats(), CacheStats { hits: 0, misses: 3 });
    }

    #[test]
    fn a_walk_reading_many_lines_forgets_them_all() {
        let mut m = Memory::new();
        let mut c = TableCache::new(4096);
        c.begin();
        for i in 0..(USED_MAX as u64 + 4) {
            m.words.insert(i * 64, 7);
            read(&mut c, &m, i * 64);
        }
        c.forget_used();
        c.begin();
        read(&mut c, &m, 0);
        assert_eq!(m.fetched(), USED_MAX + 5);
    }
}
