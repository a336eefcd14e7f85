//! The checks, in order; each reports one `CHECK` line.

use core::fmt::{self, Write};

use crate::hw::{self, alloc_page, bytes_eq, rd16, rd32, rd64, rd8, sum, wr32, wr64, wr8};
use crate::virtio::{Dev, Vq, POLL_LIMIT, R_CONFIG};

pub const F_VERSION_1: u64 = 1 << 32;
const CONSOLE_F_MULTIPORT: u64 = 1 << 1;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_FLUSH: u64 = 1 << 9;
const MAX_DEVICES: u64 = 19;
const PORT_NAME: &[u8] = b"org.kiln.agent.0";

struct Line {
    buf: [u8; 240],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() - 1 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

struct ConsolePort {
    tx: Vq,
    rx: Vq,
    tx_page: u64,
    rx_page: u64,
}

pub struct Ctx {
    pub ok: u32,
    pub fail: u32,
    line: Line,
    log: [u8; 8192],
    log_len: usize,
    console: Option<ConsolePort>,
    cmdline: [u8; 512],
    cmdline_len: usize,
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            ok: 0,
            fail: 0,
            line: Line {
                buf: [0; 240],
                len: 0,
            },
            log: [0; 8192],
            log_len: 0,
            console: None,
            cmdline: [0; 512],
            cmdline_len: 0,
        }
    }

    pub fn out(&mut self) -> &mut impl Write {
        &mut self.line
    }

    /// Send the current line to the serial port and the console port (or
    /// keep it until the console port is up).
    pub fn flush_line(&mut self) {
        let n = self.line.len;
        let line = self.line.buf;
        self.line.len = 0;
        let s = core::str::from_utf8(&line[..n]).unwrap_or("?\n");
        let _ = hw::Serial.write_str(s);
        match &mut self.console {
            Some(c) => console_send(c, &line[..n]),
            None => {
                let room = self.log.len() - self.log_len;
                let k = n.min(room);
                self.log[self.log_len..self.log_len + k].copy_from_slice(&line[..k]);
                self.log_len += k;
            }
        }
    }

    pub fn check(&mut self, name: &str, ok: bool, detail: fmt::Arguments) {
        if ok {
            self.ok += 1;
        } else {
            self.fail += 1;
        }
        let _ = write!(
            self.line,
            "CHECK {name} {} ",
            if ok { "ok" } else { "fail" }
        );
        let _ = self.line.write_fmt(detail);
        let _ = self.line.write_str("\n");
        self.flush_line();
    }

    pub fn arg(&self, key: &str) -> Option<&str> {
        let s = core::str::from_utf8(&self.cmdline[..self.cmdline_len]).ok()?;
        s.split(' ')
            .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }

    fn flag(&self, key: &str) -> bool {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len])
            .is_ok_and(|s| s.split(' ').any(|w| w == key))
    }

    fn num(&self, key: &str) -> u64 {
        self.arg(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

fn console_send(c: &mut ConsolePort, data: &[u8]) {
    for chunk in data.chunks(4096) {
        for (i, &b) in chunk.iter().enumerate() {
            wr8(c.tx_page + i as u64, b);
        }
        c.tx.call(&[(c.tx_page, chunk.len() as u32, false)]);
    }
}

pub fn run(ctx: &mut Ctx, si: u64) {
    // PVH start info.
    let magic = rd32(si);
    ctx.check(
        "pvh-start-info",
        magic == 0x336e_c578 && rd32(si + 4) >= 1,
        format_args!("magic={magic:#x} at {si:#x}"),
    );
    let nr_modules = rd32(si + 12);
    let modlist = rd64(si + 16);
    let cmdline = rd64(si + 24);
    let rsdp = rd64(si + 32);
    let memmap = rd64(si + 40);
    let memmap_entries = rd32(si + 48);

    // Command line.
    let mut n = 0;
    while n < ctx.cmdline.len() && cmdline != 0 && rd8(cmdline + n as u64) != 0 {
        ctx.cmdline[n] = rd8(cmdline + n as u64);
        n += 1;
    }
    ctx.cmdline_len = n;
    ctx.check(
        "cmdline",
        ctx.arg("kiln.testguest").is_some() || ctx.cmdline[..n].starts_with(b"kiln.testguest"),
        format_args!("{n} bytes at {cmdline:#x}"),
    );

    // Memory map: RAM below 640 KiB, reserved up to 1 MiB, RAM from 1 MiB.
    let mem_mib = ctx.num("mem_mib");
    let mut ram = 0u64;
    let mut reserved_ok = true;
    let mut himem_ok = false;
    for i in 0..u64::from(memmap_entries) {
        let e = memmap + 24 * i;
        let (addr, size, kind) = (rd64(e), rd64(e + 8), rd32(e + 16));
        if kind == 1 {
            ram += size;
            himem_ok |= addr == 0x10_0000;
        }
        // No RAM in the legacy hole [0x9fc00, 1 MiB).
        if kind == 1 && addr < 0x10_0000 && addr + size > 0x9fc00 {
            reserved_ok = false;
        }
    }
    let expect = mem_mib * (1 << 20) - (0x10_0000 - 0x9fc00);
    ctx.check(
        "memmap",
        ram == expect && reserved_ok && himem_ok,
        format_args!("{memmap_entries} entries, {ram} bytes RAM (expected {expect})"),
    );

    // `touch_ram`: write every page of RAM from 16 MiB up (this guest and
    // its page pool live below), so that the VMM process's memory grows to
    // the guest's size: the cgroup test sets a smaller limit and expects
    // the VMM to be killed before the check is reported.
    if ctx.flag("touch_ram") {
        let mut touched = 0u64;
        for i in 0..u64::from(memmap_entries) {
            let e = memmap + 24 * i;
            let (addr, size, kind) = (rd64(e), rd64(e + 8), rd32(e + 16));
            if kind != 1 {
                continue;
            }
            let mut page = addr.max(16 << 20);
            while page + 4096 <= addr + size {
                wr8(page, 0xa5);
                page += 4096;
                touched += 4096;
            }
        }
        ctx.check(
            "touch-ram",
            true,
            format_args!("{} MiB touched", touched >> 20),
        );
    }

    // Initrd: one module with a known pattern.
    let len = ctx.num("initrd_len");
    let seed = ctx.num("initrd_seed");
    let (paddr, size) = if nr_modules >= 1 {
        (rd64(modlist), rd64(modlist + 8))
    } else {
        (0, 0)
    };
    let pattern_ok = size == len
        && (0..len).all(|i| rd8(paddr + i) == (i.wrapping_mul(7).wrapping_add(seed) & 0xff) as u8);
    ctx.check(
        "initrd",
        nr_modules == 1 && paddr % 4096 == 0 && pattern_ok,
        format_args!("{size} bytes at {paddr:#x}"),
    );

    let windows = check_acpi(ctx, rsdp);
    let found = scan_virtio(ctx, &windows);
    check_console(ctx, &found);
    for d in found.iter().flatten() {
        if d.device_id() == 2 {
            check_block(ctx, *d);
        }
    }
    for d in found.iter().flatten() {
        if d.device_id() == 4 {
            check_rng(ctx, *d);
        }
    }
    for d in found.iter().flatten() {
        if d.device_id() == 1 {
            crate::net::check_net(ctx, *d);
        }
    }
    check_console_rx(ctx);
}

/// Find the RSDP in the BIOS area when the start info does not name it.
fn find_rsdp() -> u64 {
    (0xe0000..0x100000u64)
        .step_by(16)
        .find(|&a| bytes_eq(a, b"RSD PTR "))
        .unwrap_or(0xe0000)
}

/// The virtio-mmio windows the DSDT describes: the first `Memory32Fixed`
/// after each `LNRO0005`.
pub struct Windows {
    pub bases: [u64; MAX_DEVICES as usize],
    pub n: usize,
}

fn check_acpi(ctx: &mut Ctx, rsdp: u64) -> Windows {
    let rsdp = if rsdp == 0 { find_rsdp() } else { rsdp };
    let ok = bytes_eq(rsdp, b"RSD PTR ")
        && sum(rsdp, 20) == 0
        && rd8(rsdp + 15) == 2
        && sum(rsdp, 36) == 0;
    ctx.check("acpi-rsdp", ok, format_args!("at {rsdp:#x}"));
    let xsdt = rd64(rsdp + 24);
    let table_ok =
        |a: u64, sig: &[u8]| a != 0 && bytes_eq(a, sig) && sum(a, u64::from(rd32(a + 4))) == 0;
    ctx.check(
        "acpi-xsdt",
        table_ok(xsdt, b"XSDT"),
        format_args!("at {xsdt:#x}"),
    );
    let entries = (u64::from(rd32(xsdt + 4)).saturating_sub(36)) / 8;
    let (mut fadt, mut madt) = (0, 0);
    for i in 0..entries.min(16) {
        let t = rd64(xsdt + 36 + 8 * i);
        if bytes_eq(t, b"FACP") {
            fadt = t;
        } else if bytes_eq(t, b"APIC") {
            madt = t;
        }
    }
    let hw_reduced = fadt != 0 && rd32(fadt + 112) & (1 << 20) != 0;
    ctx.check(
        "acpi-fadt",
        table_ok(fadt, b"FACP") && hw_reduced,
        format_args!("at {fadt:#x}, hardware-reduced={hw_reduced}"),
    );
    let dsdt = if fadt != 0 { rd64(fadt + 140) } else { 0 };
    let dlen = if dsdt != 0 {
        u64::from(rd32(dsdt + 4))
    } else {
        0
    };
    let count = |pat: &[u8]| {
        (0..dlen.saturating_sub(pat.len() as u64))
            .filter(|&i| bytes_eq(dsdt + i, pat))
            .count() as u64
    };
    let lnro = count(b"LNRO0005");
    let mut win = Windows {
        bases: [0; MAX_DEVICES as usize],
        n: 0,
    };
    for i in 0..dlen.saturating_sub(8) {
        if win.n < win.bases.len() && bytes_eq(dsdt + i, b"LNRO0005") {
            // Memory32Fixed: 0x86, length 9, read/write flag, base, size.
            if let Some(j) =
                (i..(i + 96).min(dlen)).find(|&j| rd8(dsdt + j) == 0x86 && rd16(dsdt + j + 1) == 9)
            {
                win.bases[win.n] = u64::from(rd32(dsdt + j + 4));
                win.n += 1;
            }
        }
    }
    let com1 = count(b"COM1");
    ctx.check(
        "acpi-dsdt",
        table_ok(dsdt, b"DSDT") && lnro >= ctx.num("virtio") && com1 == 1,
        format_args!("at {dsdt:#x}, {dlen} bytes, {lnro} LNRO0005, COM1={com1}"),
    );
    let mlen = if madt != 0 {
        u64::from(rd32(madt + 4))
    } else {
        0
    };
    let (mut lapics, mut ioapics, mut ioapic_addr, mut first_ioapic) = (0, 0, 0, 0);
    let mut off = 44;
    while off + 2 <= mlen {
        let (kind, len) = (rd8(madt + off), u64::from(rd8(madt + off + 1)));
        if kind == 0 && rd32(madt + off + 4) & 1 == 1 {
            lapics += 1;
        } else if kind == 1 {
            ioapics += 1;
            ioapic_addr = rd32(madt + off + 4);
            if first_ioapic == 0 {
                first_ioapic = ioapic_addr;
            }
        }
        if len == 0 {
            break;
        }
        off += len;
    }
    ctx.check(
        "acpi-madt",
        table_ok(madt, b"APIC")
            && lapics == ctx.num("vcpus")
            && ioapics >= 1
            && first_ioapic == 0xfec0_0000,
        format_args!(
            "{lapics} LAPIC, {ioapics} IOAPIC (first at {first_ioapic:#x}, last at {ioapic_addr:#x}), LAPIC at {:#x}",
            rd32(madt + 36)
        ),
    );
    win
}

fn scan_virtio(ctx: &mut Ctx, win: &Windows) -> [Option<Dev>; MAX_DEVICES as usize] {
    let mut found = [None; MAX_DEVICES as usize];
    let mut n = 0;
    for (i, &base) in win.bases[..win.n].iter().enumerate() {
        let d = Dev { base };
        // Unused windows (QEMU lists eight) read device ID 0.
        if d.present() && d.device_id() != 0 {
            found[i] = Some(d);
            n += 1;
        }
    }
    let expected = ctx.num("virtio");
    ctx.check(
        "virtio-mmio-scan",
        n == expected && n > 0,
        format_args!(
            "{n} devices in {} DSDT windows from {:#x}, expected {expected}",
            win.n, win.bases[0]
        ),
    );
    found
}

fn ctrl_msg(page: u64, id: u32, event: u16, value: u16) -> (u64, u32, bool) {
    wr32(page, id);
    crate::hw::wr16(page + 4, event);
    crate::hw::wr16(page + 6, value);
    (page, 8, false)
}

fn check_console(ctx: &mut Ctx, found: &[Option<Dev>]) {
    let Some(dev) = found.iter().flatten().copied().find(|d| d.device_id() == 3) else {
        ctx.check(
            "virtio-console-init",
            false,
            format_args!("no console device"),
        );
        return;
    };
    // Ports 0..max_ports: port 0 uses queues 0/1, control 2/3, port n 2+2n/3+2n.
    let mut q = [Vq::empty(); 8];
    let max_ports = dev.r(R_CONFIG + 4).clamp(1, 3);
    let nq = 2 + 2 * max_ports as u16;
    if let Err(e) = dev.init(F_VERSION_1 | CONSOLE_F_MULTIPORT, nq, &mut q) {
        ctx.check("virtio-console-init", false, format_args!("{e}"));
        return;
    }
    ctx.check(
        "virtio-console-init",
        true,
        format_args!("multiport, max_nr_ports={max_ports}"),
    );
    let (mut crx, mut cq) = (q[2], q[3]);
    let cpage = alloc_page();
    for i in 0..4 {
        crx.submit(&[(cpage + 256 * i, 256, true)]);
    }
    let out = alloc_page();
    cq.call(&[ctrl_msg(out, 0, 0, 1)]); // DEVICE_READY
    let mut named: Option<u32> = None;
    let mut open = [false; 4];
    let mut added = 0;
    for _ in 0..16 {
        let Some((head, len)) = crx.wait_used(POLL_LIMIT) else {
            break;
        };
        // The buffer is whatever the head descriptor points at.
        let buf = rd64(crx.desc + 16 * u64::from(head));
        let (id, event, value) = (rd32(buf), rd16(buf + 4), rd16(buf + 6));
        match event {
            1 if id < max_ports => {
                added += 1;
                cq.call(&[ctrl_msg(out, id, 3, 1)]); // PORT_READY
            }
            7 => {
                let n = (len as usize).saturating_sub(8).min(64);
                let mut name = [0u8; 64];
                for (i, b) in name.iter_mut().enumerate().take(n) {
                    *b = rd8(buf + 8 + i as u64);
                }
                let end = name[..n].iter().position(|&b| b == 0).unwrap_or(n);
                if &name[..end] == PORT_NAME {
                    named = Some(id);
                }
            }
            6 if id < 4 => open[id as usize] = value == 1,
            _ => {}
        }
        crx.submit(&[(buf, 256, true)]);
        if named.is_some_and(|p| open[p as usize]) {
            break;
        }
    }
    let Some(port) = named else {
        ctx.check(
            "console-port-name",
            false,
            format_args!("{added} ports added, none named {}", "org.kiln.agent.0"),
        );
        return;
    };
    ctx.check(
        "console-port-name",
        open[port as usize],
        format_args!(
            "port {port} of {added} is org.kiln.agent.0, host_open={}",
            open[port as usize]
        ),
    );
    cq.call(&[ctrl_msg(out, port, 6, 1)]); // PORT_OPEN from the guest
    let rxq = if port == 0 { 0 } else { 2 + 2 * port as usize };
    let (mut rx, tx) = (q[rxq], q[rxq + 1]);
    let rx_page = alloc_page();
    rx.submit(&[(rx_page, 4096, true)]);
    let mut p = ConsolePort {
        tx,
        rx,
        tx_page: alloc_page(),
        rx_page,
    };
    // Everything reported so far goes out on the port now.
    let log = ctx.log;
    console_send(&mut p, &log[..ctx.log_len]);
    ctx.console = Some(p);
}

fn check_block(ctx: &mut Ctx, dev: Dev) {
    let offered = dev.features();
    let mut q = [Vq::empty(); 1];
    if let Err(e) = dev.init(
        F_VERSION_1 | (offered & (BLK_F_RO | BLK_F_FLUSH)),
        1,
        &mut q,
    ) {
        ctx.check("virtio-blk-init", false, format_args!("{e}"));
        return;
    }
    let mut q = q[0];
    let req = alloc_page();
    let data = alloc_page();
    let status = req + 16;
    let request =
        |q: &mut Vq, kind: u32, sector: u64, len: u32, write_data: bool| -> (u8, Option<u32>) {
            wr32(req, kind);
            wr32(req + 4, 0);
            wr64(req + 8, sector);
            wr8(status, 0xff);
            let n = if len == 0 {
                q.call(&[(req, 16, false), (status, 1, true)])
            } else {
                q.call(&[
                    (req, 16, false),
                    (data, len, !write_data),
                    (status, 1, true),
                ])
            };
            (rd8(status), n)
        };
    let (st, _) = request(&mut q, 8, 0, 20, false);
    let mut serial = [0u8; 20];
    for (i, b) in serial.iter_mut().enumerate() {
        *b = rd8(data + i as u64);
    }
    let slen = serial.iter().position(|&b| b == 0).unwrap_or(20);
    let serial_str = core::str::from_utf8(&serial[..slen]).unwrap_or("?");
    let is_ro = ctx.arg("disk_ro") == Some(serial_str);
    let is_rw = ctx.arg("disk_rw") == Some(serial_str);
    ctx.check(
        "virtio-blk-get-id",
        st == 0 && (is_ro || is_rw),
        format_args!("serial={serial_str}"),
    );
    let capacity = u64::from(dev.r(R_CONFIG)) | (u64::from(dev.r(R_CONFIG + 4)) << 32);
    if is_ro {
        let (st, n) = request(&mut q, 0, 0, 512, false);
        let ok = (0..512u64).all(|i| rd8(data + i) == ((i * 13 + 5) & 0xff) as u8);
        ctx.check(
            "virtio-blk-read",
            st == 0 && n == Some(513) && ok && capacity == ctx.num("disk_ro_sectors"),
            format_args!("status={st} pattern={ok} capacity={capacity}"),
        );
        let (st, _) = request(&mut q, 1, 0, 512, true);
        ctx.check(
            "virtio-blk-ro",
            offered & BLK_F_RO != 0 && st == 1,
            format_args!("write status={st}"),
        );
        // A malformed chain: data buffer far outside guest memory. The
        // device must return it (no status) and keep working. (QEMU marks
        // the device broken instead: `no_bad_chain` skips this there.)
        if !ctx.flag("no_bad_chain") {
            wr8(status, 0xff);
            let n = q.call(&[
                (req, 16, false),
                (0x7f_0000_0000, 512, true),
                (status, 1, true),
            ]);
            let (st2, _) = request(&mut q, 0, 0, 512, false);
            ctx.check(
                "virtio-blk-bad-chain",
                n == Some(0) && st2 == 0,
                format_args!("bad request used len={n:?}, next request status={st2}"),
            );
        }
    } else if is_rw {
        for i in 0..512u64 {
            wr8(data + i, (0x5a ^ i) as u8);
        }
        let (w, _) = request(&mut q, 1, 1, 512, true);
        let (f, _) = request(&mut q, 4, 0, 0, false);
        for i in 0..512u64 {
            wr8(data + i, 0);
        }
        let (r, _) = request(&mut q, 0, 1, 512, false);
        let ok = (0..512u64).all(|i| rd8(data + i) == (0x5a ^ i) as u8);
        ctx.check(
            "virtio-blk-write",
            w == 0 && f == 0 && r == 0 && ok,
            format_args!("write={w} flush={f} read={r} match={ok}"),
        );
    }
}

fn check_rng(ctx: &mut Ctx, dev: Dev) {
    let mut q = [Vq::empty(); 1];
    if let Err(e) = dev.init(F_VERSION_1, 1, &mut q) {
        ctx.check("virtio-rng", false, format_args!("{e}"));
        return;
    }
    let buf = alloc_page();
    let n = q[0].call(&[(buf, 32, true)]);
    let nonzero = (0..32).any(|i| rd8(buf + i) != 0);
    ctx.check(
        "virtio-rng",
        n == Some(32) && nonzero,
        format_args!("got {n:?} bytes"),
    );
}

/// A mark the guest leaves in its own memory after the ping (snapshot
/// tests: a VM restored after another wrote it must not see it).
static mut MARKER: [u8; 16] = [0; 16];

fn check_console_rx(ctx: &mut Ctx) {
    let _ = writeln!(ctx.out(), "WAIT ping");
    ctx.flush_line();
    // `wait_forever`: the host may snapshot the guest here and restore it
    // much later, so no poll limit.
    let forever = ctx.flag("wait_forever");
    let Some(port) = ctx.console.as_mut() else {
        return;
    };
    let got = port
        .rx
        .wait_used(if forever { u64::MAX } else { POLL_LIMIT * 4 });
    let rx_page = port.rx_page;
    let ok = matches!(got, Some((_, n)) if n >= 4) && bytes_eq(rx_page, b"ping");
    ctx.check("console-rx", ok, format_args!("{got:?}"));
    if forever {
        // "ping <tag>": report the marker as found, then set it to the tag.
        let n = got.map_or(0, |(_, n)| n as u64).min(4096);
        let mut tag = [0u8; 16];
        let mut len = 0;
        for i in 5..n {
            let b = rd8(rx_page + i);
            if b == b'\n' || len == tag.len() {
                break;
            }
            tag[len] = b;
            len += 1;
        }
        // SAFETY: single-threaded guest; nothing else touches MARKER.
        let before = unsafe { core::ptr::addr_of_mut!(MARKER).read_volatile() };
        // SAFETY: as above.
        unsafe { core::ptr::addr_of_mut!(MARKER).write_volatile(tag) };
        let blen = before.iter().position(|&b| b == 0).unwrap_or(16);
        fn show(b: &[u8]) -> &str {
            core::str::from_utf8(b).unwrap_or("?")
        }
        let (b, t) = (show(&before[..blen]), show(&tag[..len]));
        ctx.check(
            "memory-marker",
            blen == 0 && len > 0,
            format_args!("before='{b}' after='{t}'"),
        );
    }
}
