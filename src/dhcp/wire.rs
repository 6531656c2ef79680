//! RFC 2131/2132 DHCP message codec: the BOOTP fixed part, the magic cookie and the options.
//!
//! [`decode`] takes a UDP payload and never panics. Options are kept in arrival order with their
//! raw bytes (unknown ones too); an option that appears several times is one option whose data
//! is the concatenation (RFC 3396), which also makes options longer than 255 bytes possible.
//! Option overload (52) is honoured: the `file` then `sname` fields are parsed as more options
//! (in that order, RFC 3396 §5), option 52 itself is removed and the fields it borrowed are
//! zeroed, so a decoded message is always a plain one. A missing end option is tolerated.
//!
//! [`encode`] appends a message to a buffer, splitting long options into 255-byte pieces, and
//! pads it to the 300-byte BOOTP minimum.

use std::fmt;
use std::net::Ipv4Addr;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;
/// `htype` of Ethernet (RFC 1700).
pub const HTYPE_ETHERNET: u8 = 1;
/// The broadcast bit of `flags` (RFC 2131 §2).
pub const FLAG_BROADCAST: u16 = 0x8000;
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// op .. file: everything before the magic cookie.
pub const FIXED_LEN: usize = 236;
/// The smallest message [`encode`] writes: the 300-byte BOOTP message (RFC 951).
pub const MIN_LEN: usize = 300;
/// The smallest "maximum DHCP message size" a client may state, as an IP datagram (RFC 2132 §9.10).
pub const MIN_MAX_MESSAGE_SIZE: u16 = 576;
/// IPv4 header (no options) plus UDP header: what an IP datagram holds besides the DHCP message.
pub const IP_UDP_OVERHEAD: usize = 28;

/// Option codes used by wsnic (RFC 2132).
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOST_NAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const INTERFACE_MTU: u8 = 26;
    pub const BROADCAST_ADDRESS: u8 = 28;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETER_REQUEST_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

/// DHCP message type, option 53 (RFC 2132 §9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Option<MessageType> {
        Some(match v {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }
}

/// One option: its code (never 0 or 255) and its data, reassembled if it was split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpOption {
    pub code: u8,
    pub data: Vec<u8>,
}

/// A DHCP message (RFC 2131 §2, figure 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: u8,
    pub htype: u8,
    pub hlen: u8,
    pub hops: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 16],
    pub sname: [u8; 64],
    pub file: [u8; 128],
    /// In wire order; codes are unique and never [`opt::PAD`] or [`opt::END`].
    pub options: Vec<DhcpOption>,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            op: 0,
            htype: 0,
            hlen: 0,
            hops: 0,
            xid: 0,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [0; 16],
            sname: [0; 64],
            file: [0; 128],
            options: Vec::new(),
        }
    }
}

fn ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?))
}

impl Message {
    /// The data of option `code`.
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options.iter().find(|o| o.code == code).map(|o| o.data.as_slice())
    }

    /// Sets option `code` (replacing its data if present, else appending it).
    pub fn set_option(&mut self, code: u8, data: impl Into<Vec<u8>>) {
        let data = data.into();
        match self.options.iter_mut().find(|o| o.code == code) {
            Some(o) => o.data = data,
            None => self.options.push(DhcpOption { code, data }),
        }
    }

    /// Option 53; `None` if absent, not one byte, or an unknown type.
    pub fn message_type(&self) -> Option<MessageType> {
        match self.option(opt::MESSAGE_TYPE)? {
            [t] => MessageType::from_u8(*t),
            _ => None,
        }
    }

    /// Option 50; `None` if absent or not 4 bytes.
    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        ipv4(self.option(opt::REQUESTED_IP)?)
    }

    /// Option 54; `None` if absent or not 4 bytes.
    pub fn server_id(&self) -> Option<Ipv4Addr> {
        ipv4(self.option(opt::SERVER_ID)?)
    }

    /// Option 61, raw (type byte included).
    pub fn client_id(&self) -> Option<&[u8]> {
        self.option(opt::CLIENT_ID)
    }

    /// Option 12, raw.
    pub fn host_name(&self) -> Option<&[u8]> {
        self.option(opt::HOST_NAME)
    }

    /// Option 55: the codes the client asks for, in its order of preference.
    pub fn parameter_request_list(&self) -> Option<&[u8]> {
        self.option(opt::PARAMETER_REQUEST_LIST)
    }

    /// Option 57 as sent (not clamped to 576); `None` if absent or not 2 bytes.
    pub fn max_message_size(&self) -> Option<u16> {
        Some(u16::from_be_bytes(self.option(opt::MAX_MESSAGE_SIZE)?.try_into().ok()?))
    }

    /// Option 51 in seconds; `None` if absent or not 4 bytes.
    pub fn lease_time(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.option(opt::LEASE_TIME)?.try_into().ok()?))
    }

    /// The client's MAC address: `chaddr` of an Ethernet message (htype 1, hlen 6).
    pub fn client_mac(&self) -> Option<[u8; 6]> {
        if self.htype == HTYPE_ETHERNET && self.hlen == 6 {
            Some(self.chaddr[..6].try_into().expect("6 bytes"))
        } else {
            None
        }
    }

    /// The broadcast bit of `flags`.
    pub fn broadcast_flag(&self) -> bool {
        self.flags & FLAG_BROADCAST != 0
    }
}

