//! TAP devices: open `/dev/net/tun`, `TUNSETIFF` with `IFF_TAP | IFF_NO_PI`, non-blocking.
//! With offload, also `IFF_VNET_HDR` and `TUNSETOFFLOAD`: every frame read or written is then
//! preceded by a 10-byte `virtio_net_hdr` (see `offload::vnet`), and the kernel may hand over
//! TCP/UDP super-frames.
//!
//! The device is not persistent: the kernel removes it when the file descriptor closes, so a
//! crashed wsnic leaves no TAP behind. Register the fd with the event loop only after
//! [`Tap::open`] returns — the original wsnic registered it before `TUNSETIFF` and so never
//! saw frames for a client that had not spoken yet.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::offload::vnet::{VnetHdr, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// Length of the `virtio_net_hdr` in front of every frame of an offloading TAP.
pub const VNET_HDR_LEN: usize = VnetHdr::LEN;

/// An open TAP device; closing it (drop) removes the device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    index: u32,
    /// Frames carry a `virtio_net_hdr` (offload on).
    vnet: bool,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Create a TAP device named `pattern` (`wsnic%d`: the kernel picks the number); with `offload`, frames carry a `virtio_net_hdr` and the kernel may
    /// hand over (and accept) TCP and UDP super-frames with partial checksums.
    pub fn open(pattern: &str, offload: bool) -> io::Result<Tap> {
        if pattern.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        let flags = IFF_TAP | IFF_NO_PI | if offload { IFF_VNET_HDR } else { 0 };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags, _pad: [0; 22] };
        req.name[..pattern.len()].copy_from_slice(pattern.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if offload {
            let fd = file.as_raw_fd();
            let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // SAFETY: both ioctls read an int-sized argument from the pointer given.
            if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &size) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
            // USO came with Linux 6.2; without it the kernel segments UDP itself.
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            if unsafe { libc::ioctl(fd, TUNSETOFFLOAD, (tso | TUN_F_USO4 | TUN_F_USO6) as libc::c_ulong) } < 0
                && unsafe { libc::ioctl(fd, TUNSETOFFLOAD, tso as libc::c_ulong) } < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let name = CStr::from_bytes_until_nul(&req.name)
            .map_err(|_| io::Error::other("kernel returned an unterminated name"))?
            .to_string_lossy()
            .into_owned();
        let cname = std::ffi::CString::new(name.clone()).map_err(io::Error::other)?;
        // SAFETY: cname is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap { fd: file.into(), name, index, vnet: offload })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Do frames carry a `virtio_net_hdr` (offload on)?
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet
    }

    /// Read one frame (non-blocking).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Write one frame (non-blocking); a TAP takes a frame whole or not at all.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: frame is valid for frame.len() bytes of reads.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Write one frame behind its `virtio_net_hdr` in one system call (offload on).
    pub fn write_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec { iov_base: hdr.as_ptr() as *mut libc::c_void, iov_len: hdr.len() },
            libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths, only read by writev.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
