//! ELF64 executables as the kernel (root task) and the root task (other modules) load them:
//! the header and the PT_LOAD segments, every offset bounds-checked (malformed input gives an
//! error, never a panic).

/// A loadable segment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Segment {
    /// Virtual address of the segment's first byte.
    pub vaddr: u64,
    /// Bytes in memory (the part beyond `file_size` is zero).
    pub mem_size: u64,
    /// Offset of its bytes in the file.
    pub file_offset: u64,
    /// Bytes in the file.
    pub file_size: u64,
    /// PF_R, PF_W, PF_X as bits 2, 1, 0 of p_flags.
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ElfError {
    TooShort,
    BadMagic,
    NotElf64LittleEndian,
    NotX86_64Executable,
    BadProgramHeaders,
    SegmentOutsideFile,
    SegmentSizes,
    TooManySegments,
}

impl core::fmt::Display for ElfError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = match self {
            Self::TooShort => "shorter than an ELF header",
            Self::BadMagic => "no ELF magic",
            Self::NotElf64LittleEndian => "not a 64-bit little-endian ELF",
            Self::NotX86_64Executable => "not an x86-64 executable (ET_EXEC, EM_X86_64)",
            Self::BadProgramHeaders => "program headers out of bounds or malformed",
            Self::SegmentOutsideFile => "a segment's bytes lie outside the file",
            Self::SegmentSizes => "a segment's file size exceeds its memory size, or it wraps",
            Self::TooManySegments => "more than 16 loadable segments",
        };
        f.write_str(s)
    }
}

/// A parsed executable: its entry point and up to 16 loadable segments.
#[derive(Clone, Copy, Debug)]
pub struct Executable {
    pub entry: u64,
    segments: [Option<Segment>; 16],
    count: usize,
}

impl Executable {
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments[..self.count].iter().flatten()
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

const PT_LOAD: u32 = 1;

/// Parses `file` as an x86-64 ELF64 executable.
pub fn parse(file: &[u8]) -> Result<Executable, ElfError> {
    if file.len() < 64 {
        return Err(ElfError::TooShort);
    }
    if file[..4] != *b"\x7fELF" {
        return Err(ElfError::BadMagic);
    }
    if file[4] != 2 || file[5] != 1 {
        return Err(ElfError::NotElf64LittleEndian);
    }
    let bad = ElfError::BadProgramHeaders;
    if u16_at(file, 16) != Some(2) || u16_at(file, 18) != Some(62) {
        return Err(ElfError::NotX86_64Executable);
    }
    let entry = u64_at(file, 24).ok_or(bad)?;
    let phoff = usize::try_from(u64_at(file, 32).ok_or(bad)?).map_err(|_| bad)?;
    let phentsize = usize::from(u16_at(file, 54).ok_or(bad)?);
    let phnum = usize::from(u16_at(file, 56).ok_or(bad)?);
    if phentsize < 56 {
        return Err(bad);
    }
    let table_end = phnum
        .checked_mul(phentsize)
        .and_then(|n| n.checked_add(phoff))
        .ok_or(bad)?;
    if table_end > file.len() {
        return Err(bad);
    }
    let mut exe = Executable {
        entry,
        segments: [None; 16],
        count: 0,
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(file, ph).ok_or(bad)? != PT_LOAD {
            continue;
        }
        let flags = u32_at(file, ph + 4).ok_or(bad)?;
        let seg = Segment {
            file_offset: u64_at(file, ph + 8).ok_or(bad)?,
            vaddr: u64_at(file, ph + 16).ok_or(bad)?,
            file_size: u64_at(file, ph + 32).ok_or(bad)?,
            mem_size: u64_at(file, ph + 40).ok_or(bad)?,
            readable: flags & 4 != 0,
            writable: flags & 2 != 0,
            executable: flags & 1 != 0,
        };
        if seg.file_size > seg.mem_size || seg.vaddr.checked_add(seg.mem_size).is_none() {
            return Err(ElfError::SegmentSizes);
        }
        let end = seg
            .file_offset
            .checked_add(seg.file_size)
            .ok_or(ElfError::SegmentOutsideFile)?;
        if end > file.len() as u64 {
            return Err(ElfError::SegmentOutsideFile);
        }
        if exe.count == exe.segments.len() {
            return Err(ElfError::TooManySegments);
        }
        exe.segments[exe.count] = Some(seg);
        exe.count += 1;
    }
    Ok(exe)
}

impl Segment {
    /// The segment's bytes in `file` (checked by `parse`).
    pub fn bytes<'a>(&self, file: &'a [u8]) -> &'a [u8] {
        let start = self.file_offset as usize;
        file.get(start..start + self.file_size as usize)
            .unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0u64.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&0x1000u64.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&120u64.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes());
        f
    }

    #[test]
    fn parses_a_minimal_executable() {
        let f = header();
        let e = parse(&f).unwrap();
        assert_eq!(e.entry, 0x1000);
        let s: Vec<_> = e.segments().collect();
        assert_eq!(s.len(), 1);
        assert!(s[0].readable && s[0].executable && !s[0].writable);
        assert_eq!(s[0].bytes(&f).len(), 120);
    }

    #[test]
    fn segment_outside_file_is_an_error() {
        let mut f = header();
        f[64 + 32..64 + 40].copy_from_slice(&4096u64.to_le_bytes());
        assert_eq!(parse(&f).unwrap_err(), ElfError::SegmentOutsideFile);
    }

    #[test]
    fn truncated_or_garbage_input_never_panics() {
        let f = header();
        for n in 0..f.len() {
            let _ = parse(&f[..n]);
        }
        let mut g = f.clone();
        g[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(parse(&g).unwrap_err(), ElfError::BadProgramHeaders);
        for i in 0..f.len() {
            let mut h = f.clone();
            h[i] ^= 0xff;
            let _ = parse(&h);
        }
    }
}
