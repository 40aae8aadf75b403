//! Loading programs: an ELF64 executable checked for what a loader needs.
//!
//! `abi::elf` (shared with the kernel's root-task loader) parses the header and the `PT_LOAD`
//! program headers with every offset bounds-checked. On top of that a program must have at
//! least one segment, every segment inside user space, no two segments sharing a page (each
//! page is mapped with one set of rights) and its entry point in an executable segment. A
//! malformed or truncated file gives an [`ElfError`], never a panic.

use abi::elf::{self as format, Executable};
use abi::{USER_BASE, USER_END};
use core::fmt;

pub use abi::elf::Segment;

/// Why a byte string is not a loadable program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Not a well-formed x86-64 ELF64 executable (`abi::elf`).
    Format(format::ElfError),
    /// A segment does not lie inside user space.
    SegmentOutsideUserSpace,
    /// Two segments share a page.
    OverlappingSegments,
    /// No loadable segment.
    NoSegments,
    /// The entry point is not in an executable segment.
    BadEntry,
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Format(e) => e.fmt(f),
            Self::SegmentOutsideUserSpace => f.write_str("a segment lies outside user space"),
            Self::OverlappingSegments => f.write_str("two segments share a page"),
            Self::NoSegments => f.write_str("no loadable segment"),
            Self::BadEntry => f.write_str("the entry point is not in an executable segment"),
        }
    }
}

/// A program ready to load: its file, entry point and (non-empty) loadable segments.
#[derive(Clone, Copy, Debug)]
pub struct Elf<'a> {
    file: &'a [u8],
    executable: Executable,
}

impl<'a> Elf<'a> {
    /// Parses `file` and checks it can be loaded into a user address space.
    pub fn parse(file: &'a [u8]) -> Result<Self, ElfError> {
        let executable = format::parse(file).map_err(ElfError::Format)?;
        let elf = Self { file, executable };
        let mut any = false;
        let mut entry_ok = false;
        for (i, s) in elf.segments().enumerate() {
            any = true;
            let end = s.vaddr + s.mem_size; // cannot wrap: checked by `abi::elf`
            if s.vaddr < USER_BASE || end > USER_END {
                return Err(ElfError::SegmentOutsideUserSpace);
            }
            entry_ok |= s.executable && (s.vaddr..end).contains(&elf.entry());
            for t in elf.segments().take(i) {
                let (a, b) = (page_span(&s), page_span(&t));
                if a.0 < b.1 && b.0 < a.1 {
                    return Err(ElfError::OverlappingSegments);
                }
            }
        }
        if !any {
            return Err(ElfError::NoSegments);
        }
        if !entry_ok {
            return Err(ElfError::BadEntry);
        }
        Ok(elf)
    }

    /// The entry point's virtual address.
    pub fn entry(&self) -> u64 {
        self.executable.entry
    }

    /// The file the segments refer to.
    pub fn file(&self) -> &'a [u8] {
        self.file
    }

    /// The loadable segments with memory bytes, in file order.
    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        self.executable
            .segments()
            .filter(|s| s.mem_size > 0)
            .copied()
    }
}

