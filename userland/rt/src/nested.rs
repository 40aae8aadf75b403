//! What the nested VMM and the L0 pager share: guest memory reached through an EPT object
//! (`EptRead`, `EptWrite`), the `EptMap` flags and results in `ept` types, and the L0 pager's
//! protocol.
//!
//! - [`ept_read`], [`ept_write`]: the two calls of `docs/abi.md` ("EPT objects") that copy
//!   guest-physical memory through the caller's UTCB;
//! - [`map_flags`], [`Mapped::decode`]: `EptMap`'s flag word and results, from and to
//!   [`ept::entry`] types;
//! - [`TableCache`]: L1's EPT table entries cached by line, under the architecture's rules for
//!   paging-structure caches;
//! - [`pager`]: the L0 pager's protocol, page pattern and bookkeeping.

use crate::sys::{Result, Selector, status_of};
use crate::syscall::syscall;
use crate::utcb;
use abi::{Status, Syscall, UTCB_WORDS};
use ept::entry::{MemType, PageSize, Rights};

pub mod pager;
mod table_cache;

pub use table_cache::{CacheStats, LINE_WORDS, TableCache};

#[inline(always)]
fn invoke(call: Syscall, args: [u64; 6]) -> Result<[u64; 6]> {
    let r = syscall(call as u64, args);
    if r.status == Status::Ok.code() {
        Ok(r.results)
    } else {
        Err(status_of(r.status))
    }
}

/// Most words one `EptRead` or `EptWrite` moves (the UTCB's extra words).
pub const MAX_WORDS: usize = UTCB_WORDS;

/// `EptRead`: reads `out.len()` (1 to [`MAX_WORDS`]) u64s of guest-physical memory from `gpa`
/// (8-byte aligned) through `ept` (MAP_SOURCE), as the guest would see them. `NotBacked` when
/// the EPT does not map a page of the range readable; `out` is then left unchanged.
pub fn ept_read(ept: Selector, gpa: u64, out: &mut [u64]) -> Result<()> {
    if out.is_empty() || out.len() > MAX_WORDS {
        return Err(Status::InvalidArgument);
    }
    invoke(Syscall::EptRead, [ept, gpa, out.len() as u64, 0, 0, 0])?;
    utcb::read_words(out);
    Ok(())
}

/// `EptWrite`: writes `words` (1 to [`MAX_WORDS`]) to guest-physical memory from `gpa`
/// (8-byte aligned) through `ept` (MAP). `NotBacked` when the EPT does not map a page of the
/// range writable (the pages before it were written).
pub fn ept_write(ept: Selector, gpa: u64, words: &[u64]) -> Result<()> {
    if words.is_empty() || words.len() > MAX_WORDS {
        return Err(Status::InvalidArgument);
    }
    utcb::write_words(words);
    invoke(Syscall::EptWrite, [ept, gpa, words.len() as u64, 0, 0, 0]).map(|_| ())
}

/// The `EptMap` order of a page size (log2 of its 4 KiB pages).
pub const fn order_of(size: PageSize) -> u64 {
    (size.shift() - 12) as u64
}

/// The page size of an `EptMap` or `EptUnmap` order.
pub const fn size_of_order(order: u64) -> Option<PageSize> {
    match order {
        abi::ORDER_4K => Some(PageSize::Size4K),
        abi::ORDER_2M => Some(PageSize::Size2M),
        abi::ORDER_1G => Some(PageSize::Size1G),
        _ => None,
    }
}

/// `EptMap`'s flag word (`abi::ept_map_flags`): `rights` (R, W, X; other bits dropped), the
/// order of `size`, `memtype`, ignore-PAT.
pub const fn map_flags(rights: Rights, size: PageSize, memtype: MemType, ignore_pat: bool) -> u64 {
    abi::ept_map_flags(
        rights.intersection(Rights::RWX).bits(),
        order_of(size),
        memtype as u8,
        ignore_pat,
    )
}

/// What `EptMap` mapped, after the kernel's clamping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub size: PageSize,
    pub rights: Rights,
    pub memtype: MemType,
}

impl Mapped {
    /// Decodes `EptMap`'s results r0 (order), r1 (rights bits), r2 (memory type). `None` for
    /// values the ABI does not define (a kernel bug, not a guest's doing).
    pub const fn decode(order: u64, rights: u64, memtype: u64) -> Option<Self> {
        let Some(size) = size_of_order(order) else {
            return None;
        };
        if rights & !7 != 0 || memtype > 7 {
            return None;
        }
        let Some(memtype) = MemType::from_bits(memtype as u8) else {
            return None;
        };
        Some(Self {
            size,
            rights: Rights::from_bits_truncate(rights as u8),
            memtype,
        })
    }

    /// The ignore-PAT bit the kernel wrote, given what was asked: the kernel keeps the
    /// caller's bit, except that a page the source maps uncacheable becomes UC with ignore-PAT
    /// (`docs/abi.md`, "`EptMap` flags"). A UC result for a non-UC request means that; a UC
    /// request answered UC keeps the caller's bit as far as the results tell.
    pub const fn ignore_pat(&self, asked: MemType, asked_ignore_pat: bool) -> bool {
        asked_ignore_pat
            || (matches!(self.memtype, MemType::Uncacheable)
                && !matches!(asked, MemType::Uncacheable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_flags_match_the_abi_encoding() {
        let f = map_flags(
            Rights::READ | Rights::EXECUTE | Rights::USER,
            PageSize::Size2M,
            MemType::WriteBack,
            true,
        );
        assert_eq!(f, 0b101 | (9 << 8) | (6 << 16) | (1 << 19));
        assert_eq!(
            map_flags(Rights::RWX, PageSize::Size1G, MemType::Uncacheable, false),
            7 | (18 << 8)
        );
        assert_eq!(
            map_flags(
                Rights::WRITE,
                PageSize::Size4K,
                MemType::WriteCombining,
                false
            ),
            2 | (1 << 16)
        );
    }

    #[test]
    fn orders_and_sizes_round_trip() {
        for size in PageSize::DESCENDING {
            assert_eq!(size_of_order(order_of(size)), Some(size));
        }
        assert_eq!(size_of_order(1), None);
        assert_eq!(size_of_order(27), None);
    }

    #[test]
    fn mapped_decodes_kernel_results_and_refuses_undefined_values() {
        assert_eq!(
            Mapped::decode(0, 3, 6),
            Some(Mapped {
                size: PageSize::Size4K,
                rights: Rights::READ | Rights::WRITE,
                memtype: MemType::WriteBack,
            })
        );
        assert_eq!(
            Mapped::decode(9, 7, 0).map(|m| m.size),
            Some(PageSize::Size2M)
        );
        assert_eq!(Mapped::decode(8, 7, 6), None);
        assert_eq!(Mapped::decode(0, 8, 6), None);
        assert_eq!(Mapped::decode(0, 7, 2), None);
        assert_eq!(Mapped::decode(0, 7, 1 << 40), None);
    }

    #[test]
    fn ignore_pat_is_forced_only_by_an_uncacheable_source() {
        let uc = Mapped::decode(0, 7, 0).unwrap();
        let wb = Mapped::decode(0, 7, 6).unwrap();
        assert!(uc.ignore_pat(MemType::WriteBack, false));
        assert!(!uc.ignore_pat(MemType::Uncacheable, false));
        assert!(!wb.ignore_pat(MemType::WriteBack, false));
        assert!(wb.ignore_pat(MemType::WriteBack, true));
    }
}
