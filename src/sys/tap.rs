//! TAP devices: open `/dev/net/tun`, `TUNSETIFF` with `IFF_TAP | IFF_NO_PI`, non-blocking.
//! With offload, also `IFF_VNET_HDR` and `TUNSETOFFLOAD`: every frame read or written is then
//! preceded by a 10-byte `virtio_net_hdr` (see `offload::vnet`), and the kernel may hand over
//! TCP/UDP super-frames.
//!
//! With `napi` (the relay's TAPs), also `IFF_NAPI` (Linux 4.15; older kernels ignore the flag):
//! a written frame is queued to the device's NAPI context instead of being pushed through the
//! bridge, the firewall and NAT inside the `write()`. Until [`TapHandle::give_thread`] gives that
//! context a kernel thread it runs at once, in the writer's own softirq, as without it;
//! afterwards the kernel thread does that work, next to the writer, on batches it can merge
//! (GRO). What the kernel holds of written frames is then bounded by the send buffer, which
//! `give_thread` sets ([`NAPI_SNDBUF`]; it is unlimited before, which also keeps `tun`'s faster
//! allocation path): over it, `write()` returns `WouldBlock` and the fd turns writable again
//! when the thread has caught up.
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
use std::path::Path;

use crate::offload::vnet::{VnetHdr, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETVNETLE: libc::c_ulong = 0x4004_54dc;
const IFF_NAPI: libc::c_short = 0x0010;
const TUNSETSNDBUF: libc::c_ulong = 0x4004_54d4;
const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
/// Send buffer of a TAP with a NAPI context: at most this many bytes (kernel accounting, about
/// 400 full-size frames) written and not yet processed by the kernel.
pub const NAPI_SNDBUF: libc::c_int = 1 << 20;
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
    /// Opened with `IFF_NAPI`: [`TapHandle::give_thread`] can give it a kernel thread.
    napi: bool,
    /// [`Tap::mark_threaded`] was called: a kernel thread was asked for.
    threaded: bool,
}

/// A second descriptor of a [`Tap`], for another thread to change the device's settings (the
/// device lives while either is open).
#[derive(Debug)]
pub struct TapHandle {
    fd: OwnedFd,
    name: String,
    index: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    rest: [u8; 22],
}

impl Tap {
    /// Create a TAP device named `pattern` (`wsnic%d`: the kernel picks the number); with
    /// `offload`, frames carry a `virtio_net_hdr` and the kernel may hand over (and accept) TCP
    /// and UDP super-frames with partial checksums; with `napi`, the device gets a NAPI context
    /// (see the module doc).
    pub fn open(pattern: &str, offload: bool, napi: bool) -> io::Result<Tap> {
        if pattern.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        let flags = IFF_TAP | IFF_NO_PI | if offload { IFF_VNET_HDR } else { 0 } | if napi { IFF_NAPI } else { 0 };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags, rest: [0; 22] };
        req.name[..pattern.len()].copy_from_slice(pattern.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if offload {
            let fd = file.as_raw_fd();
            let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // The header's fields are little-endian (`offload::vnet`); the kernel reads a legacy
            // header in the host's byte order unless told: the same on little-endian hosts, and
            // said explicitly for the others.
            let le: libc::c_int = 1;
            // SAFETY: both ioctls read an int-sized argument from the pointer given.
            if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &size) } < 0
                || unsafe { libc::ioctl(fd, TUNSETVNETLE, &le) } < 0
            {
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
        Ok(Tap { fd: file.into(), name, index, vnet: offload, napi, threaded: false })
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

    /// Has the device a NAPI context that has no kernel thread yet asked for?
    pub fn could_have_thread(&self) -> bool {
        self.napi && !self.threaded
    }

    /// Note that a kernel thread was asked for.
    pub fn mark_threaded(&mut self) {
        self.threaded = true;
    }

    /// Was a kernel thread asked for ([`Tap::mark_threaded`])?
    pub fn is_threaded(&self) -> bool {
        self.threaded
    }

    /// A second descriptor of this TAP (see [`TapHandle`]).
    pub fn handle(&self) -> io::Result<TapHandle> {
        Ok(TapHandle { fd: self.fd.try_clone()?, name: self.name.clone(), index: self.index })
    }

    /// Bound what the kernel holds of frames written and not yet processed to `bytes` (kernel
    /// accounting, `TUNSETSNDBUF`); the default is unbounded.
    pub fn set_send_buffer(&self, bytes: libc::c_int) -> io::Result<()> {
        set_send_buffer(self.fd.as_raw_fd(), bytes)
    }

    /// `write` (one system call) until it does not fail with `WouldBlock` while the TAP polls
    /// writable. `tun` wakes an edge-triggered waiter (epoll `EPOLLOUT`) only if the file was
    /// polled while its send buffer was full — the poll sets the flag its wake-up checks — so a
    /// `WouldBlock` returned from here has been polled and the edge will come; without that poll
    /// the wake-up is lost and the TAP is never written again. (A TAP's send buffer only fills
    /// with a NAPI thread that is behind: see the module doc.)
    fn retrying(&self, write: impl Fn() -> libc::ssize_t) -> io::Result<usize> {
        let mut tries = 0;
        loop {
            let n = write();
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock || !self.poll_writable() {
                return Err(e);
            }
            // Writable means under half the send buffer, so the next write has room; should
            // that ever not hold, the frame is refused (and counted) rather than stalling the
            // TAP on a wake-up that will not come or spinning here.
            tries += 1;
            if tries == 8 {
                return Err(io::Error::other("the TAP polls writable but refuses the frame"));
            }
        }
    }

    /// Can the TAP take a frame now? (A zero-timeout `poll`.)
    fn poll_writable(&self) -> bool {
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd; a zero timeout never blocks.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1 && p.revents & libc::POLLOUT != 0
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

    /// Write one frame (non-blocking); a TAP takes a frame whole or not at all. `WouldBlock`
    /// means: wait for the fd to turn writable (see [`Tap::retrying`]).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: frame is valid for frame.len() bytes of reads.
        self.retrying(|| unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) })
    }

    /// Write one frame behind its `virtio_net_hdr`, both in one `writev` (offload on).
    pub fn write_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec { iov_base: hdr.as_ptr() as *mut libc::c_void, iov_len: hdr.len() },
            libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths, only read by writev.
        self.retrying(|| unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TapHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Give the TAP's NAPI context a kernel thread of its own through `<sys_class_net>/<name>`
    /// ([`set_threaded`]), then bound its send buffer to [`NAPI_SNDBUF`] (see the module doc).
    /// Both take the RTNL lock, the first by spinning: call it where waiting costs no client.
    pub fn give_thread(&self, sys_class_net: &Path) -> io::Result<()> {
        let mut hw = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, rest: [0; 22] };
        // SAFETY: SIOCGIFHWADDR on a tun fd fills a struct ifreq: after the name, a sockaddr
        // whose family (2 bytes, where IfReq has `flags`) is followed by the address.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), SIOCGIFHWADDR, &mut hw) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&hw.rest[..6]);
        set_threaded(sys_class_net, &self.name, self.index, mac)?;
        set_send_buffer(self.fd.as_raw_fd(), NAPI_SNDBUF)
    }
}

