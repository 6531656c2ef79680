//! Minimal synchronous rtnetlink client: looks up, creates, configures and
//! deletes links, IPv4 addresses and reads the default route, one blocking
//! request/reply exchange at a time over a single `NETLINK_ROUTE` socket.
//!
//! Kernel errors are returned as `io::Error::from_raw_os_error(errno)` so
//! callers can match on `raw_os_error()`.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    DefaultNla, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData,
    LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkProtoInfoBridge,
};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Receive buffer size. The kernel sizes dump datagrams after the reader's
/// buffer (capped at 32 KiB by default), so 64 KiB always suffices.
const RECV_BUF: usize = 64 * 1024;

/// Linux IFNAMSIZ including the terminating NUL.
const IFNAMSIZ: usize = 16;

/// `IFLA_BRPORT_ISOLATED` (linux/if_link.h), a u8 inside `IFLA_PROTINFO`.
const IFLA_BRPORT_ISOLATED: u16 = 33;
/// `IFLA_BRPORT_STATE` (a u8) and `IFLA_BRPORT_FLUSH` (no payload), inside `IFLA_PROTINFO`.
const IFLA_BRPORT_STATE: u16 = 1;
const IFLA_BRPORT_FLUSH: u16 = 24;
/// Bridge port states (linux/if_bridge.h).
const BR_STATE_DISABLED: u8 = 0;
const BR_STATE_FORWARDING: u8 = 3;

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { socket, seq: 0, buf: Vec::with_capacity(RECV_BUF) })
    }

    /// The MAC address of link `index`, if it has a 6-byte one.
    pub fn link_mac(&mut self, index: u32) -> io::Result<Option<[u8; 6]>> {
        let Some(link) = self.get_link(link_msg(index))? else {
            return Ok(None);
        };
        Ok(link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => mac.try_into().ok(),
            _ => None,
        }))
    }

    /// Index of the link called `name`, or `None` if there is no such link.
    pub fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        check_ifname(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.get_link(msg)? {
            Some(link) => Ok(Some(link.header.index)),
            None => Ok(None),
        }
    }

    /// Name of the link with index `index`, or `None` if there is no such link.
    pub fn link_name(&mut self, index: u32) -> io::Result<Option<String>> {
        let Some(link) = self.get_link(link_msg(index))? else {
            return Ok(None);
        };
        Ok(link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name),
            _ => None,
        }))
    }

    /// Whether link `index` is a Linux bridge (`IFLA_INFO_KIND` "bridge").
    pub fn link_is_bridge(&mut self, index: u32) -> io::Result<bool> {
        let link = self.get_link(link_msg(index))?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        Ok(link.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
            _ => false,
        }))
    }

    /// Whether bridge `index` has multicast snooping on (`IFLA_BR_MCAST_SNOOPING`; false if
    /// the kernel does not report it). `ENODEV` if there is no such link.
    pub fn bridge_snooping(&mut self, index: u32) -> io::Result<bool> {
        let link = self.get_link(link_msg(index))?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        Ok(link.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| match i {
                LinkInfo::Data(InfoData::Bridge(opts)) => opts.contains(&InfoBridge::MulticastSnooping(true)),
                _ => false,
            }),
            _ => false,
        }))
    }

    /// Create a (down) bridge called `name`, without multicast snooping; fails with
    /// `EEXIST` if a link of that name already exists. Returns the new link's index.
    ///
    /// Snooping only forwards a group to the ports that joined it once a querier is
    /// heard, and wsnic's bridge has none, so it floods multicast either way; but with
    /// snooping on, every port that comes up or goes down makes the kernel walk every
    /// other port of the bridge (`br_port_state_selection` → `br_multicast_enable_port`)
    /// under the RTNL lock, a cost that grows with the number of clients.
    ///
    /// `mac` is set in the same request, so a bridge of ours always has it (and one without
    /// it is not ours).
    pub fn create_bridge(&mut self, name: &str, mac: [u8; 6]) -> io::Result<u32> {
        check_ifname(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::MulticastSnooping(false)])),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)?;
        self.link_index(name)?.ok_or_else(|| io::Error::other(format!("bridge {name} vanished right after creation")))
    }

    /// Delete link `index`; a link that is already gone is not an error.
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        ignore_errno(self.ack(RouteNetlinkMessage::DelLink(link_msg(index)), 0), &[libc::ENODEV])
    }

    /// Take bridge port `index` out of forwarding (state disabled) and forget the MACs the
    /// bridge learned on it, or (`forwarding`) put it back, in one request; the link itself
    /// stays up. Unlike setting the link down, this raises no `NETDEV_DOWN` (which makes NAT
    /// masquerade walk the whole conntrack table) and waits for no RCU grace period. On a
    /// bridge running the kernel's STP (an adopted one; wsnic's own never does) the kernel
    /// refuses (`EBUSY`), and the reaper then deletes the TAP rather than keep it.
    pub fn set_port_forwarding(&mut self, index: u32, forwarding: bool) -> io::Result<()> {
        let mut msg = link_msg(index);
        msg.header.interface_family = AddressFamily::Bridge;
        let state = if forwarding { BR_STATE_FORWARDING } else { BR_STATE_DISABLED };
        let mut port = vec![LinkProtoInfoBridge::Other(DefaultNla::new(IFLA_BRPORT_STATE, vec![state]))];
        if !forwarding {
            port.push(LinkProtoInfoBridge::Other(DefaultNla::new(IFLA_BRPORT_FLUSH, Vec::new())));
        }
        msg.attributes.push(LinkAttribute::ProtoInfoBridge(port));
        self.ack(RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// Set link `index` down and put it in device group `group`, in one request (a device
    /// that is already gone is not an error).
    pub fn set_down_in_group(&mut self, index: u32, group: u32) -> io::Result<()> {
        let mut msg = link_msg(index);
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::Group(group));
        ignore_errno(self.ack(RouteNetlinkMessage::NewLink(msg), 0), &[libc::ENODEV])
    }

    /// Delete every link in device group `group` with one request: the kernel unregisters
    /// them together and waits for one RCU grace period instead of one per device.
    pub fn delete_group(&mut self, group: u32) -> io::Result<()> {
        let mut msg = link_msg(0);
        msg.attributes.push(LinkAttribute::Group(group));
        ignore_errno(self.ack(RouteNetlinkMessage::DelLink(msg), 0), &[libc::ENODEV])
    }

    /// Limit the segments per GSO super-frame the kernel hands link `index` (`gso_max_segs`);
    /// larger ones it segments in software first.
    pub fn set_gso_max_segs(&mut self, index: u32, segs: u32) -> io::Result<()> {
        let mut msg = link_msg(index);
        msg.attributes.push(LinkAttribute::GsoMaxSegs(segs));
        self.ack(RouteNetlinkMessage::NewLink(msg), 0)
    }

    /// Prepare link `index`, still down, to be a bridge port, in one request: no IPv6 address
    /// of its own (IPv6 address generation mode "none", as `ip link set … addrgenmode none`,
    /// so that going up gives it no link-local address and the host sends no DAD, MLD or
    /// router solicitation from it), and, if given, at most `gso_max_segs` segments per GSO
    /// super-frame the kernel hands it (larger ones it segments in software first). On a
    /// kernel without IPv6 only the segment limit is set.
    pub fn prepare_port(&mut self, index: u32, gso_max_segs: Option<u32>) -> io::Result<()> {
        let msg = |no_ipv6: bool| {
            let mut msg = link_msg(index);
            if no_ipv6 {
                let mode = AfSpecInet6::AddrGenMode(In6AddrGenMode::None);
                msg.attributes.push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![mode])]));
            }
            if let Some(segs) = gso_max_segs {
                msg.attributes.push(LinkAttribute::GsoMaxSegs(segs));
            }
            msg
        };
        match self.ack(RouteNetlinkMessage::NewLink(msg(true)), 0) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) && gso_max_segs.is_some() => {
                self.ack(RouteNetlinkMessage::NewLink(msg(false)), 0)
            }
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => Ok(()),
            other => other,
        }
    }

    /// Set link `index` administratively up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        self.ack(RouteNetlinkMessage::NewLink(up_msg(index)), 0)
    }

    /// Set link `index` administratively down.
    pub fn set_down(&mut self, index: u32) -> io::Result<()> {
        let mut msg = link_msg(index);
        msg.header.change_mask = LinkFlags::Up;
        self.ack(RouteNetlinkMessage::NewLink(msg), 0)
    }

    /// Whether link `index` is administratively up. `ENODEV` if there is no such link.
    pub fn link_is_up(&mut self, index: u32) -> io::Result<bool> {
        let link = self.get_link(link_msg(index))?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        Ok(link.header.flags.contains(LinkFlags::Up))
    }

    /// Enslave link `index` to bridge `master` and set it up, in one request.
    pub fn attach_up(&mut self, index: u32, master: u32) -> io::Result<()> {
        let mut msg = up_msg(index);
        msg.attributes.push(LinkAttribute::Controller(master));
        self.ack(RouteNetlinkMessage::NewLink(msg), 0)
    }

    /// Enslave link `index` to bridge `master` as an isolated port, then set it up: the
    /// port exchanges no frame with another port before it is isolated.
    pub fn attach_isolated_up(&mut self, index: u32, master: u32) -> io::Result<()> {
        let mut msg = link_msg(index);
        msg.attributes.push(LinkAttribute::Controller(master));
        self.ack(RouteNetlinkMessage::NewLink(msg), 0)?;
        self.set_port_isolated(index, true)?;
        self.set_up(index)
    }

    /// Set or clear bridge port isolation (`IFLA_BRPORT_ISOLATED`) on link `index`, a
    /// bridge port. Isolated ports exchange no frames with each other but still reach
    /// the bridge device (the host) and non-isolated ports. `RTM_SETLINK` with family
    /// `AF_BRIDGE` and a nested `IFLA_PROTINFO`, as `bridge link set … isolated on`
    /// sends; a link that is not a bridge port fails (`EOPNOTSUPP`/`EINVAL`).
    pub fn set_port_isolated(&mut self, index: u32, isolated: bool) -> io::Result<()> {
        let mut msg = link_msg(index);
        msg.header.interface_family = AddressFamily::Bridge;
        let flag = DefaultNla::new(IFLA_BRPORT_ISOLATED, vec![u8::from(isolated)]);
        msg.attributes.push(LinkAttribute::ProtoInfoBridge(vec![LinkProtoInfoBridge::Other(flag)]));
        self.ack(RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// Whether bridge port `index` is isolated, read from the port attributes the kernel
    /// reports in `IFLA_LINKINFO` (`IFLA_INFO_SLAVE_DATA`). `EINVAL` if `index` is not a
    /// bridge port (or a kernel older than 4.18 that lacks the flag), `ENODEV` if absent.
    pub fn port_isolated(&mut self, index: u32) -> io::Result<bool> {
        let link = self.get_link(link_msg(index))?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        let flag = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::PortData(InfoPortData::BridgePort(port)) => port.iter().find_map(|p| match p {
                    InfoBridgePort::Isolated(on) => Some(*on),
                    _ => None,
                }),
                _ => None,
            }),
            _ => None,
        });
        flag.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// Set link `index`'s MAC address and bring it up, in one request. A bridge given an
    /// address this way keeps it, instead of taking the lowest MAC of its ports (which would
    /// change the gateway's MAC whenever a client joins or leaves).
    pub fn set_mac_up(&mut self, index: u32, mac: [u8; 6]) -> io::Result<()> {
        let mut msg = up_msg(index);
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.ack(RouteNetlinkMessage::NewLink(msg), 0)
    }

    /// Add `addr/prefix` (with its broadcast address) to link `index`.
    /// Returns `false` if that address was already present.
    pub fn add_ipv4(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<bool> {
        let mut msg = addr_msg(index, addr, prefix)?;
        if prefix < 31 {
            let brd = Ipv4Addr::from(u32::from(addr) | u32::MAX >> prefix);
            msg.attributes.push(AddressAttribute::Broadcast(brd));
        }
        match self.ack(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Does link `index` have `addr/prefix` (the pair the kernel refuses to add twice)?
    pub fn has_ipv4(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<bool> {
        let mut req = AddressMessage::default();
        req.header.family = AddressFamily::Inet;
        req.header.index = index; // the kernel may filter by it; the replies are checked anyway
        let mut found = false;
        self.request(RouteNetlinkMessage::GetAddress(req), NLM_F_DUMP, |m| {
            if let RouteNetlinkMessage::NewAddress(a) = m {
                let local = a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(IpAddr::V4(l)) => Some(*l),
                    _ => None,
                });
                found |= a.header.index == index && a.header.prefix_len == prefix && local == Some(addr);
            }
        })?;
        Ok(found)
    }

    /// Remove `addr/prefix` from link `index`; absent address or link is fine.
    pub fn del_ipv4(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let msg = addr_msg(index, addr, prefix)?;
        ignore_errno(self.ack(RouteNetlinkMessage::DelAddress(msg), 0), &[libc::EADDRNOTAVAIL, libc::ENODEV])
    }

    /// Name of the interface carrying the IPv4 default route of the main
    /// table with the lowest metric, or `None` if there is none.
    pub fn default_route_iface(&mut self) -> io::Result<Option<String>> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        // Streamed: a router's main table may hold a million routes.
        let mut best: Option<(u32, u32)> = None;
        self.request(RouteNetlinkMessage::GetRoute(req), NLM_F_DUMP, |m| {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                if let Some(cand) = default_route_oif(&r) {
                    if best.is_none_or(|(metric, _)| cand.0 < metric) {
                        best = Some(cand);
                    }
                }
            }
        })?;
        match best {
            Some((_, oif)) => self.link_name(oif),
            None => Ok(None),
        }
    }

    /// RTM_GETLINK for a single link; `None` if the kernel says ENODEV.
    fn get_link(&mut self, msg: LinkMessage) -> io::Result<Option<LinkMessage>> {
        let mut link = None;
        let result = self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK, |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                link = Some(l);
            }
        });
        match result {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            r => r.map(|()| link),
        }
    }

    /// Send a request that only expects an acknowledgement.
    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(msg, flags | NLM_F_ACK, drop)
    }

    /// Send one request and pass every reply message carrying its sequence
    /// number to `on_reply`, until the terminating ACK/error (or NLMSG_DONE
    /// for dumps).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        mut on_reply: impl FnMut(RouteNetlinkMessage),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;

        loop {
            self.buf.clear();
            let len = loop {
                match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if len > self.buf.len() {
                return Err(invalid_data("netlink reply truncated"));
            }
            let mut data = &self.buf[..];
            while !data.is_empty() {
                let nl =
                    NetlinkBuffer::new_checked(data).map_err(|e| invalid_data(&format!("bad netlink message: {e}")))?;
                let msg_len = nl.length() as usize;
                let this = &data[..msg_len];
                data = &data[msg_len.next_multiple_of(4).min(data.len())..];
                if nl.sequence_number() != seq {
                    continue; // stale reply to an earlier, abandoned request
                }
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(this)
                    .map_err(|e| invalid_data(&format!("bad netlink reply: {e}")))?;
                let code = match parsed.payload {
                    NetlinkPayload::InnerMessage(m) => {
                        on_reply(m);
                        continue;
                    }
                    NetlinkPayload::Error(e) => e.raw_code(),
                    NetlinkPayload::Done(d) => d.code,
                    _ => continue,
                };
                return match code {
                    0 => Ok(()),
                    c => Err(io::Error::from_raw_os_error(c.abs())),
                };
            }
        }
    }
}

/// `(metric, oif)` if `r` is an IPv4 unicast default route of the main table.
fn default_route_oif(r: &RouteMessage) -> Option<(u32, u32)> {
    let h = &r.header;
    if h.address_family != AddressFamily::Inet || h.destination_prefix_length != 0 || h.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(h.table);
    let (mut metric, mut oif) = (0, None);
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::MultiPath(hops) if oif.is_none() => oif = hops.first().map(|h| h.interface_index),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    oif.filter(|&i| i != 0).map(|i| (metric, i))
}

fn link_msg(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

fn up_msg(index: u32) -> LinkMessage {
    let mut msg = link_msg(index);
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg
}

fn addr_msg(index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<AddressMessage> {
    if prefix > 32 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid IPv4 prefix length /{prefix}")));
    }
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
    msg.attributes.push(AddressAttribute::Address(IpAddr::V4(addr)));
    Ok(msg)
}

fn check_ifname(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['/', '\0']) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid interface name {name:?}")));
    }
    Ok(())
}

fn ignore_errno(r: io::Result<()>, errnos: &[i32]) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error().is_some_and(|c| errnos.contains(&c)) => Ok(()),
        r => r,
    }
}

fn invalid_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}
