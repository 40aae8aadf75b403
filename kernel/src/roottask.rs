//! Starting the root task: the first multiboot2 module, loaded as an ELF executable into the
//! first protection domain, with capabilities to all free memory and the other modules
//! mapped read-only (see docs/abi.md, "The root task").

use crate::bootinfo::{BootInfo, Module};
use crate::memory::{self, PAGE_SIZE};
use crate::percpu::{CPUS, VmxState};
use crate::phys;
use crate::sched::{self, Kernel, ThreadStart};
use abi::elf;
use caps::ObjectKind;
use ept::entry::{PageSize, Rights};

/// Frames the kernel keeps for itself (page tables, objects, stacks): 16 MiB.
const KERNEL_RESERVE_FRAMES: usize = 4096;
/// Where the other modules appear in the root task.
const MODULE_WINDOW: u64 = 0x0000_0090_0000_0000;
const ROOT_PRIORITY: u8 = 100;

#[derive(Debug)]
pub enum RootError {
    NoModule,
    Elf(elf::ElfError),
    SegmentOutsideUserSpace,
    OutOfMemory,
    Map,
}

impl core::fmt::Display for RootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoModule => write!(f, "GRUB passed no modules: the root task is missing"),
            Self::Elf(e) => write!(f, "the root task module is not a usable ELF: {e}"),
            Self::SegmentOutsideUserSpace => {
                write!(f, "a root task segment lies outside user space")
            }
            Self::OutOfMemory => write!(f, "out of memory while loading the root task"),
            Self::Map => write!(f, "mapping the root task failed"),
        }
    }
}

fn module_bytes(m: &Module) -> &'static [u8] {
    crate::phys::firmware_bytes(m.start, (m.end - m.start) as usize).unwrap_or(&[])
}

/// Allocates a zeroed page and maps it in the root PD; returns the frame.
fn map_new_page(k: &mut Kernel, vaddr: u64, rights: Rights) -> Result<u64, RootError> {
    let frame = memory::alloc_zeroed_pages(1).ok_or(RootError::OutOfMemory)?;
    k.pds[0]
        .as_ref()
        .ok_or(RootError::Map)?
        .aspace
        .map(vaddr, frame, PageSize::Size4K, rights)
        .map_err(|_| RootError::Map)?;
    Ok(frame)
}