/// Why a buffer is not a DHCP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the fixed part and the magic cookie (240 bytes).
    TooShort,
    /// `op` is neither BOOTREQUEST nor BOOTREPLY.
    BadOp(u8),
    /// No DHCP magic cookie: a plain BOOTP message, or not BOOTP at all.
    BadCookie,
    /// An option's length byte, or its data, runs past the end of its field.
    TruncatedOption(u8),
    /// Option 52 is not one byte of value 1, 2 or 3.
    BadOverload,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooShort => write!(f, "shorter than {} bytes", FIXED_LEN + 4),
            DecodeError::BadOp(op) => write!(f, "op {op} is neither BOOTREQUEST nor BOOTREPLY"),
            DecodeError::BadCookie => write!(f, "no DHCP magic cookie"),
            DecodeError::TruncatedOption(code) => write!(f, "option {code} runs past the end of the message"),
            DecodeError::BadOverload => write!(f, "invalid option overload (52)"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Parses the options in `area` into `out`, concatenating repeats (RFC 3396). Stops at END.
/// `skip_overload`: drop option 52 (inside the borrowed `file`/`sname` fields it means nothing).
fn parse_options(area: &[u8], out: &mut Vec<DhcpOption>, skip_overload: bool) -> Result<(), DecodeError> {
    let mut i = 0;
    while i < area.len() {
        let code = area[i];
        match code {
            opt::PAD => {
                i += 1;
                continue;
            }
            opt::END => return Ok(()),
            _ => {}
        }
        let len = *area.get(i + 1).ok_or(DecodeError::TruncatedOption(code))? as usize;
        let data = area.get(i + 2..i + 2 + len).ok_or(DecodeError::TruncatedOption(code))?;
        i += 2 + len;
        if skip_overload && code == opt::OVERLOAD {
            continue;
        }
        match out.iter_mut().find(|o| o.code == code) {
            Some(o) => o.data.extend_from_slice(data),
            None => out.push(DhcpOption { code, data: data.to_vec() }),
        }
    }
    Ok(())
}

/// Decodes a DHCP message from a UDP payload. Never panics.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    if buf.len() < FIXED_LEN + 4 {
        return Err(DecodeError::TooShort);
    }
    let op = buf[0];
    if op != BOOTREQUEST && op != BOOTREPLY {
        return Err(DecodeError::BadOp(op));
    }
    if buf[FIXED_LEN..FIXED_LEN + 4] != MAGIC_COOKIE {
        return Err(DecodeError::BadCookie);
    }
    let u16_at = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let mut m = Message {
        op,
        htype: buf[1],
        hlen: buf[2],
        hops: buf[3],
        xid: u32_at(4),
        secs: u16_at(8),
        flags: u16_at(10),
        ciaddr: Ipv4Addr::from(u32_at(12)),
        yiaddr: Ipv4Addr::from(u32_at(16)),
        siaddr: Ipv4Addr::from(u32_at(20)),
        giaddr: Ipv4Addr::from(u32_at(24)),
        chaddr: buf[28..44].try_into().expect("16 bytes"),
        sname: buf[44..108].try_into().expect("64 bytes"),
        file: buf[108..236].try_into().expect("128 bytes"),
        options: Vec::new(),
    };
    parse_options(&buf[FIXED_LEN + 4..], &mut m.options, false)?;
    if let Some(pos) = m.options.iter().position(|o| o.code == opt::OVERLOAD) {
        let overload = match m.options.remove(pos).data[..] {
            [v @ 1..=3] => v,
            _ => return Err(DecodeError::BadOverload),
        };
        if overload & 1 != 0 {
            parse_options(&m.file, &mut m.options, true)?;
            m.file = [0; 128];
        }
        if overload & 2 != 0 {
            parse_options(&m.sname, &mut m.options, true)?;
            m.sname = [0; 64];
        }
    }
    Ok(m)
}

