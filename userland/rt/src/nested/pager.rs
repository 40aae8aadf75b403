//! The L0 pager (`userland/pager`): its slots, its IPC protocol, the pattern of the pages it
//! provides, its bookkeeping of on-demand pages, and the client calls.
//!
//! The pager owns L1's guest-physical memory. It creates L1's EPT object, maps the *backed*
//! region `[0, backed_end)` (zeroed, 2 MiB pages where the memory allows) at start, and maps
//! pages of the *on-demand* region `[backed_end, backed_end + ON_DEMAND_BYTES)` one at a time
//! when asked ([`PROVIDE`]), each filled with [`pattern`] for its generation. [`REVOKE`] unmaps
//! such a page from L1's EPT: the kernel removes with it every entry derived from it — the
//! nested VMM's shadow entries in every shadow EPT — because each was mapped with L1's EPT as
//! its source. The pager knows nothing about shadows.
//!
//! # Slots
//! Started by `roottask::spawn` (slots 0 to 2 as every child), the pager expects before its
//! first request:
//!
//! | pager slot | capability | rights |
//! |---:|---|---|
//! | [`BACKED`] | memory for the backed region: `2^order` pages, its size is `backed_end` | READ, WRITE, EXECUTE, MAP |
//! | [`FRAMES`] | memory for on-demand pages: each provided page takes one of its pages | READ, WRITE, EXECUTE, MAP (pages are mapped into L1 read, write, execute) |
//! | [`POOL`] | memory donated to L1's EPT object for its tables and mapping records (16 pages leave room: 3 tables for the backed region in 2 MiB pages, one per 2 MiB of on-demand memory touched, 64 bytes per mapping) | WRITE, DELEGATE |
//!
//! `spawn` resumes the pager before these slots are filled, so the pager touches them only at
//! its first request: the root task fills them, then calls [`READY`], which the pager answers
//! once L1's EPT is built (zeroing and mapping the backed region takes a while).
//!
//! # Protocol (calls on the pager's service endpoint)
//!
//! | label | request words | reply (label [`OK`]) |
//! |---|---|---|
//! | [`READY`] | — | [backed_end, on_demand_base, on_demand_end, 0] once the backed region is mapped |
//! | [`L1_EPT`] | — (receive slot set) | [backed_end, on_demand_base, on_demand_end, 0] and L1's EPT capability with MAP and MAP_SOURCE |
//! | [`PROVIDE`] | [L1 GPA] | [generation, 1 if mapped now / 0 if it already was, 0, 0] |
//! | [`REVOKE`] | [L1 GPA, 4 KiB aligned] | [generation now, entries removed (derived ones included), 1 if it was provided / 0, 0] |
//! | [`COUNTS`] | — | [pages provided, pages revoked, pages resident, requests refused] |
//!
//! An error is label [`ERROR`] with words [status code, request label, 0, 0]: `OutOfRange`
//! for an address outside the on-demand region, `Unaligned` for an unaligned REVOKE,
//! `OutOfMemory` when [`FRAMES`] is used up, `InvalidArgument` for an unknown label, or the
//! status of the failed system call (also for every request when the pager could not build
//! L1's EPT).
//!
//! A page provided at generation `g` holds, in every u64 at L1 guest-physical address `a`,
//! [`pattern`]`(a, g)`. Revoking a provided page bumps its generation; revoking a page that
//! is not provided changes nothing (reply word 2 is 0).

use crate::sys::{self, Message, Selector};
use crate::utcb;
use abi::Status;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Pager slot: memory for the backed region.
pub const BACKED: u64 = 3;
/// Pager slot: memory for on-demand pages.
pub const FRAMES: u64 = 4;
/// Pager slot: memory for L1's EPT tables (donated).
pub const POOL: u64 = 5;

/// Bytes of the on-demand region, from the end of the backed region (`docs/nested.md`).
pub const ON_DEMAND_BYTES: u64 = 64 << 20;
/// A page.
pub const PAGE: u64 = 4096;

/// Requests.
pub const READY: u16 = 0x5701;
pub const L1_EPT: u16 = 0x5702;
pub const PROVIDE: u16 = 0x5703;
pub const REVOKE: u16 = 0x5704;
pub const COUNTS: u16 = 0x5705;
/// Replies.
pub const OK: u16 = 0x5780;
pub const ERROR: u16 = 0x57ff;

/// The word every u64 of an on-demand page holds (`docs/nested.md`): its L1 guest-physical
/// address `^ 0xa0a0_0000_0000_0000 ^ (generation << 32)`.
pub const fn pattern(l1_gpa: u64, generation: u64) -> u64 {
    l1_gpa ^ 0xa0a0_0000_0000_0000 ^ (generation << 32)
}

