//! Starting a boot module as a program in a protection domain of its own.
//!
//! `spawn` creates the PD, loads the module's `PT_LOAD` segments into fresh pages (file bytes
//! copied, the rest zeroed) mapped at their link addresses with their rights, maps a zeroed
//! stack below `CHILD_STACK_TOP`, creates the service endpoint and the thread (UTCB at
//! `CHILD_UTCB`, faults to the root task's fault endpoint), fills the child's initial slots and
//! resumes the thread. The child's initial slots (documented in `rt::layout`):
//!
//! | slot | capability | rights |
//! |---:|---|---|
//! | 0 | its own PD | all |
//! | 1 | its main thread | all |
//! | 2 | its service endpoint | RECEIVE |
//! | 16.. | free | |

use crate::memory::Memory;
use crate::{Context, Outcome, ensure};
use abi::{
    EndpointRights, ProtectionDomainRights, ROOT_PD, ThreadRights, USER_BASE, thread_config,
};
use alloc::format;
use rt::elf::{Elf, Segment};
use rt::layout::{
    CHILD_SERVICE_ENDPOINT, CHILD_STACK_PAGES, CHILD_STACK_TOP, CHILD_UTCB, PAGE_SIZE, SELF_PD,
    SELF_THREAD,
};
use rt::sys::{self, MapRights};
use rt::{Mapping, Selector};

/// Priority of every thread the root task starts (the root task's own).
pub const PRIORITY: u8 = 100;

/// A started program, as the root task holds it (root capabilities, all rights).
#[derive(Debug)]
pub struct Child {
    pub pd: Selector,
    pub thread: Selector,
    /// The service endpoint (the child holds a RECEIVE copy in its slot 2).
    pub endpoint: Selector,
    /// The executable range of its image: [start, end).
    pub text: (u64, u64),
}

/// Starts boot module `name` (the first word of its command line) on CPU 0; its faults go to
/// `fault_endpoint` in the root task's space.
pub fn spawn(mem: &mut Memory, name: &str, fault_endpoint: Selector) -> Outcome<Child> {
    let boot = rt::boot_info().ok_or("no boot information")?;
    let index = boot
        .modules()
        .iter()
        .position(|m| m.name().split_whitespace().next() == Some(name))
        .ok_or_else(|| format!("no boot module named '{name}'"))?;
    let file = rt::module_bytes(index).ok_or_else(|| format!("module '{name}' is not mapped"))?;
    let elf = Elf::parse(file).map_err(|e| format!("module '{name}': {e}"))?;

    let pd = mem.slot()?;
    sys::pd_create(ROOT_PD, pd).context("PdCreate")?;
    let mut text = (u64::MAX, 0);
    for segment in elf.segments() {
        load_segment(mem, pd, file, &segment)?;
        if segment.executable {
            let end = segment.vaddr + segment.mem_size;
            text = (text.0.min(segment.vaddr), text.1.max(end));
        }
    }
    let stack_bottom = CHILD_STACK_TOP - CHILD_STACK_PAGES * PAGE_SIZE;
    for page_index in 0..CHILD_STACK_PAGES {
        let page = mem.zeroed_page()?;
        let vaddr = stack_bottom + page_index * PAGE_SIZE;
        sys::mem_map(page, 0, pd, vaddr, MapRights::READ | MapRights::WRITE, 0)
            .context("MemMap of a stack page into the child")?;
    }

    let endpoint = mem.slot()?;
    sys::endpoint_create(ROOT_PD, endpoint).context("EndpointCreate")?;
    let thread = mem.slot()?;
    let config = thread_config(PRIORITY, 0, Some(fault_endpoint as u32));
    sys::thread_create(pd, thread, elf.entry(), CHILD_STACK_TOP, CHILD_UTCB, config)
        .context("ThreadCreate")?;

    let all_pd = ProtectionDomainRights::all().bits();
    sys::cap_delegate(pd, pd, SELF_PD, all_pd).context("CapDelegate of the child's PD")?;
    let all_thread = ThreadRights::all().bits();
    sys::cap_delegate(thread, pd, SELF_THREAD, all_thread)
        .context("CapDelegate of the child's thread")?;
    let receive = EndpointRights::RECEIVE.bits();
    sys::cap_delegate(endpoint, pd, CHILD_SERVICE_ENDPOINT, receive)
        .context("CapDelegate of the child's service endpoint")?;

    sys::thread_resume(thread).context("ThreadResume")?;
    log::info!("started {name} (entry {:#x})", elf.entry());
    Ok(Child {
        pd,
        thread,
        endpoint,
        text,
    })
}

/// Maps `segment` into `pd`: one fresh page per page it touches, zeroed, its file bytes copied.
fn load_segment(mem: &mut Memory, pd: Selector, file: &[u8], segment: &Segment) -> Outcome<()> {
    ensure!(
        segment.vaddr >= USER_BASE,
        "segment at {:#x} below user space",
        segment.vaddr
    );
    let bytes = segment.bytes(file);
    let file_end = segment.vaddr + segment.file_size;
    let end = segment.vaddr + segment.mem_size;
    let mut rights = MapRights::READ;
    if segment.writable {
        rights |= MapRights::WRITE;
    }
    if segment.executable {
        rights |= MapRights::EXECUTE;
    }
    let first = segment.vaddr & !(PAGE_SIZE - 1);
    let mut page_vaddr = first;
    while page_vaddr < end {
        let page = mem.page()?;
        {
            let map = Mapping::new(page, 0, MapRights::READ | MapRights::WRITE)
                .context("MemMap of a program page into the scratch window")?;
            map.fill(|_| 0).context("zeroing a program page")?;
            let lo = page_vaddr.max(segment.vaddr);
            let hi = (page_vaddr + PAGE_SIZE).min(file_end);
            if lo < hi {
                let from = (lo - segment.vaddr) as usize;
                let to = (hi - segment.vaddr) as usize;
                map.write_bytes((lo - page_vaddr) as usize, &bytes[from..to])
                    .context("copying program bytes")?;
            }
        }
        sys::mem_map(page, 0, pd, page_vaddr, rights, 0)
            .map_err(|e| format!("MemMap of a program page at {page_vaddr:#x}: {e:?}"))?;
        page_vaddr += PAGE_SIZE;
    }
    Ok(())
}
