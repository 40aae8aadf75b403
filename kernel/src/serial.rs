//! The 16550 serial console (COM1) and the `log` backend that writes to it.

use crate::hw;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;

const COM1: u16 = 0x3f8;
/// Line status register bits (16550 datasheet): transmit holding empty, transmitter empty.
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;

/// The console; one lock serialises lines from every CPU.
pub struct Serial {
    _private: (),
}

pub static CONSOLE: Mutex<Serial> = Mutex::new(Serial { _private: () });
static READY: AtomicBool = AtomicBool::new(false);

/// Programs COM1 for 115200 8N1 with FIFOs on.
pub fn init() {
    hw::outb(COM1 + 1, 0x00); // no interrupts
    hw::outb(COM1 + 3, 0x80); // DLAB
    hw::outb(COM1, 0x01); // divisor 1 = 115200 baud
    hw::outb(COM1 + 1, 0x00);
    hw::outb(COM1 + 3, 0x03); // 8N1
    hw::outb(COM1 + 2, 0xc7); // FIFO on, cleared, 14-byte threshold
    hw::outb(COM1 + 4, 0x03); // DTR, RTS
    READY.store(true, Ordering::Release);
}

impl Serial {
    /// A handle that bypasses the lock: only for the exception and verdict paths, where the
    /// interrupted code may hold it and nothing else will print again.
    pub fn unlocked() -> Serial {
        Serial { _private: () }
    }

    fn put(&mut self, byte: u8) {
        let mut spins = 0u32;
        while hw::inb(COM1 + 5) & LSR_THRE == 0 && spins < 1_000_000 {
            spins += 1;
            hw::pause();
        }
        hw::outb(COM1, byte);
    }

    /// Waits until the UART has sent every byte (so a shutdown loses nothing).
    pub fn drain(&mut self) {
        let mut spins = 0u32;
        while hw::inb(COM1 + 5) & LSR_TEMT == 0 && spins < 10_000_000 {
            spins += 1;
            hw::pause();
        }
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// Prints to the console; used by `print!`/`println!`.
pub fn print(args: fmt::Arguments<'_>) {
    if !READY.load(Ordering::Acquire) {
        return;
    }
    let _ = CONSOLE.lock().write_fmt(args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let cpu = crate::percpu::current_index_or_zero();
            print(format_args!(
                "[{:5} cpu{}] {}\n",
                record.level(),
                cpu,
                record.args()
            ));
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger at `level` (from the command line's `log=`).
pub fn init_log(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
