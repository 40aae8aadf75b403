//! The echo server: answers calls on its service endpoint by label (`rt::protocol`).
//!
//! Started by the root task with the child slot layout of `rt::layout`: its PD at 0, its thread
//! at 1, the service endpoint (RECEIVE) at 2. A transferred capability lands in slot
//! `ECHO_RECEIVE_SLOT`.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

use abi::Status;
use rt::layout::CHILD_SERVICE_ENDPOINT as ENDPOINT;
use rt::protocol::{
    BENCH, ECHO, ECHO_RECEIVE_SLOT, ERROR, IO_PROBE, LAST_SUM, MAP_AND_SUM, READ_AGAIN, SSE,
    SUM_UTCB,
};
use rt::sys::{self, MapRights};
use rt::{Mapping, Message, utcb};

rt::entry!(main, rt::Role::Child);

/// What the server keeps between calls.
struct Server {
    /// The page of the last capability received, mapped read-only.
    mapping: Option<Mapping>,
    /// The sum computed by the last `READ_AGAIN`.
    last_sum: u64,
}

/// What to do after answering a call.
enum Then {
    /// Wait for the next call (`ReplyRecv`).
    Receive,
    /// Reply first, then read the mapped page again (it may fault), then wait.
    ReadAgain,
    /// Reply first, then read the I/O port (it faults without a grant), then wait.
    IoProbe(u16),
}

fn main() {
    utcb::set_receive_slot(ECHO_RECEIVE_SLOT);
    let mut server = Server {
        mapping: None,
        last_sum: 0,
    };
    let mut msg = receive();
    loop {
        // The benchmark's path: answer at once with the words unchanged.
        if msg.label() == BENCH {
            msg = match sys::reply_recv(ENDPOINT, &Message::new(BENCH, msg.words)) {
                Ok(m) => m,
                Err(_) => receive(),
            };
            continue;
        }
        let (answer, then) = server.handle(&msg);
        msg = match then {
            Then::Receive => match sys::reply_recv(ENDPOINT, &answer) {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("reply-receive failed: {e:?}");
                    receive()
                }
            },
            Then::ReadAgain => {
                if let Err(e) = sys::reply(&answer) {
                    log::warn!("reply failed: {e:?}");
                }
                if let Some(m) = &server.mapping {
                    server.last_sum = m.sum();
                }
                receive()
            }
            Then::IoProbe(port) => {
                if let Err(e) = sys::reply(&answer) {
                    log::warn!("reply failed: {e:?}");
                }
                server.last_sum = 0x100 | u64::from(rt::inb(port));
                receive()
            }
        };
    }
}

/// Waits for the next call, retrying after errors (there is nothing else to do).
fn receive() -> Message {
    loop {
        match sys::recv(ENDPOINT) {
            Ok(m) => return m,
            Err(e) => {
                log::warn!("receive failed: {e:?}");
                let _ = sys::yield_now();
            }
        }
    }
}

fn error(label: u16, status: Status) -> Message {
    Message::new(ERROR, [u64::from(label), status.code(), 0, 0])
}

impl Server {
    fn handle(&mut self, msg: &Message) -> (Message, Then) {
        let w = msg.words;
        let answer = match msg.label() {
            ECHO => Message::new(ECHO, w.map(|x| x.wrapping_add(1))),
            SUM_UTCB => {
                let n = msg.info.extra_words();
                let mut sum = 0u64;
                for i in 0..n {
                    let x = utcb::word(i);
                    sum = sum.wrapping_add(x);
                    utcb::set_word(i, x.wrapping_add(1));
                }
                Message::with_extra(SUM_UTCB, [sum, n as u64, 0, 0], n)
            }
            MAP_AND_SUM => self.map_and_sum(msg),
            READ_AGAIN => {
                let vaddr = self.mapping.as_ref().map_or(0, Mapping::vaddr);
                return (Message::new(READ_AGAIN, [vaddr, 0, 0, 0]), Then::ReadAgain);
            }
            LAST_SUM => Message::new(LAST_SUM, [self.last_sum, 0, 0, 0]),
            SSE => {
                // Load a pattern, let other threads run (the caller is the one woken by the
                // reply; a Yield switches too), and check the pattern is still there.
                rt::set_sse_pattern(w[0]);
                let _ = sys::yield_now();
                Message::new(SSE, [u64::from(rt::sse_pattern_holds(w[0])), 0, 0, 0])
            }
            IO_PROBE => {
                let port = w[0] as u16;
                return (
                    Message::new(IO_PROBE, [u64::from(port), 0, 0, 0]),
                    Then::IoProbe(port),
                );
            }
            other => error(other, Status::InvalidArgument),
        };
        (answer, Then::Receive)
    }

    /// Maps the page that came with the message and sums it; keeps it mapped for `READ_AGAIN`.
    fn map_and_sum(&mut self, msg: &Message) -> Message {
        if !msg.info.transfers_capability() {
            return Message::new(MAP_AND_SUM, [0; 4]);
        }
        let slot = u64::from(msg.info.selector());
        self.mapping = None;
        match Mapping::new(slot, 0, MapRights::READ) {
            Ok(m) => {
                let answer = Message::new(MAP_AND_SUM, [m.sum(), m.vaddr(), slot, 1]);
                self.mapping = Some(m);
                answer
            }
            Err(e) => error(MAP_AND_SUM, e),
        }
    }
}
