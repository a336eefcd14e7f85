//! The virtio-net check: the MAC in config space, then frames both ways
//! through whatever backend the host test put behind the device. The host
//! answers the guest's frame with one of its own; the oversize and short
//! frames sent before it must be returned by the device without reaching
//! the host (the host test checks it saw exactly one frame).

use crate::checks::{Ctx, F_VERSION_1};
use crate::hw::{alloc_page, bytes_eq, rd8, wr16, wr8};
use crate::virtio::{Dev, Vq, POLL_LIMIT, R_CONFIG};

const NET_F_MAC: u64 = 1 << 5;
const HDR: u64 = 12;
/// What the guest sends, and what the host answers (after the Ethernet
/// header); `vmm/tests/testguest.rs` knows both.
const GUEST_PAYLOAD: &[u8] = b"kiln-testguest frame";
const HOST_PAYLOAD: &[u8] = b"kiln-host frame";
const ETHERTYPE: u16 = 0x88b5;

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// `net_mac=525400abcdef` from the command line.
fn expected_mac(ctx: &Ctx) -> Option<[u8; 6]> {
    let s = ctx.arg("net_mac")?.as_bytes();
    if s.len() != 12 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        *m = hex(s[2 * i])? << 4 | hex(s[2 * i + 1])?;
    }
    Some(mac)
}

/// Write a virtio header and an Ethernet frame of `len` bytes (broadcast,
/// from `mac`, ending in `payload`) at `page`; returns the chain's length.
fn frame(page: u64, mac: &[u8; 6], len: u64, payload: &[u8]) -> u32 {
    for i in 0..HDR + len {
        wr8(page + i, 0);
    }
    let eth = page + HDR;
    for i in 0..6 {
        wr8(eth + i, 0xff);
        wr8(eth + 6 + i, mac[i as usize]);
    }
    wr16(eth + 12, ETHERTYPE.to_be());
    for (i, &b) in payload.iter().enumerate() {
        if 14 + (i as u64) < len {
            wr8(eth + 14 + i as u64, b);
        }
    }
    (HDR + len) as u32
}

pub fn check_net(ctx: &mut Ctx, dev: Dev) {
    let mut q = [Vq::empty(); 2];
    if let Err(e) = dev.init(F_VERSION_1 | NET_F_MAC, 2, &mut q) {
        ctx.check("virtio-net-init", false, format_args!("{e}"));
        return;
    }
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        *m = rd8(dev.base + R_CONFIG + i as u64);
    }
    ctx.check(
        "virtio-net-mac",
        Some(mac) == expected_mac(ctx),
        format_args!("{mac:02x?}"),
    );
    let [rx, tx] = &mut q;
    let rx_page = alloc_page();
    rx.submit(&[(rx_page, 2048, true)]);
    let tx_page = alloc_page();
    // Oversize (MTU 1500 + 18 + 1) and shorter than an Ethernet header:
    // returned unread, never on the wire.
    let big = frame(tx_page, &mac, 1519, GUEST_PAYLOAD);
    let a = tx.call(&[(tx_page, big, false)]);
    let b = tx.call(&[(tx_page, HDR as u32 + 6, false)]);
    let good = frame(tx_page, &mac, 60, GUEST_PAYLOAD);
    let c = tx.call(&[(tx_page, good, false)]);
    ctx.check(
        "virtio-net-tx",
        a == Some(0) && b == Some(0) && c == Some(0),
        format_args!("oversize {a:?} short {b:?} frame {c:?}"),
    );
    let got = rx.wait_used(POLL_LIMIT * 4);
    let ok = matches!(got, Some((_, n)) if n as u64 >= HDR + 14 + HOST_PAYLOAD.len() as u64)
        && rd8(rx_page + 10) == 1
        && bytes_eq(rx_page + HDR, &mac)
        && bytes_eq(rx_page + HDR + 14, HOST_PAYLOAD);
    ctx.check("virtio-net-rx", ok, format_args!("{got:?}"));
}
