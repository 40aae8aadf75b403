//! The VMM server: runs 64-bit guests on vCPU and EPT capabilities, every VM exit arriving as
//! an IPC call on its exit endpoint.
//!
//! The root task starts it as a boot module and fills its slots (`rt::vmx::protocol`): guest
//! RAM, memory for EPT pools, the guest image, the endpoint to report on. Then each `RUN`
//! request on the service endpoint builds a guest ([`guest::Guest::start`]: an EPT object over
//! a donated pool piece, a protection domain for its vCPUs, page tables, GDT, initial state),
//! answers at once, handles the guest's exits until it ends ([`guest::Guest::run`]), takes its
//! memory back ([`guest::Guest::teardown`]) and reports the outcome to the root task. One guest
//! runs at a time.
//!
//! - [`guest`]: a guest's construction, exit loop and teardown;
//! - [`devices`]: what the exits emulate (CPUID, the 16550, the debug and result ports, MSRs);
//! - [`memory`]: the windows on guest RAM and the guest image (the only `unsafe`).
//! - [`l1`]: a nested guest (`protocol::FLAG_NESTED`): an L1 hypervisor, its memory from the L0
//!   pager, its VMX emulated (`vcpu::nested`), its L2 guests on shadow EPTs;
//! - [`shadow`]: nested VMX's shadow EPTs (the system-call `ShadowBackend` and `Nested`).
#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

mod devices;
mod guest;
mod l1;
#[allow(unsafe_code)]
mod memory;
// Nested VMX: some of its API (pool growth, statistics) is not used by `l1` yet.
#[allow(dead_code)]
mod shadow;

use abi::Status;
use guest::{Guest, Report, Request};
use l1::L1Guest;
use memory::{Image, Ram};
use rt::layout::{CHILD_SERVICE_ENDPOINT, SELF_PD};
use rt::vmx::protocol::{IMAGE, RAM, RAM_ORDER, REPORT, REPORT_LABEL, RUN, RUN_ERROR, RUN_OK};
use rt::{Message, sys, utcb};

rt::entry!(main, rt::Role::Child);

/// The VMM's own slots (from `rt::layout::CHILD_FIRST_FREE`).
pub mod slot {
    /// The endpoint every vCPU sends its exits to.
    pub const EXIT_ENDPOINT: u64 = 16;
    /// The running guest's EPT object.
    pub const EPT: u64 = 17;
    /// A piece of the pool being donated (empty again once donated).
    pub const POOL_PIECE: u64 = 18;
    /// The running guest's protection domain, which its vCPUs belong to.
    pub const GUEST_PD: u64 = 19;
    /// A nested guest's EPT (L1's, a copy from the pager with MAP and MAP_SOURCE).
    pub const L1_EPT: u64 = 20;
    /// A nested guest's piece of `protocol::SHADOW_POOL`.
    pub const SHADOW_PIECE: u64 = 21;
    /// The running guest's vCPUs (a nested guest's L1 vCPU objects).
    pub const FIRST_VCPU: u64 = 24;
    /// A nested guest's L2 vCPU objects.
    pub const FIRST_L2_VCPU: u64 = 32;
    /// Slots for a nested guest's shadow EPT objects and pool pieces.
    pub const SHADOWS: core::ops::Range<u64> = 64..1024;
}

/// What the VMM keeps between guests.
struct Vmm {
    /// Guest RAM, mapped on the first request.
    ram: Option<Ram>,
    /// The guest image, mapped on the first request.
    image: Option<Image>,
    /// Pool pieces donated so far.
    pool_pieces: u64,
    /// Guests started so far (the next guest's number).
    guests: u64,
    /// Pieces of `protocol::SHADOW_POOL` given to nested guests so far.
    shadow_pieces: u64,
}

/// A started guest of either kind.
enum Started {
    Plain(Guest),
    Nested(L1Guest),
}

fn main() {
    if let Err(e) = sys::endpoint_create(SELF_PD, slot::EXIT_ENDPOINT) {
        log::error!("cannot create the exit endpoint: {e:?}");
        return;
    }
    let mut vmm = Vmm {
        ram: None,
        image: None,
        pool_pieces: 0,
        guests: 0,
        shadow_pieces: 0,
    };
    let mut next = sys::recv(CHILD_SERVICE_ENDPOINT);
    loop {
        let request = match next {
            Ok(msg) => msg,
            Err(e) => {
                log::error!("receiving on the service endpoint: {e:?}");
                return;
            }
        };
        if request.label() != RUN {
            next = sys::reply_recv(
                CHILD_SERVICE_ENDPOINT,
                &Message::new(RUN_ERROR, [Status::InvalidArgument.code(), 0, 0, 0]),
            );
            continue;
        }
        let number = vmm.guests;
        vmm.guests += 1;
        let guest = match vmm.start(number, &request) {
            Ok(guest) => guest,
            Err(e) => {
                log::error!("guest{number}: not started: {e:?}");
                next = sys::reply_recv(
                    CHILD_SERVICE_ENDPOINT,
                    &Message::new(RUN_ERROR, [e.code(), number, 0, 0]),
                );
                continue;
            }
        };
        if sys::reply(&Message::new(RUN_OK, [number, 0, 0, 0])).is_err() {
            log::warn!("guest{number}: the root task did not wait for the answer");
        }
        let report = vmm.run(guest);
        utcb::write_words(&report.extra);
        let msg = Message::with_extra(REPORT_LABEL, report.words, report.extra.len());
        if let Err(e) = sys::call(REPORT, &msg) {
            log::error!("guest{number}: cannot report: {e:?}");
        }
        next = sys::recv(CHILD_SERVICE_ENDPOINT);
    }
}

impl Vmm {
    /// Builds guest `number` from a RUN request; maps RAM (plain guests) and the image on
    /// first use.
    fn start(&mut self, number: u64, msg: &Message) -> Result<Started, Status> {
        let request = Request::decode(msg)?;
        if self.image.is_none() {
            self.image = Some(Image::map(IMAGE, request.image_size)?);
        }
        let image = self.image.expect("mapped above");
        if request.image_size > image.bytes().len() as u64 {
            return Err(Status::OutOfRange);
        }
        if request.nested {
            return L1Guest::start(number, request, image, &mut self.shadow_pieces)
                .map(Started::Nested);
        }
        if self.ram.is_none() {
            self.ram = Some(Ram::map(RAM, RAM_ORDER)?);
        }
        let ram = self.ram.as_mut().expect("mapped above");
        Guest::start(number, request, image, ram, &mut self.pool_pieces).map(Started::Plain)
    }

    /// Runs a started guest to its end and takes it down: the report for the root task.
    fn run(&mut self, guest: Started) -> Report {
        match guest {
            Started::Plain(mut guest) => {
                let ram = self.ram.as_mut().expect("a started plain guest has RAM");
                let report = guest.run(ram, &mut self.pool_pieces);
                guest.teardown(ram, report)
            }
            Started::Nested(mut guest) => {
                let report = guest.run();
                guest.teardown(report)
            }
        }
    }
}
