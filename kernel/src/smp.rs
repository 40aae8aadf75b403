//! Application-processor start-up: INIT-SIPI-SIPI to each CPU the MADT lists (SDM Vol. 3A,
//! 10.4 "Multiple-Processor (MP) Initialization"), each entering long mode through the
//! trampoline in `boot` and then `ap_main`.

use crate::acpi::Madt;
use crate::boot::{self, TRAMPOLINE_BASE};
use crate::hw::{self, msr};
use crate::percpu::{self, CPU_COUNT, CPUS, MAX_CPUS};
use crate::{apic, cpu, memory, vmx};
use core::sync::atomic::Ordering;

const AP_STACK_PAGES: usize = 16;
/// Local APIC timer initial count (divide by 1): about 1 ms on QEMU's 1 GHz APIC clock.
pub const TIMER_COUNT: u32 = 1_000_000;

fn write_trampoline_word(offset: usize, value: u64) {
    // SAFETY: the trampoline page lies below 1 MiB, which the frame allocator never hands
    // out; it is identity mapped, and `offset` comes from `boot::trampoline()`, inside the
    // copied image. APs read it only after the SIPI that follows this write.
    unsafe { core::ptr::write_volatile((TRAMPOLINE_BASE as usize + offset) as *mut u64, value) };
}

/// Starts every enabled processor in the MADT other than this one. Returns how many came up.
pub fn start_aps(madt: &Madt, reserved_conflict: bool) -> usize {
    if reserved_conflict {
        log::error!("smp: the trampoline page {TRAMPOLINE_BASE:#x} holds boot data; APs stay off");
        return 0;
    }
    let t = boot::trampoline();
    // SAFETY: copies the trampoline image (in the kernel's text) to its page below 1 MiB,
    // which nothing else uses (see `write_trampoline_word`); the ranges cannot overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(t.image, TRAMPOLINE_BASE as *mut u8, t.len);
    }
    write_trampoline_word(t.cr3, hw::read_cr3());
    write_trampoline_word(t.efer, hw::rdmsr(msr::IA32_EFER));
    write_trampoline_word(t.entry, ap_main as *const () as u64);

    let bsp = apic::id();
    let mut started = 0;
    let mut next = 1;
    for &id in &madt.apic_ids[..madt.count] {
        if id == bsp {
            continue;
        }
        if next >= MAX_CPUS {
            log::warn!("smp: APIC {id} left parked: the kernel manages {MAX_CPUS} CPUs");
            continue;
        }
        let Some(stack) = memory::alloc_zeroed_pages(AP_STACK_PAGES) else {
            log::error!("smp: no memory for the stack of APIC {id}");
            break;
        };
        CPUS[next].apic_id.store(id, Ordering::Relaxed);
        let top = stack + (AP_STACK_PAGES * memory::PAGE_SIZE) as u64;
        CPUS[next].kernel_stack_top.store(top, Ordering::Relaxed);
        write_trampoline_word(t.stack, top);
        write_trampoline_word(t.cpu, next as u64);

        apic::send_init(id);
        apic::delay_us(10_000);
        let vector = (TRAMPOLINE_BASE >> 12) as u8;
        apic::send_sipi(id, vector);
        apic::delay_us(200);
        if !wait_online(next, 1_000) {
            apic::send_sipi(id, vector);
        }
        if wait_online(next, 2_000_000) {
            started += 1;
            next += 1;
            CPU_COUNT.store(next as u32, Ordering::Release);
        } else {
            log::error!("smp: APIC {id} did not come up");
            memory::free_pages(stack, AP_STACK_PAGES);
        }
    }
    started
}

fn wait_online(index: usize, spins: u64) -> bool {
    for _ in 0..spins {
        if CPUS[index].online.load(Ordering::Acquire) {
            return true;
        }
        apic::delay_us(1);
    }
    CPUS[index].online.load(Ordering::Acquire)
}

/// An application processor's first Rust code, on its own stack, in long mode.
extern "C" fn ap_main(index: u64) -> ! {
    let index = index as usize;
    let apic_id = CPUS[index].apic_id.load(Ordering::Relaxed);
    percpu::install(index, apic_id);
    cpu::init_this_cpu();
    crate::fpu::init_this_cpu();
    crate::entry::init_this_cpu();
    apic::init_this_cpu(false);
    let state = vmx::init_this_cpu();
    log::debug!("cpu {index} (APIC {apic_id}) up, VMX {state:?}");
    apic::start_timer(TIMER_COUNT);
    CPUS[index].online.store(true, Ordering::Release);
    crate::sched::idle()
}