/// Word `index` (0 to 511) of the page at `page` (4 KiB aligned) for `generation`.
pub const fn page_word(page: u64, generation: u64, index: usize) -> u64 {
    pattern(page + index as u64 * 8, generation)
}

/// L1's guest-physical layout as the pager serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// End of the backed region (it starts at 0).
    pub backed_end: u64,
    /// The on-demand region: `[on_demand_base, on_demand_end)`.
    pub on_demand_base: u64,
    pub on_demand_end: u64,
}

impl Layout {
    /// The layout for a backed region of `backed_end` bytes.
    pub const fn new(backed_end: u64) -> Self {
        Self {
            backed_end,
            on_demand_base: backed_end,
            on_demand_end: backed_end + ON_DEMAND_BYTES,
        }
    }

    pub const fn words(&self) -> [u64; 4] {
        [self.backed_end, self.on_demand_base, self.on_demand_end, 0]
    }

    /// The layout in a reply's words, if consistent.
    pub const fn from_words(w: [u64; 4]) -> Option<Self> {
        if w[0] <= w[1] && w[1] <= w[2] {
            Some(Self {
                backed_end: w[0],
                on_demand_base: w[1],
                on_demand_end: w[2],
            })
        } else {
            None
        }
    }

    /// Whether `l1_gpa` lies in the on-demand region.
    pub const fn on_demand(&self, l1_gpa: u64) -> bool {
        l1_gpa >= self.on_demand_base && l1_gpa < self.on_demand_end
    }
}

/// The pager's counters ([`COUNTS`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pages mapped by PROVIDE.
    pub provided: u64,
    /// Provided pages unmapped by REVOKE.
    pub revoked: u64,
    /// On-demand pages mapped now.
    pub resident: u64,
    /// Requests answered with [`ERROR`].
    pub refused: u64,
}

impl Counts {
    pub const fn words(&self) -> [u64; 4] {
        [self.provided, self.revoked, self.resident, self.refused]
    }

    pub const fn from_words(w: [u64; 4]) -> Self {
        Self {
            provided: w[0],
            revoked: w[1],
            resident: w[2],
            refused: w[3],
        }
    }
}

/// What PROVIDE must do, decided by [`OnDemand::provide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provide {
    /// The page is mapped already (another vCPU's fault got there first).
    Resident { generation: u64 },
    /// Fill frame `frame` (an index in [`FRAMES`]) with the pattern of `page` for
    /// `generation`, map it at `page`, then [`OnDemand::mapped`] (or
    /// [`OnDemand::not_mapped`] if the map failed).
    Map {
        page: u64,
        frame: u64,
        generation: u64,
    },
}

/// What REVOKE must do, decided by [`OnDemand::revoke`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoke {
    /// Not provided now: nothing to unmap.
    NotResident { generation: u64 },
    /// Unmap `page` from L1's EPT, then [`OnDemand::unmapped`].
    Unmap { page: u64 },
}

#[derive(Clone, Copy, Debug, Default)]
struct Page {
    generation: u64,
    frame: Option<u64>,
}

/// The pager's bookkeeping of the on-demand region: each page's generation and frame, the
/// free frames, the counters. Pure logic; the pager does the system calls it decides.
#[derive(Debug)]
pub struct OnDemand {
    layout: Layout,
    /// Pages ever provided, by L1 guest-physical address.
    pages: BTreeMap<u64, Page>,
    frames: u64,
    next_frame: u64,
    free_frames: Vec<u64>,
    counts: Counts,
}

