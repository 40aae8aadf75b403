//! The L0 pager: owns an L1 hypervisor's guest-physical memory and serves the nested VMM.
//!
//! At its first request (the root task's `READY`, once it has filled the pager's slots) the
//! pager creates L1's EPT object over the donated [`POOL`], zeroes the [`BACKED`] memory and
//! maps it at L1 guest-physical 0 (read, write, execute, write-back, 2 MiB pages where the
//! memory allows). Then it answers, on its service endpoint, the protocol of
//! `rt::nested::pager` (slots, labels and words are documented there):
//!
//! - `L1_EPT`: a copy of L1's EPT capability with MAP and MAP_SOURCE, transferred in the
//!   reply, so that the VMM can create L1's vCPUs on it, derive shadow entries from it
//!   (`EptMap` with it as the source) and read and write L1 memory (`EptRead`, `EptWrite`:
//!   this is how the VMM loads L1's image and builds its boot state in the zeroed backed
//!   region; the pager never interprets L1's memory);
//! - `PROVIDE`: fill a free frame of [`FRAMES`] with the pattern of the on-demand page and
//!   its generation, map it into L1's EPT at that page;
//! - `REVOKE`: `EptUnmap` the page from L1's EPT. The kernel removes every entry derived from
//!   that mapping with it — the nested VMM's shadow entries, in every shadow EPT — and
//!   invalidates the CPUs that may cache them. Nothing here knows that shadows exist. The
//!   page's generation goes up; its frame is refilled before it is mapped again, so nothing
//!   ever reads the old contents;
//! - `COUNTS`: the counters.
//!
//! - [`window`]: the pager's own mappings of the memory it fills (the only `unsafe`).
#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

#[allow(unsafe_code)]
mod window;

use abi::{EptRights, ObjectKind, Status};
use ept::entry::{MemType, PageSize, Rights};
use rt::layout::{CHILD_SERVICE_ENDPOINT, SELF_PD};
use rt::nested::map_flags;
use rt::nested::pager::{
    BACKED, COUNTS, ERROR, FRAMES, L1_EPT, Layout, OK, OnDemand, POOL, PROVIDE, Provide, READY,
    REVOKE, Revoke, page_word,
};
use rt::vmx;
use rt::{Message, Selector, sys};
use window::{BACKED_WINDOW, FRAMES_WINDOW, Window};

rt::entry!(main, rt::Role::Child);

/// The pager's own slots (from `rt::layout::CHILD_FIRST_FREE`).
pub mod slot {
    /// L1's EPT object (all rights).
    pub const L1_EPT: u64 = 16;
    /// The copy (MAP, MAP_SOURCE) whose children the VMM receives.
    pub const L1_EPT_SHARED: u64 = 17;
}

/// Mappings into L1's EPT: readable, writable, executable, write-back.
const fn l1_flags(size: PageSize) -> u64 {
    map_flags(Rights::RWX, size, MemType::WriteBack, false)
}

/// A pager that built L1's EPT.
struct Pager {
    on_demand: OnDemand,
    frames: Window,
}

/// What to send back.
struct Answer {
    message: Message,
    /// Transfer L1's EPT (MAP, MAP_SOURCE) with the reply.
    with_ept: bool,
}

impl Answer {
    fn ok(words: [u64; 4]) -> Self {
        Self {
            message: Message::new(OK, words),
            with_ept: false,
        }
    }

    fn error(status: Status, label: u16) -> Self {
        Self {
            message: Message::new(ERROR, [status.code(), u64::from(label), 0, 0]),
            with_ept: false,
        }
    }
}

fn main() {
    let mut pager: Option<Result<Pager, Status>> = None;
    let mut next = sys::recv(CHILD_SERVICE_ENDPOINT);
    loop {
        let request = match next {
            Ok(msg) => msg,
            Err(e) => {
                log::error!("receiving on the service endpoint: {e:?}");
                return;
            }
        };
        let state = pager.get_or_insert_with(|| {
            let built = Pager::build();
            if let Err(e) = &built {
                log::error!("cannot build L1's EPT: {e:?}; every request will fail with it");
            }
            built
        });
        let answer = match state {
            Ok(p) => p.handle(&request),
            Err(e) => Answer::error(*e, request.label()),
        };
        next = if answer.with_ept {
            // `ReplyRecv` would need GRANT on the service endpoint (RECEIVE only): a plain
            // `Reply` may transfer, then wait again.
            let msg = answer.message.with_capability(slot::L1_EPT_SHARED);
            if let Err(e) = sys::reply(&msg) {
                log::warn!("reply with L1's EPT failed: {e:?}");
            }
            sys::recv(CHILD_SERVICE_ENDPOINT)
        } else {
            sys::reply_recv(CHILD_SERVICE_ENDPOINT, &answer.message)
        };
    }
}

/// The order (log2 of 4 KiB pages) of the memory capability in `selector`, which needs the
/// `rights` bits.
fn memory_order(selector: Selector, rights: u32) -> Result<u64, Status> {
    let info = sys::cap_info(selector)?;
    if info.kind() != Some(ObjectKind::Memory) {
        return Err(Status::WrongType);
    }
    if info.rights & rights != rights {
        return Err(Status::InsufficientRights);
    }
    if info.detail > window::MAX_ORDER {
        return Err(Status::OutOfRange);
    }
    Ok(info.detail)
}

