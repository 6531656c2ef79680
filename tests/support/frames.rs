//! Ethernet/ARP/IPv4/ICMP frames for tests, built and recognised by hand.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const BROADCAST: [u8; 6] = [0xff; 6];

pub fn mac(last: u8) -> [u8; 6] {
    [0x02, 0x00, 0x5e, 0x00, 0x00, last]
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend(dst);
    f.extend(src);
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4];
    p.extend(op.to_be_bytes());
    p.extend(sha);
    p.extend(spa.octets());
    p.extend(tha);
    p.extend(tpa.octets());
    p
}

pub fn arp_request(src: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    eth(BROADCAST, src, 0x0806, &arp(1, src, spa, [0; 6], tpa))
}

/// If `f` is an ARP reply from `ip`, the MAC it announces.
pub fn arp_reply_from(f: &[u8], ip: Ipv4Addr) -> Option<[u8; 6]> {
    (f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == ip.octets())
        .then(|| f[22..28].try_into().unwrap())
}

pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend(src.octets());
    h.extend(dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend(payload);
    h
}

/// An ICMPv6 echo request from `src` to `dst`.
#[allow(dead_code)] // not every test binary uses it
pub fn icmp6_echo(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, seq: u16) -> Vec<u8> {
    let mut icmp = vec![128, 0, 0, 0, 0x12, 0x34];
    icmp.extend(seq.to_be_bytes());
    icmp.extend(b"wsnic");
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((icmp.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, 58]);
    pseudo.extend(&icmp);
    let c = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend((icmp.len() as u16).to_be_bytes());
    ip.extend([58, 64]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip.extend(icmp);
    eth(dst_mac, src_mac, 0x86dd, &ip)
}

/// ICMP echo request (type 8) or reply (type 0).
#[allow(clippy::too_many_arguments)]
pub fn icmp_echo(
    kind: u8,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, 0, 0, 0];
    icmp.extend(id.to_be_bytes());
    icmp.extend(seq.to_be_bytes());
    icmp.extend(data);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    eth(dst_mac, src_mac, 0x0800, &ipv4(src, dst, 1, &icmp))
}

/// (source IP, destination IP, ICMP type, id, seq) of an ICMP frame.
pub fn icmp_of(f: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, u16, u16)> {
    if f.len() < 42 || f[12..14] != [8, 0] || f[23] != 1 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let i = 14 + ihl;
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    Some((ip(26), ip(30), f[i], u16::from_be_bytes([f[i + 4], f[i + 5]]), u16::from_be_bytes([f[i + 6], f[i + 7]])))
}

/// What a guest at (`mac`, `ip`) answers to `f`: ARP requests for `ip`, pings to `ip`.
pub fn answer(f: &[u8], mac: [u8; 6], ip: Ipv4Addr) -> Option<Vec<u8>> {
    if ip.is_unspecified() || f.len() < 42 {
        return None;
    }
    let src: [u8; 6] = f[6..12].try_into().unwrap();
    if f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[38..42] == ip.octets() {
        let spa = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
        return Some(eth(src, mac, 0x0806, &arp(2, mac, ip, src, spa)));
    }
    let (s, d, kind, id, seq) = icmp_of(f)?;
    if kind == 8 && d == ip {
        let ihl = usize::from(f[14] & 0x0f) * 4;
        return Some(icmp_echo(0, mac, src, ip, s, id, seq, &f[14 + ihl + 8..]));
    }
    None
}

/// A DHCP client message (BOOTREQUEST) from `mac`, broadcast from 0.0.0.0:68 to
/// 255.255.255.255:67: message type `kind` (1 DISCOVER, 3 REQUEST, 7 RELEASE, …), with the
/// requested address (50) and server identifier (54) when given.
pub fn dhcp_client(
    kind: u8,
    mac: [u8; 6],
    xid: u32,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
    ciaddr: Ipv4Addr,
) -> Vec<u8> {
    let mut m = vec![1u8, 1, 6, 0];
    m.extend(xid.to_be_bytes());
    m.extend([0, 0, 0x80, 0]); // secs, flags: broadcast
    m.extend(ciaddr.octets());
    m.extend([0u8; 12]); // yiaddr, siaddr, giaddr
    m.extend(mac);
    m.extend([0u8; 10 + 64 + 128]);
    m.extend([99, 130, 83, 99, 53, 1, kind]);
    if let Some(r) = requested {
        m.extend([50, 4]);
        m.extend(r.octets());
    }
    if let Some(s) = server {
        m.extend([54, 4]);
        m.extend(s.octets());
    }
    m.extend([55, 3, 1, 3, 6, 255]);
    while m.len() < 300 {
        m.push(0);
    }
    let (src, dst) = (if ciaddr.is_unspecified() { Ipv4Addr::UNSPECIFIED } else { ciaddr }, Ipv4Addr::BROADCAST);
    let mut udp = vec![0, 68, 0, 67];
    udp.extend(((8 + m.len()) as u16).to_be_bytes());
    udp.extend([0, 0]);
    udp.extend(&m);
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, 17]);
    pseudo.extend((udp.len() as u16).to_be_bytes());
    pseudo.extend(&udp);
    let c = checksum(&pseudo);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    eth(BROADCAST, mac, 0x0800, &ipv4(src, dst, 17, &udp))
}

/// If `f` is a DHCP server message for `xid`: (message type, yiaddr, server id).
pub fn dhcp_reply(f: &[u8], xid: u32) -> Option<(u8, Ipv4Addr, Option<Ipv4Addr>)> {
    if f.len() < 14 + 20 + 8 + 240 || f[12..14] != [8, 0] || f[23] != 17 {
        return None;
    }
    let udp = 14 + usize::from(f[14] & 0x0f) * 4;
    if f[udp..udp + 4] != [0, 67, 0, 68] {
        return None;
    }
    let m = &f[udp + 8..];
    if m[0] != 2 || m[4..8] != xid.to_be_bytes() || m[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let yiaddr = Ipv4Addr::new(m[16], m[17], m[18], m[19]);
    let (mut kind, mut server) = (0, None);
    let mut i = 240;
    while i + 1 < m.len() && m[i] != 255 {
        if m[i] == 0 {
            i += 1;
            continue;
        }
        let (code, len) = (m[i], usize::from(m[i + 1]));
        let v = m.get(i + 2..i + 2 + len)?;
        match code {
            53 => kind = v[0],
            54 if len == 4 => server = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
            _ => {}
        }
        i += 2 + len;
    }
    Some((kind, yiaddr, server))
}
