//! The vmlinux ELF inside a bzImage (LZ4 legacy frames or gzip), and the
//! PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`) it must have.

use crate::ImageError;

/// Decompress the kernel payload of a bzImage into the vmlinux ELF.
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, ImageError> {
    let bad = |d: &str| ImageError::Corrupt {
        what: "bzImage".into(),
        detail: d.to_string(),
    };
    if bz.len() < 0x250 || &bz[0x202..0x206] != b"HdrS" {
        if bz.starts_with(b"\x7fELF") {
            return Ok(bz.to_vec());
        }
        return Err(bad("no Linux boot header (HdrS)"));
    }
    let version = u16::from_le_bytes([bz[0x206], bz[0x207]]);
    if version < 0x208 {
        return Err(bad("boot protocol older than 2.08 has no payload fields"));
    }
    let setup_sects = if bz[0x1f1] == 0 {
        4
    } else {
        bz[0x1f1] as usize
    };
    let off = u32::from_le_bytes(bz[0x248..0x24c].try_into().unwrap_or_default()) as usize;
    let len = u32::from_le_bytes(bz[0x24c..0x250].try_into().unwrap_or_default()) as usize;
    let start = (setup_sects + 1) * 512 + off;
    let payload = bz
        .get(start..start.saturating_add(len))
        .ok_or_else(|| bad("payload outside the file"))?;
    let out = if payload.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        lz4_legacy(&payload[4..]).map_err(|d| bad(&d))?
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(payload), &mut v)
            .map_err(|e| bad(&format!("gzip payload: {e}")))?;
        v
    } else {
        return Err(bad(&format!(
            "unsupported payload compression (magic {:02x?}); pass a vmlinux with --kernel",
            &payload[..payload.len().min(6)]
        )));
    };
    if !out.starts_with(b"\x7fELF") {
        return Err(bad("the decompressed payload is not an ELF"));
    }
    Ok(out)
}

/// LZ4 "legacy" frames as the kernel's `lz4 -l` writes them: after the magic,
/// blocks of `u32 LE size | data`, each inflating to at most 8 MiB, then the
/// 4-byte uncompressed size the kernel build appends.
fn lz4_legacy(mut data: &[u8]) -> Result<Vec<u8>, String> {
    const BLOCK: usize = 8 << 20;
    const MAGIC: u32 = 0x184c2102;
    let mut out = Vec::new();
    let mut block = vec![0u8; BLOCK];
    while data.len() >= 4 {
        let size = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if size == MAGIC as usize {
            data = &data[4..];
            continue;
        }
        if size == 0 || size > data.len() - 4 {
            break; // the trailing size field
        }
        let n = lz4_flex::block::decompress_into(&data[4..4 + size], &mut block)
            .map_err(|e| format!("lz4 block: {e}"))?;
        out.extend_from_slice(&block[..n]);
        data = &data[4 + size..];
    }
    if out.is_empty() {
        return Err("empty lz4 payload".into());
    }
    Ok(out)
}

/// Does this ELF carry a Xen PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`)?
pub fn elf_has_pvh_note(elf: &[u8]) -> bool {
    pvh_entry(elf).is_some()
}

/// The PVH 32-bit entry point from the ELF notes, if any. Bounds-checked.
pub fn pvh_entry(elf: &[u8]) -> Option<u64> {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let get = |o: usize, n: usize| elf.get(o..o.checked_add(n)?);
    let rd16 = |o: usize| get(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let rd32 = |o: usize| get(o, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let rd64 = |o: usize| get(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) {
        return None; // not ELF64
    }
    let phoff = rd64(0x20)? as usize;
    let phentsize = rd16(0x36)? as usize;
    let phnum = rd16(0x38)? as usize;
    for i in 0..phnum.min(256) {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if rd32(ph)? != 4 {
            continue; // PT_NOTE only
        }
        let off = rd64(ph.checked_add(8)?)? as usize;
        let size = rd64(ph.checked_add(32)?)? as usize;
        let end = off.checked_add(size)?.min(elf.len());
        let mut p = off;
        while p.checked_add(12)? <= end {
            let namesz = rd32(p)? as usize;
            let descsz = rd32(p + 4)? as usize;
            let typ = rd32(p + 8)?;
            let name_at = p + 12;
            let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
            if namesz == 4 && typ == XEN_ELFNOTE_PHYS32_ENTRY && get(name_at, 4) == Some(b"Xen\0") {
                return match descsz {
                    4 => rd32(desc_at).map(u64::from),
                    8 => rd64(desc_at),
                    _ => None,
                };
            }
            p = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with_note(name: &[u8], typ: u32, desc: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_off = 64 + 56;
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes());
        ph[8..16].copy_from_slice(&(note_off as u64).to_le_bytes());
        let mut note = Vec::new();
        note.extend_from_slice(&(name.len() as u32).to_le_bytes());
        note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        note.extend_from_slice(&typ.to_le_bytes());
        note.extend_from_slice(name);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        note.extend_from_slice(desc);
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend_from_slice(&ph);
        e.extend_from_slice(&note);
        e
    }

    #[test]
    fn pvh_note_is_found_and_others_are_not() {
        assert_eq!(
            pvh_entry(&elf_with_note(b"Xen\0", 18, &0x1000u32.to_le_bytes())),
            Some(0x1000)
        );
        assert_eq!(
            pvh_entry(&elf_with_note(b"Xen\0", 17, &0x1000u32.to_le_bytes())),
            None
        );
        assert_eq!(
            pvh_entry(&elf_with_note(b"GNU\0", 18, &0x1000u32.to_le_bytes())),
            None
        );
    }

    #[test]
    fn truncated_or_hostile_elves_do_not_panic() {
        let good = elf_with_note(b"Xen\0", 18, &0x1000u32.to_le_bytes());
        for cut in 0..good.len() {
            let _ = pvh_entry(&good[..cut]);
        }
        let mut huge = good.clone();
        huge[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&huge), None);
    }

    #[test]
    fn lz4_legacy_round_trip() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut stream = Vec::new();
        stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
        stream.extend_from_slice(&block);
        stream.extend_from_slice(&(data.len() as u32).to_le_bytes()); // appended size
        assert_eq!(lz4_legacy(&stream).unwrap(), data);
    }

    #[test]
    fn not_a_kernel_is_a_clear_error() {
        let e = extract_vmlinux(b"hello").unwrap_err().to_string();
        assert!(e.contains("HdrS"), "{e}");
    }
}