fn set_send_buffer(fd: RawFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETSNDBUF reads an int from the pointer given.
    if unsafe { libc::ioctl(fd, TUNSETSNDBUF, &bytes) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Give the NAPI context of the TAP `name` (ifindex `index`, MAC `mac`) a kernel thread of its
/// own, through `<sys_class_net>/<name>/threaded` (Linux 5.12). `/sys/class/net` lists the
/// devices of the network namespace sysfs was mounted in, which need not be this process's:
/// the device found there must have our ifindex and our MAC, or nothing is written.
///
/// The kernel only try-locks RTNL for this write and restarts the system call until it gets
/// the lock, so call it on a thread where that wait costs no client anything.
fn set_threaded(sys_class_net: &Path, name: &str, index: u32, mac: [u8; 6]) -> io::Result<()> {
    let dir = sys_class_net.join(name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map(|s| s.trim().to_string());
    if read("ifindex")? != index.to_string() || read("address")? != super::format_mac(&mac) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is another network namespace's {name}", dir.display()),
        ));
    }
    std::fs::write(dir.join("threaded"), "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A directory laid out like `/sys/class/net` with one device.
    fn fake_sysfs(tag: &str, name: &str, index: &str, address: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("wsnic-sysfs-{}-{tag}", std::process::id()));
        let dev = root.join(name);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("ifindex"), format!("{index}\n")).unwrap();
        std::fs::write(dev.join("address"), format!("{address}\n")).unwrap();
        std::fs::write(dev.join("threaded"), "0\n").unwrap();
        root
    }

    const MAC: [u8; 6] = [0x02, 0xab, 0x00, 0x01, 0x02, 0xff];

    #[test]
    fn threaded_is_written_for_our_device() {
        let root = fake_sysfs("ours", "wsnic3", "17", "02:ab:00:01:02:ff");
        set_threaded(&root, "wsnic3", 17, MAC).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("wsnic3/threaded")).unwrap(), "1");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn another_namespaces_device_is_left_alone() {
        for (tag, index, address) in [("idx", "18", "02:ab:00:01:02:ff"), ("mac", "17", "02:ab:00:01:02:fe")] {
            let root = fake_sysfs(tag, "wsnic3", index, address);
            let e = set_threaded(&root, "wsnic3", 17, MAC).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
            assert_eq!(std::fs::read_to_string(root.join("wsnic3/threaded")).unwrap(), "0\n");
            std::fs::remove_dir_all(root).unwrap();
        }
        let root = fake_sysfs("none", "wsnic4", "17", "02:ab:00:01:02:ff");
        assert_eq!(set_threaded(&root, "wsnic3", 17, MAC).unwrap_err().kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(root).unwrap();
    }
}