fn option_wire_len(data_len: usize) -> usize {
    // An empty option is still written once, as code and length 0.
    2 * data_len.div_ceil(255).max(1) + data_len
}

/// Bytes that [`encode`] writes for `options` (their codes and lengths included, END excluded).
pub fn options_len(options: &[DhcpOption]) -> usize {
    options.iter().filter(|o| o.code != opt::PAD && o.code != opt::END).map(|o| option_wire_len(o.data.len())).sum()
}

/// Bytes that [`encode`] writes for `msg`.
pub fn encoded_len(msg: &Message) -> usize {
    (FIXED_LEN + 4 + options_len(&msg.options) + 1).max(MIN_LEN)
}

/// Appends `msg` to `out`: fixed part, magic cookie, options (in order, data over 255 bytes split
/// into repeats), END, zero padding up to [`MIN_LEN`]. Options with code 0 or 255 are skipped;
/// all others, option 52 included, are written as given.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(encoded_len(msg));
    out.extend_from_slice(&[msg.op, msg.htype, msg.hlen, msg.hops]);
    out.extend_from_slice(&msg.xid.to_be_bytes());
    out.extend_from_slice(&msg.secs.to_be_bytes());
    out.extend_from_slice(&msg.flags.to_be_bytes());
    for a in [msg.ciaddr, msg.yiaddr, msg.siaddr, msg.giaddr] {
        out.extend_from_slice(&a.octets());
    }
    out.extend_from_slice(&msg.chaddr);
    out.extend_from_slice(&msg.sname);
    out.extend_from_slice(&msg.file);
    out.extend_from_slice(&MAGIC_COOKIE);
    for o in msg.options.iter().filter(|o| o.code != opt::PAD && o.code != opt::END) {
        if o.data.is_empty() {
            out.extend_from_slice(&[o.code, 0]);
        }
        for piece in o.data.chunks(255) {
            out.extend_from_slice(&[o.code, piece.len() as u8]);
            out.extend_from_slice(piece);
        }
    }
    out.push(opt::END);
    if out.len() - start < MIN_LEN {
        out.resize(start + MIN_LEN, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A DISCOVER as sent by Linux's dhclient, captured: fixed part and options.
    fn discover_bytes() -> Vec<u8> {
        let mut b = vec![0u8; FIXED_LEN];
        b[..4].copy_from_slice(&[1, 1, 6, 0]);
        b[4..8].copy_from_slice(&0x3903_f326u32.to_be_bytes());
        b[10] = 0x80;
        b[28..34].copy_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        b.extend_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&[53, 1, 1]);
        b.extend_from_slice(&[50, 4, 192, 168, 2, 10]);
        b.extend_from_slice(&[12, 4, b'h', b'o', b's', b't']);
        b.extend_from_slice(&[55, 4, 1, 3, 6, 15]);
        b.extend_from_slice(&[57, 2, 0x05, 0xdc]);
        b.extend_from_slice(&[61, 7, 1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        b.extend_from_slice(&[0, 0, 0xfe, 2, 0xaa, 0xbb]); // pads, an unknown option
        b.push(255);
        b.extend_from_slice(&[0; 7]);
        b
    }

    #[test]
    fn decodes_typed_fields() {
        let m = decode(&discover_bytes()).unwrap();
        assert_eq!((m.op, m.htype, m.hlen, m.xid, m.flags), (1, 1, 6, 0x3903_f326, 0x8000));
        assert!(m.broadcast_flag());
        assert_eq!(m.client_mac(), Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]));
        assert_eq!(m.message_type(), Some(MessageType::Discover));
        assert_eq!(m.requested_ip(), Some(Ipv4Addr::new(192, 168, 2, 10)));
        assert_eq!(m.host_name(), Some(&b"host"[..]));
        assert_eq!(m.parameter_request_list(), Some(&[1, 3, 6, 15][..]));
        assert_eq!(m.max_message_size(), Some(1500));
        assert_eq!(m.client_id(), Some(&[1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56][..]));
        assert_eq!(m.server_id(), None);
        assert_eq!(m.lease_time(), None);
        assert_eq!(m.option(0xfe), Some(&[0xaa, 0xbb][..]));
        assert_eq!(m.options.len(), 7);
    }

    #[test]
    fn encode_pads_and_round_trips() {
        let m = decode(&discover_bytes()).unwrap();
        let mut out = vec![0xEE]; // appends after what is there
        encode(&m, &mut out);
        assert_eq!(out.len(), 1 + MIN_LEN);
        assert_eq!(encoded_len(&m), MIN_LEN);
        assert_eq!(&out[1 + FIXED_LEN..1 + FIXED_LEN + 4], &MAGIC_COOKIE);
        assert_eq!(decode(&out[1..]).unwrap(), m);
    }

    #[test]
    fn rejects() {
        let good = discover_bytes();
        assert_eq!(decode(&good[..239]), Err(DecodeError::TooShort));
        let mut b = good.clone();
        b[0] = 3;
        assert_eq!(decode(&b), Err(DecodeError::BadOp(3)));
        let mut b = good.clone();
        b[FIXED_LEN + 3] = 0;
        assert_eq!(decode(&b), Err(DecodeError::BadCookie));
        // Truncated: a length byte missing, and data running past the end.
        let mut b = good[..FIXED_LEN + 4].to_vec();
        b.push(53);
        assert_eq!(decode(&b), Err(DecodeError::TruncatedOption(53)));
        b.extend_from_slice(&[2, 1]);
        assert_eq!(decode(&b), Err(DecodeError::TruncatedOption(53)));
        // Missing END is tolerated; bytes after END are ignored.
        let mut b = good[..FIXED_LEN + 4].to_vec();
        b.extend_from_slice(&[53, 1, 3]);
        assert_eq!(decode(&b).unwrap().message_type(), Some(MessageType::Request));
        b.extend_from_slice(&[255, 53, 9]);
        assert_eq!(decode(&b).unwrap().options.len(), 1);
        // Wrong-length typed options read as absent.
        let mut b = good[..FIXED_LEN + 4].to_vec();
        b.extend_from_slice(&[53, 2, 1, 1, 50, 3, 1, 2, 3, 57, 1, 5]);
        let m = decode(&b).unwrap();
        assert_eq!((m.message_type(), m.requested_ip(), m.max_message_size()), (None, None, None));
    }

    #[test]
    fn long_options_split_and_concatenate() {
        let mut m = Message { op: BOOTREPLY, ..Default::default() };
        m.set_option(opt::DNS, (0..=255u8).cycle().take(600).collect::<Vec<_>>());
        m.set_option(opt::MESSAGE_TYPE, [5]);
        m.set_option(80, []); // rapid commit: an empty option
        let mut out = Vec::new();
        encode(&m, &mut out);
        assert_eq!(out.len(), encoded_len(&m));
        assert_eq!(out.len(), FIXED_LEN + 4 + (2 + 255) * 2 + 2 + 90 + 3 + 2 + 1);
        assert_eq!(decode(&out).unwrap(), m);
        // Repeats are concatenated in order even when other options come between.
        let mut b = out[..FIXED_LEN + 4].to_vec();
        b.extend_from_slice(&[12, 2, b'a', b'b', 53, 1, 1, 12, 1, b'c', 255]);
        let d = decode(&b).unwrap();
        assert_eq!(d.host_name(), Some(&b"abc"[..]));
        assert_eq!(d.options[0].code, 12);
    }

    #[test]
    fn option_overload() {
        let mut b = discover_bytes()[..FIXED_LEN + 4].to_vec();
        b[44..48].copy_from_slice(&[12, 2, b'h', b'i']); // sname: host name
        b[108..111].copy_from_slice(&[53, 1, 3]); // file: message type
        b[111..115].copy_from_slice(&[52, 1, 1, 255]); // a nested 52 is ignored
        b.extend_from_slice(&[52, 1, 3, 12, 1, b'!', 255]);
        let m = decode(&b).unwrap();
        assert_eq!(m.message_type(), Some(MessageType::Request));
        assert_eq!(m.host_name(), Some(&b"!hi"[..]));
        assert_eq!(m.option(opt::OVERLOAD), None);
        assert!(m.sname.iter().chain(m.file.iter()).all(|&x| x == 0));
        let mut out = Vec::new();
        encode(&m, &mut out);
        assert_eq!(decode(&out).unwrap(), m);
        // Only the file field borrowed: sname stays a name.
        let mut b2 = b.clone();
        b2[FIXED_LEN + 6] = 1;
        let m = decode(&b2).unwrap();
        assert_eq!(m.host_name(), Some(&b"!"[..]));
        assert_eq!(&m.sname[..4], &[12, 2, b'h', b'i']);
        for bad in [[52, 1, 4], [52, 1, 0]] {
            let mut b3 = b.clone();
            b3[FIXED_LEN + 4..FIXED_LEN + 7].copy_from_slice(&bad);
            assert_eq!(decode(&b3), Err(DecodeError::BadOverload));
        }
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let fixed = (any::<[u8; 4]>(), any::<u32>(), any::<u16>(), any::<u16>(), any::<[u32; 4]>());
        let names =
            (any::<[u8; 16]>(), prop::collection::vec(any::<u8>(), 64), prop::collection::vec(any::<u8>(), 128));
        let opts = prop::collection::vec(
            (
                (1u8..=254).prop_filter("no overload", |c| *c != opt::OVERLOAD),
                prop::collection::vec(any::<u8>(), 0..600),
            ),
            0..12,
        );
        (fixed, names, opts, any::<bool>()).prop_map(
            |((b, xid, secs, flags, a), (chaddr, sname, file), opts, reply)| {
                let mut m = Message {
                    op: if reply { BOOTREPLY } else { BOOTREQUEST },
                    htype: b[1],
                    hlen: b[2],
                    hops: b[3],
                    xid,
                    secs,
                    flags,
                    ciaddr: a[0].into(),
                    yiaddr: a[1].into(),
                    siaddr: a[2].into(),
                    giaddr: a[3].into(),
                    chaddr,
                    sname: sname.try_into().unwrap(),
                    file: file.try_into().unwrap(),
                    options: Vec::new(),
                };
                for (code, data) in opts {
                    if m.option(code).is_none() {
                        m.options.push(DhcpOption { code, data });
                    }
                }
                m
            },
        )
    }

    proptest! {
        #[test]
        fn round_trip(m in arb_message()) {
            let mut out = Vec::new();
            encode(&m, &mut out);
            prop_assert_eq!(out.len(), encoded_len(&m));
            prop_assert!(out.len() >= MIN_LEN);
            prop_assert_eq!(decode(&out).unwrap(), m);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..700)) {
            let _ = decode(&data);
        }

        /// Arbitrary option areas behind a valid header: decode never panics, and what it
        /// accepts re-encodes to the same message.
        #[test]
        fn arbitrary_options_never_panic(area in prop::collection::vec(any::<u8>(), 0..400), sname: [u8; 16]) {
            let mut b = discover_bytes()[..FIXED_LEN + 4].to_vec();
            b[44..60].copy_from_slice(&sname);
            b.extend_from_slice(&area);
            if let Ok(m) = decode(&b) {
                let mut out = Vec::new();
                encode(&m, &mut out);
                prop_assert_eq!(decode(&out).unwrap(), m);
            }
        }
    }
}
