//! ACPI tables: RSDP (at 0xe0000) → XSDT → FADT (hardware-reduced) → DSDT,
//! and the MADT. The DSDT describes each virtio-mmio device as `LNRO0005`
//! (how a stock kernel without `virtio_mmio.device=` support finds them),
//! COM1 as `PNP0501` and the i8042 as `PNP0303`.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{ACPI_START, RSDP_ADDR};
use super::devices::serial::{COM1_BASE, COM1_IRQ};
use super::memory::{IOAPIC_ADDR, LAPIC_ADDR};

pub const OEM_ID: [u8; 6] = *b"KILN  ";
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// "CMOS RTC Not Present": Linux then registers no `rtc_cmos` device
/// (`acpi_parse_fadt`, `add_rtc_cmos`) and never probes ports 0x70/0x71,
/// where nothing answers. Linux reads this flag from hardware-reduced FADTs
/// too.
pub const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit below the RSDP ({0} bytes)")]
    TooLarge(u64),
    #[error("writing ACPI tables into guest memory failed at {0:#x}")]
    Memory(u64),
    #[error("ACPI describes at most 255 vCPUs, not {0}")]
    TooManyCpus(u32),
}

/// A virtio-mmio device as the guest must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// The DSDT: `\_SB_` with one `LNRO0005` device per virtio-mmio window,
/// COM1 and the i8042.
pub fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut children_bytes: Vec<Vec<u8>> = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let name = format!("V{i:03}");
        let uid = i as u32;
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uidn = aml::Name::new("_UID".into(), &uid);
        let cca = aml::Name::new("_CCA".into(), &aml::ONE);
        let crsn = aml::Name::new("_CRS".into(), &crs);
        let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uidn, &cca, &crsn]);
        let mut b = Vec::new();
        dev.to_aml_bytes(&mut b);
        children_bytes.push(b);
    }
    {
        let io = aml::IO::new(COM1_BASE, COM1_BASE, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let crsn = aml::Name::new("_CRS".into(), &crs);
        let dev = aml::Device::new("COM1".into(), vec![&hid, &uid, &crsn]);
        let mut b = Vec::new();
        dev.to_aml_bytes(&mut b);
        children_bytes.push(b);
    }
    {
        let data = aml::IO::new(0x60, 0x60, 1, 1);
        let cmd = aml::IO::new(0x64, 0x64, 1, 1);
        let irq = aml::Interrupt::new(true, true, false, false, 1);
        let crs = aml::ResourceTemplate::new(vec![&data, &cmd, &irq]);
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
        let crsn = aml::Name::new("_CRS".into(), &crs);
        let dev = aml::Device::new("PS2_".into(), vec![&hid, &crsn]);
        let mut b = Vec::new();
        dev.to_aml_bytes(&mut b);
        children_bytes.push(b);
    }
    let raw: Vec<RawAml> = children_bytes.into_iter().map(RawAml).collect();
    let refs: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
    aml::Scope::new("_SB_".into(), refs).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"KILNDSDT", 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

pub fn madt(vcpus: u32) -> Result<Vec<u8>, AcpiError> {
    let mut m = MADT::new(
        OEM_ID,
        *b"KILNMADT",
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..vcpus {
        let id = u8::try_from(i).map_err(|_| AcpiError::TooManyCpus(vcpus))?;
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    Ok(bytes(&m))
}

pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"KILNFACP", 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_NO_CMOS_RTC).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"KILNKVM\0").into();
    bytes(&b.finalize())
}

/// Write all tables into guest memory; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u32,
    devices: &[MmioDeviceInfo],
) -> Result<u64, AcpiError> {
    let mut next = ACPI_START;
    let mut put = |data: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        let end = at + data.len() as u64;
        if end > RSDP_ADDR {
            return Err(AcpiError::TooLarge(end - ACPI_START));
        }
        mem.write_slice(data, GuestAddress(at))
            .map_err(|_| AcpiError::Memory(at))?;
        next = (end + 7) & !7;
        Ok(at)
    };
    let dsdt_addr = put(&dsdt(devices))?;
    let fadt_addr = put(&fadt(dsdt_addr))?;
    let madt_addr = put(&madt(vcpus)?)?;
    let mut x = XSDT::new(OEM_ID, *b"KILNXSDT", 1);
    x.add_entry(fadt_addr);
    x.add_entry(madt_addr);
    let xsdt_addr = put(&bytes(&x))?;
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(RSDP_ADDR))
        .map_err(|_| AcpiError::Memory(RSDP_ADDR))?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    fn devs() -> Vec<MmioDeviceInfo> {
        (0..3)
            .map(|i| MmioDeviceInfo {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = super::super::memory::create(32).unwrap();
        let rsdp = write_tables(&mem, 2, &devs()).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let read_table = |at: u64| {
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(at)).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(at)).unwrap();
            assert_eq!(
                sum(&t),
                0,
                "checksum of {}",
                String::from_utf8_lossy(&t[..4])
            );
            t
        };
        let x = read_table(xsdt);
        assert_eq!(&x[..4], b"XSDT");
        let entries: Vec<u64> = x[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let f = read_table(entries[0]);
        assert_eq!(&f[..4], b"FACP");
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let iapc = u16::from_le_bytes(f[109..111].try_into().unwrap());
        assert_eq!(
            iapc,
            IAPC_VGA_NOT_PRESENT | IAPC_NO_CMOS_RTC,
            "IAPC_BOOT_ARCH: no VGA, no CMOS RTC"
        );
        let x_dsdt = u64::from_le_bytes(f[140..148].try_into().unwrap());
        let d = read_table(x_dsdt);
        assert_eq!(&d[..4], b"DSDT");
        assert_eq!(d.windows(8).filter(|w| w == b"LNRO0005").count(), 3);
        let m = read_table(entries[1]);
        assert_eq!(&m[..4], b"APIC");
        // Two local APICs (type 0) and one IOAPIC (type 1) after the 44-byte header.
        let mut kinds = Vec::new();
        let mut off = 44;
        while off + 2 <= m.len() {
            kinds.push(m[off]);
            off += m[off + 1] as usize;
        }
        assert_eq!(kinds, vec![0, 0, 1]);
    }

    /// Disassemble our DSDT with `iasl -d` when it is installed.
    #[test]
    fn iasl_disassembles_the_dsdt() {
        if !kiln_testkit::require(
            "iasl_disassembles_the_dsdt",
            &[kiln_testkit::tool("iasl", "acpica-tools")],
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsdt.aml");
        std::fs::write(&path, dsdt(&devs())).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl failed: {log}");
        assert!(!log.contains("Error"), "{log}");
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        assert!(dsl.contains("LNRO0005"), "{dsl}");
        assert!(dsl.contains("PNP0501"), "{dsl}");
        assert!(
            dsl.contains("Memory32Fixed (ReadWrite,\n") || dsl.contains("Memory32Fixed"),
            "{dsl}"
        );
    }
}