/// Creates the root PD and thread; returns the thread to start.
pub fn create(info: &BootInfo) -> Result<u32, RootError> {
    let mut modules = info.modules();
    let root = modules.next().ok_or(RootError::NoModule)?;
    let image = module_bytes(root);
    let exe = elf::parse(image).map_err(RootError::Elf)?;

    let mut k = sched::kernel();
    let pd = k.create_pd().map_err(|_| RootError::OutOfMemory)?;
    debug_assert_eq!(pd, 0);

    // The executable's segments.
    for seg in exe.segments() {
        let end = seg
            .vaddr
            .checked_add(seg.mem_size)
            .ok_or(RootError::SegmentOutsideUserSpace)?;
        if seg.vaddr < abi::USER_BASE + 0x20_0000 || end > abi::USER_END {
            return Err(RootError::SegmentOutsideUserSpace);
        }
        let mut rights = Rights::READ;
        if seg.writable {
            rights |= Rights::WRITE;
        }
        if seg.executable {
            rights |= Rights::EXECUTE;
        }
        let bytes = seg.bytes(image);
        let first = seg.vaddr & !0xfff;
        let mut page = first;
        while page < end {
            let frame = match k.pds[0].as_ref().and_then(|p| p.aspace.translate(page)) {
                Some((pa, _)) => pa & !0xfff, // shared with the previous segment
                None => map_new_page(&mut k, page, rights)?,
            };
            // Copy the part of the file bytes that falls in this page.
            let lo = page.max(seg.vaddr);
            let hi = (page + PAGE_SIZE as u64).min(seg.vaddr + bytes.len() as u64);
            if lo < hi {
                let src = &bytes[(lo - seg.vaddr) as usize..(hi - seg.vaddr) as usize];
                phys::write(frame + (lo - page), src);
            }
            page += PAGE_SIZE as u64;
        }
    }

    // Stack, UTCB (mapped by create_thread) and boot information.
    for i in 1..=abi::ROOT_STACK_PAGES {
        map_new_page(
            &mut k,
            abi::ROOT_STACK_TOP - i * PAGE_SIZE as u64,
            Rights::READ | Rights::WRITE,
        )?;
    }
    let boot_page = map_new_page(&mut k, abi::ROOT_BOOT_INFO, Rights::READ)?;
    let thread = k
        .create_thread(
            0,
            ThreadStart {
                entry: exe.entry,
                stack: abi::ROOT_STACK_TOP,
                utcb: abi::ROOT_UTCB,
                priority: ROOT_PRIORITY,
                cpu: 0,
                fault_endpoint: None,
            },
        )
        .map_err(|_| RootError::OutOfMemory)?;
    let all = |kind: ObjectKind| kind.valid_rights();
    k.caps
        .create(
            0,
            abi::ROOT_PD,
            ObjectKind::ProtectionDomain,
            0,
            all(ObjectKind::ProtectionDomain),
        )
        .map_err(|_| RootError::OutOfMemory)?;
    k.caps
        .create(
            0,
            abi::ROOT_THREAD,
            ObjectKind::Thread,
            thread,
            all(ObjectKind::Thread),
        )
        .map_err(|_| RootError::OutOfMemory)?;
    let lines = k.create_interrupts(0, crate::ioapic::MAX_GSI);
    k.caps
        .create(
            0,
            abi::ROOT_INTERRUPTS,
            ObjectKind::Interrupts,
            lines,
            all(ObjectKind::Interrupts),
        )
        .map_err(|_| RootError::OutOfMemory)?;
    let ports = k.create_io_ports(0, 0x1_0000);
    k.caps
        .create(
            0,
            abi::ROOT_IO_PORTS,
            ObjectKind::IoPorts,
            ports,
            all(ObjectKind::IoPorts),
        )
        .map_err(|_| RootError::OutOfMemory)?;

    let mut bi = abi::BootInfo {
        magic: abi::BOOT_INFO_MAGIC,
        cpus: sched::cpu_count() as u64,
        vmx: u64::from(
            CPUS[..sched::cpu_count()]
                .iter()
                .all(|c| c.vmx_state() == VmxState::Root),
        ),
        scenario: [0; 32],
        scenario_len: 0,
        module_count: 0,
        modules: [abi::BootModule {
            selector: abi::NO_SLOT,
            size: 0,
            vaddr: 0,
            name: [0; 64],
            name_len: 0,
        }; abi::MAX_BOOT_MODULES],
        memory_count: 0,
        memory: [abi::BootMemory {
            selector: 0,
            order: 0,
        }; abi::MAX_BOOT_MEMORY],
    };
    let scenario = info.arg("scenario").unwrap_or("");
    let n = scenario.len().min(32);
    bi.scenario[..n].copy_from_slice(&scenario.as_bytes()[..n]);
    bi.scenario_len = n as u64;

    // The other modules, read-only.
    let mut window = MODULE_WINDOW;
    for (i, m) in modules.enumerate().take(abi::MAX_BOOT_MODULES) {
        let start = m.start & !0xfff;
        let mut pa = start;
        let vaddr = window + (m.start - start);
        while pa < m.end {
            k.pds[0]
                .as_ref()
                .ok_or(RootError::Map)?
                .aspace
                .map(window + (pa - start), pa, PageSize::Size4K, Rights::READ)
                .map_err(|_| RootError::Map)?;
            pa += PAGE_SIZE as u64;
        }
        let name = m.cmdline.as_str();
        let bm = &mut bi.modules[i];
        bm.size = m.end - m.start;
        bm.vaddr = vaddr;
        let n = name.len().min(64);
        bm.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        bm.name_len = n as u64;
        bi.module_count += 1;
        window += (pa - start + 0x20_0000) & !0x1f_ffff;
    }

    // All free memory but the kernel's reserve, as naturally aligned blocks.
    let mut slot = abi::ROOT_FIRST_MEMORY;
    'orders: for order in (0..=18u8).rev() {
        loop {
            let (_, free) = memory::frame_stats();
            if bi.memory_count as usize == abi::MAX_BOOT_MEMORY
                || free < KERNEL_RESERVE_FRAMES + (1 << order)
            {
                continue 'orders;
            }
            let Some(base) = memory::alloc_pages(1 << order) else {
                continue 'orders;
            };
            phys::zero(base, PAGE_SIZE << order);
            let obj = k.create_memory(base, order);
            if k.caps
                .create(0, slot, ObjectKind::Memory, obj, all(ObjectKind::Memory))
                .is_err()
            {
                break 'orders;
            }
            bi.memory[bi.memory_count as usize] = abi::BootMemory {
                selector: slot,
                order: u64::from(order),
            };
            bi.memory_count += 1;
            slot += 1;
        }
    }
    let total: u64 = bi.memory().iter().map(|m| 1u64 << m.order).sum();
    log::info!(
        "root task: {} memory blocks ({} MiB), {} modules",
        bi.memory_count,
        (total * PAGE_SIZE as u64) >> 20,
        bi.module_count
    );

    let bytes = boot_info_bytes(&bi);
    phys::write(boot_page, bytes);
    drop(k);
    Ok(thread)
}

fn boot_info_bytes(bi: &abi::BootInfo) -> &[u8] {
    // SAFETY: `abi::BootInfo` is `repr(C)` and made only of u64 and u8 arrays whose sizes are
    // multiples of 8, so it has no padding: every byte is initialised.
    unsafe {
        core::slice::from_raw_parts(
            (bi as *const abi::BootInfo).cast::<u8>(),
            core::mem::size_of::<abi::BootInfo>(),
        )
    }
}