/// The pages a segment (inside user space) touches: [first page start, last page end).
fn page_span(s: &Segment) -> (u64, u64) {
    let page = crate::layout::PAGE_SIZE;
    let start = s.vaddr & !(page - 1);
    let end = (s.vaddr + s.mem_size + page - 1) & !(page - 1);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
    const ELFCLASS64: u8 = 2;
    const ELFDATA2LSB: u8 = 1;
    const EV_CURRENT: u8 = 1;
    const ET_EXEC: u16 = 2;
    const EM_X86_64: u16 = 62;
    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;
    const PF_W: u32 = 2;
    const PF_R: u32 = 4;
    const HEADER_SIZE: usize = 64;
    const PROGRAM_HEADER_SIZE: usize = 56;
    use ElfError::Format;
    use format::ElfError::{
        BadMagic, BadProgramHeaders, NotElf64LittleEndian, NotX86_64Executable, SegmentOutsideFile,
        SegmentSizes,
    };

    const BASE: u64 = 0x0000_0100_0000_0000;

    /// A minimal executable: one header, `segments` program headers, then `payload`.
    fn build(segments: &[(u32, u32, u64, u64, u64, u64)], entry: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; HEADER_SIZE];
        f[..4].copy_from_slice(&ELF_MAGIC);
        f[4] = ELFCLASS64;
        f[5] = ELFDATA2LSB;
        f[6] = EV_CURRENT;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&(HEADER_SIZE as u64).to_le_bytes());
        f[52..54].copy_from_slice(&(HEADER_SIZE as u16).to_le_bytes());
        f[54..56].copy_from_slice(&(PROGRAM_HEADER_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for &(kind, flags, offset, vaddr, file_size, mem_size) in segments {
            let mut p = [0u8; PROGRAM_HEADER_SIZE];
            p[0..4].copy_from_slice(&kind.to_le_bytes());
            p[4..8].copy_from_slice(&flags.to_le_bytes());
            p[8..16].copy_from_slice(&offset.to_le_bytes());
            p[16..24].copy_from_slice(&vaddr.to_le_bytes());
            p[24..32].copy_from_slice(&vaddr.to_le_bytes());
            p[32..40].copy_from_slice(&file_size.to_le_bytes());
            p[40..48].copy_from_slice(&mem_size.to_le_bytes());
            p[48..56].copy_from_slice(&4096u64.to_le_bytes());
            f.extend_from_slice(&p);
        }
        f.extend_from_slice(payload);
        f
    }

    fn good() -> Vec<u8> {
        let payload_at = (HEADER_SIZE + 2 * PROGRAM_HEADER_SIZE) as u64;
        build(
            &[
                (PT_LOAD, PF_R | PF_X, payload_at, BASE, 4, 4),
                (
                    PT_LOAD,
                    PF_R | PF_W,
                    payload_at + 4,
                    BASE + 0x1000,
                    4,
                    0x3000,
                ),
            ],
            BASE,
            &[1, 2, 3, 4, 5, 6, 7, 8],
        )
    }

    #[test]
    fn a_well_formed_executable_yields_its_segments() {
        let file = good();
        let elf = Elf::parse(&file).unwrap();
        assert_eq!(elf.entry(), BASE);
        let segs: Vec<_> = elf.segments().collect();
        assert_eq!(segs.len(), 2);
        assert!(segs[0].executable && !segs[0].writable);
        assert_eq!(segs[0].bytes(&file), &[1, 2, 3, 4]);
        assert!(segs[1].writable && !segs[1].executable);
        assert_eq!(segs[1].bytes(&file), &[5, 6, 7, 8]);
        assert_eq!(segs[1].mem_size, 0x3000);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let file = good();
        for len in 0..file.len() {
            assert!(Elf::parse(&file[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn every_single_byte_corruption_parses_or_errs_without_panicking() {
        let file = good();
        for i in 0..file.len() {
            for v in [0u8, 0xff, 0x80, 0x01] {
                let mut f = file.clone();
                f[i] = v;
                let _ = Elf::parse(&f).map(|e| e.segments().count());
            }
        }
    }

    #[test]
    fn bad_headers_are_named() {
        let mut f = good();
        f[0] = 0;
        assert_eq!(Elf::parse(&f).unwrap_err(), Format(BadMagic));
        let mut f = good();
        f[4] = 1;
        assert_eq!(Elf::parse(&f).unwrap_err(), Format(NotElf64LittleEndian));
        let mut f = good();
        f[18] = 3;
        assert_eq!(Elf::parse(&f).unwrap_err(), Format(NotX86_64Executable));
        let mut f = good();
        f[56] = 200;
        assert_eq!(Elf::parse(&f).unwrap_err(), Format(BadProgramHeaders));
    }

    #[test]
    fn segments_are_checked_against_the_file_and_user_space() {
        let at = (HEADER_SIZE + PROGRAM_HEADER_SIZE) as u64;
        let one = |offset, vaddr, file_size, mem_size| {
            build(
                &[(PT_LOAD, PF_R | PF_X, offset, vaddr, file_size, mem_size)],
                vaddr,
                &[0; 16],
            )
        };
        let parse = |f: Vec<u8>| Elf::parse(&f).map(|_| ());
        assert_eq!(parse(one(at, BASE, 16, 16)), Ok(()));
        assert_eq!(
            parse(one(at, BASE, 17, 17)),
            Err(Format(SegmentOutsideFile))
        );
        assert_eq!(
            parse(one(u64::MAX, BASE, 2, 2)),
            Err(Format(SegmentOutsideFile))
        );
        assert_eq!(parse(one(at, BASE, 16, 8)), Err(Format(SegmentSizes)));
        assert_eq!(
            parse(one(at, 0x20_0000, 16, 16)),
            Err(ElfError::SegmentOutsideUserSpace)
        );
        assert_eq!(
            parse(one(at, u64::MAX - 4, 4, 16)),
            Err(Format(SegmentSizes))
        );
        assert_eq!(
            parse(one(at, USER_END - 8, 8, 16)),
            Err(ElfError::SegmentOutsideUserSpace)
        );
    }

    #[test]
    fn overlapping_segments_and_a_stray_entry_are_refused() {
        let at = (HEADER_SIZE + 2 * PROGRAM_HEADER_SIZE) as u64;
        let f = build(
            &[
                (PT_LOAD, PF_R | PF_X, at, BASE, 4, 4),
                (PT_LOAD, PF_R | PF_W, at, BASE + 0x800, 4, 4),
            ],
            BASE,
            &[0; 8],
        );
        assert_eq!(Elf::parse(&f).unwrap_err(), ElfError::OverlappingSegments);
        let at = (HEADER_SIZE + PROGRAM_HEADER_SIZE) as u64;
        let f = build(&[(PT_LOAD, PF_R | PF_W, at, BASE, 4, 4)], BASE, &[0; 8]);
        assert_eq!(Elf::parse(&f).unwrap_err(), ElfError::BadEntry);
    }
}