/// `EptUnmapRange` on L1's EPT refuses bad ranges with the statuses docs/abi.md gives and
/// removes nothing from a range that holds nothing (`unused`: the first address above
/// everything the pager maps).
fn check_unmap_range(unused: u64) -> Result<(), Status> {
    let top = 1u64 << 48;
    let cases: [(&str, u64, u64, Result<u64, Status>); 5] = [
        ("unaligned start", unused + 8, 4096, Err(Status::Unaligned)),
        ("unaligned length", unused, 100, Err(Status::Unaligned)),
        ("empty range", unused, 0, Err(Status::OutOfRange)),
        ("past 2^48", top - 4096, 8192, Err(Status::OutOfRange)),
        ("nothing mapped", unused, top - unused, Ok(0)),
    ];
    for (what, gpa, length, expected) in cases {
        let got = vmx::ept_unmap_range(slot::L1_EPT, gpa, length);
        if got != expected {
            log::error!("EptUnmapRange, {what}: {got:?}, expected {expected:?}");
            return Err(Status::Inconsistent);
        }
    }
    Ok(())
}

impl Pager {
    /// Creates L1's EPT, zeroes and maps the backed region, maps the frames for on-demand
    /// pages into the pager, and makes the copy of L1's EPT the VMM gets.
    fn build() -> Result<Self, Status> {
        use abi::MemoryRights as M;
        let all = (M::READ | M::WRITE | M::EXECUTE | M::MAP).bits();
        let backed_order = memory_order(BACKED, all)?;
        let frames_order = memory_order(FRAMES, (M::READ | M::WRITE | M::MAP).bits())?;
        vmx::ept_create(SELF_PD, slot::L1_EPT, POOL)?;

        let backed = Window::map(BACKED, backed_order, BACKED_WINDOW)?;
        backed.zero();
        let (size, step) = if backed_order >= abi::ORDER_2M {
            (PageSize::Size2M, 1u64 << abi::ORDER_2M)
        } else {
            (PageSize::Size4K, 1)
        };
        let mut page = 0;
        while page < backed.pages() {
            vmx::ept_map(slot::L1_EPT, BACKED, page, page * 4096, l1_flags(size))?;
            page += step;
        }
        let layout = Layout::new(backed.pages() * 4096);
        check_unmap_range(layout.on_demand_end)?;

        let frames = Window::map(FRAMES, frames_order, FRAMES_WINDOW)?;
        let shared = (EptRights::MAP | EptRights::MAP_SOURCE).bits();
        sys::cap_delegate(slot::L1_EPT, SELF_PD, slot::L1_EPT_SHARED, shared)?;
        log::info!(
            "L1's EPT: {} MiB backed from 0 ({:?} pages), on demand {:#x}..{:#x} from {} frames",
            layout.backed_end >> 20,
            size,
            layout.on_demand_base,
            layout.on_demand_end,
            frames.pages()
        );
        Ok(Self {
            on_demand: OnDemand::new(layout, frames.pages()),
            frames,
        })
    }

    fn handle(&mut self, request: &Message) -> Answer {
        let label = request.label();
        let result = match label {
            READY => Ok(Answer::ok(self.on_demand.layout().words())),
            L1_EPT => Ok(Answer {
                message: Message::new(OK, self.on_demand.layout().words()),
                with_ept: true,
            }),
            PROVIDE => self.provide(request.words[0]).map(Answer::ok),
            REVOKE => self.revoke(request.words[0]).map(Answer::ok),
            COUNTS => Ok(Answer::ok(self.on_demand.counts().words())),
            _ => Err(Status::InvalidArgument),
        };
        result.unwrap_or_else(|status| {
            log::debug!("request {label:#x} {:#x}: {status:?}", request.words[0]);
            self.on_demand.refused();
            Answer::error(status, label)
        })
    }

    /// PROVIDE: [generation, mapped now].
    fn provide(&mut self, l1_gpa: u64) -> Result<[u64; 4], Status> {
        match self.on_demand.provide(l1_gpa)? {
            Provide::Resident { generation } => Ok([generation, 0, 0, 0]),
            Provide::Map {
                page,
                frame,
                generation,
            } => {
                self.frames.fill(frame, |i| page_word(page, generation, i));
                let flags = l1_flags(PageSize::Size4K);
                if let Err(e) = vmx::ept_map(slot::L1_EPT, FRAMES, frame, page, flags) {
                    self.on_demand.not_mapped(frame);
                    return Err(e);
                }
                self.on_demand.mapped(page, frame);
                log::debug!("provided {page:#x} (generation {generation}, frame {frame})");
                Ok([generation, 1, 0, 0])
            }
        }
    }

    /// REVOKE: [generation now, entries removed, was resident].
    fn revoke(&mut self, l1_gpa: u64) -> Result<[u64; 4], Status> {
        match self.on_demand.revoke(l1_gpa)? {
            Revoke::NotResident { generation } => Ok([generation, 0, 0, 0]),
            Revoke::Unmap { page } => {
                // Only the pager holds UNMAP on L1's EPT, so the page is mapped; were it not,
                // it is gone all the same.
                let removed = match vmx::ept_unmap(slot::L1_EPT, page, abi::ORDER_4K) {
                    Ok(n) => n,
                    Err(Status::NotMapped) => 0,
                    Err(e) => return Err(e),
                };
                let generation = self.on_demand.unmapped(page);
                log::debug!("revoked {page:#x}: {removed} entries (generation now {generation})");
                Ok([generation, removed, 1, 0])
            }
        }
    }
}