impl OnDemand {
    /// The on-demand region of `layout`, served from `frames` frames.
    pub fn new(layout: Layout, frames: u64) -> Self {
        Self {
            layout,
            pages: BTreeMap::new(),
            frames,
            next_frame: 0,
            free_frames: Vec::new(),
            counts: Counts::default(),
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Counts a refused request.
    pub fn refused(&mut self) {
        self.counts.refused += 1;
    }

    /// The page's generation (0 for a page never revoked).
    pub fn generation(&self, l1_gpa: u64) -> u64 {
        self.pages
            .get(&(l1_gpa & !(PAGE - 1)))
            .map_or(0, |p| p.generation)
    }

    fn page_of(&self, l1_gpa: u64) -> Result<u64, Status> {
        if self.layout.on_demand(l1_gpa) {
            Ok(l1_gpa & !(PAGE - 1))
        } else {
            Err(Status::OutOfRange)
        }
    }

    /// PROVIDE for the page holding `l1_gpa`: takes a free frame when the page must be
    /// mapped.
    pub fn provide(&mut self, l1_gpa: u64) -> Result<Provide, Status> {
        let page = self.page_of(l1_gpa)?;
        let state = self.pages.get(&page).copied().unwrap_or_default();
        if state.frame.is_some() {
            return Ok(Provide::Resident {
                generation: state.generation,
            });
        }
        let frame = match self.free_frames.pop() {
            Some(f) => f,
            None if self.next_frame < self.frames => {
                self.next_frame += 1;
                self.next_frame - 1
            }
            None => return Err(Status::OutOfMemory),
        };
        Ok(Provide::Map {
            page,
            frame,
            generation: state.generation,
        })
    }

    /// The frame [`Provide::Map`] named is mapped at `page`.
    pub fn mapped(&mut self, page: u64, frame: u64) {
        let p = self.pages.entry(page).or_default();
        p.frame = Some(frame);
        self.counts.provided += 1;
        self.counts.resident += 1;
    }

    /// Mapping the frame [`Provide::Map`] named failed: the frame is free again.
    pub fn not_mapped(&mut self, frame: u64) {
        self.free_frames.push(frame);
    }

    /// REVOKE of the page at `l1_gpa` (4 KiB aligned).
    pub fn revoke(&self, l1_gpa: u64) -> Result<Revoke, Status> {
        if !l1_gpa.is_multiple_of(PAGE) {
            return Err(Status::Unaligned);
        }
        let page = self.page_of(l1_gpa)?;
        let state = self.pages.get(&page).copied().unwrap_or_default();
        Ok(match state.frame {
            Some(_) => Revoke::Unmap { page },
            None => Revoke::NotResident {
                generation: state.generation,
            },
        })
    }

    /// The page [`Revoke::Unmap`] named is gone from L1's EPT: its frame is free, its next
    /// provision is the next generation. Returns that generation.
    pub fn unmapped(&mut self, page: u64) -> u64 {
        let Some(p) = self.pages.get_mut(&page) else {
            return 0;
        };
        if let Some(frame) = p.frame.take() {
            self.free_frames.push(frame);
            p.generation += 1;
            self.counts.revoked += 1;
            self.counts.resident -= 1;
        }
        p.generation
    }
}

// ---- Client calls (the nested VMM, the root task) ----

/// A reply's words, or the status of an [`ERROR`] reply.
fn answer(reply: Message) -> Result<[u64; 4], Status> {
    match reply.label() {
        OK => Ok(reply.words),
        ERROR => Err(Status::from_code(reply.words[0]).unwrap_or(Status::Inconsistent)),
        _ => Err(Status::Inconsistent),
    }
}

/// Calls `pager` with `label` and `words`.
pub fn request(pager: Selector, label: u16, words: [u64; 4]) -> Result<[u64; 4], Status> {
    answer(sys::call(pager, &Message::new(label, words))?)
}

/// Waits until the pager has built L1's EPT; returns the layout.
pub fn ready(pager: Selector) -> Result<Layout, Status> {
    Layout::from_words(request(pager, READY, [0; 4])?).ok_or(Status::Inconsistent)
}

/// Asks for L1's EPT capability (MAP, MAP_SOURCE) into the caller's empty slot `dest`; returns
/// the layout. `Inconsistent` if no capability arrived.
pub fn fetch_l1_ept(pager: Selector, dest: Selector) -> Result<Layout, Status> {
    let previous = utcb::receive_slot();
    utcb::set_receive_slot(dest);
    let reply = sys::call(pager, &Message::new(L1_EPT, [0; 4]));
    utcb::set_receive_slot(previous);
    let reply = reply?;
    let arrived = reply.info.transfers_capability() && u64::from(reply.info.selector()) == dest;
    let layout = Layout::from_words(answer(reply)?).ok_or(Status::Inconsistent)?;
    if arrived {
        Ok(layout)
    } else {
        Err(Status::Inconsistent)
    }
}

/// PROVIDE: returns (generation, whether the pager mapped the page now).
pub fn provide(pager: Selector, l1_gpa: u64) -> Result<(u64, bool), Status> {
    let w = request(pager, PROVIDE, [l1_gpa, 0, 0, 0])?;
    Ok((w[0], w[1] != 0))
}

/// What REVOKE did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The page's generation now (the next provision's).
    pub generation: u64,
    /// Entries the kernel removed: L1's and every derived (shadow) entry.
    pub entries_removed: u64,
    /// Whether the page was provided.
    pub was_resident: bool,
}

/// REVOKE of the on-demand page at `l1_gpa` (4 KiB aligned).
pub fn revoke(pager: Selector, l1_gpa: u64) -> Result<Revoked, Status> {
    let w = request(pager, REVOKE, [l1_gpa, 0, 0, 0])?;
    Ok(Revoked {
        generation: w[0],
        entries_removed: w[1],
        was_resident: w[2] != 0,
    })
}

/// COUNTS.
pub fn counts(pager: Selector) -> Result<Counts, Status> {
    Ok(Counts::from_words(request(pager, COUNTS, [0; 4])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn region() -> OnDemand {
        OnDemand::new(Layout::new(64 * MIB), 3)
    }

    #[test]
    fn pattern_is_the_one_docs_nested_md_gives() {
        assert_eq!(pattern(0x400_0000, 0), 0xa0a0_0000_0400_0000);
        assert_eq!(pattern(0x400_0008, 1), 0xa0a0_0001_0400_0008);
        assert_eq!(
            page_word(0x400_1000, 2, 511),
            0x400_1ff8 ^ 0xa0a0_0002_0000_0000
        );
    }

    #[test]
    fn layout_puts_64_mib_of_on_demand_memory_after_the_backed_region() {
        let l = Layout::new(64 * MIB);
        assert_eq!((l.on_demand_base, l.on_demand_end), (64 * MIB, 128 * MIB));
        assert!(!l.on_demand(64 * MIB - 1));
        assert!(l.on_demand(64 * MIB));
        assert!(!l.on_demand(128 * MIB));
        assert_eq!(Layout::from_words(l.words()), Some(l));
        assert_eq!(Layout::from_words([3, 2, 1, 0]), None);
    }

    #[test]
    fn provide_maps_each_page_once_with_its_generation() {
        let mut d = region();
        let Ok(Provide::Map {
            page,
            frame,
            generation: 0,
        }) = d.provide(64 * MIB + 0x1234)
        else {
            panic!("first touch maps");
        };
        assert_eq!(page, 64 * MIB + 0x1000);
        d.mapped(page, frame);
        assert_eq!(d.provide(page + 8), Ok(Provide::Resident { generation: 0 }));
        assert_eq!(d.counts().provided, 1);
        assert_eq!(d.counts().resident, 1);
    }

    #[test]
    fn revoke_frees_the_frame_and_the_next_provision_is_the_next_generation() {
        let mut d = region();
        let Ok(Provide::Map { page, frame, .. }) = d.provide(100 * MIB) else {
            panic!()
        };
        d.mapped(page, frame);
        assert_eq!(d.revoke(page), Ok(Revoke::Unmap { page }));
        assert_eq!(d.unmapped(page), 1);
        assert_eq!(d.generation(page + 0x10), 1);
        assert_eq!(d.revoke(page), Ok(Revoke::NotResident { generation: 1 }));
        let Ok(Provide::Map {
            frame: again,
            generation: 1,
            ..
        }) = d.provide(page)
        else {
            panic!("provided again at generation 1");
        };
        assert_eq!(again, frame, "the freed frame is reused");
        d.mapped(page, again);
        let c = d.counts();
        assert_eq!((c.provided, c.revoked, c.resident), (2, 1, 1));
    }

    #[test]
    fn requests_outside_the_region_unaligned_or_beyond_the_frames_are_refused() {
        let mut d = region();
        assert_eq!(d.provide(64 * MIB - 8), Err(Status::OutOfRange));
        assert_eq!(d.provide(128 * MIB), Err(Status::OutOfRange));
        assert_eq!(d.provide(u64::MAX), Err(Status::OutOfRange));
        assert_eq!(d.revoke(64 * MIB + 8), Err(Status::Unaligned));
        assert_eq!(d.revoke(0), Err(Status::OutOfRange));
        for i in 0..3 {
            let Ok(Provide::Map { page, frame, .. }) = d.provide(64 * MIB + i * PAGE) else {
                panic!()
            };
            d.mapped(page, frame);
        }
        assert_eq!(d.provide(64 * MIB + 3 * PAGE), Err(Status::OutOfMemory));
        // A failed map gives its frame back.
        assert_eq!(d.unmapped(64 * MIB), 1);
        let Ok(Provide::Map { frame, .. }) = d.provide(64 * MIB + 3 * PAGE) else {
            panic!()
        };
        d.not_mapped(frame);
        assert!(matches!(
            d.provide(64 * MIB + 4 * PAGE),
            Ok(Provide::Map { .. })
        ));
    }

    #[test]
    fn unmapped_of_an_unknown_page_changes_nothing() {
        let mut d = region();
        assert_eq!(d.unmapped(70 * MIB), 0);
        assert_eq!(d.counts(), Counts::default());
    }
}
