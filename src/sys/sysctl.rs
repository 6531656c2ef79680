//! Reading and writing kernel parameters under `/proc/sys`, named in
//! sysctl(8)'s dotted form (`net.ipv4.ip_forward`). As with sysctl(8), a name
//! containing `/` is taken as slash-separated and its dots are kept
//! (`net/ipv4/conf/eth0.100/forwarding`). Network parameters are per network
//! namespace: they resolve in the namespace of the calling thread.

use std::{fs, io};

/// The current value of `name`, whitespace-trimmed.
pub fn read(name: &str) -> io::Result<String> {
    let path = proc_path(name)?;
    fs::read_to_string(&path).map(|s| s.trim().to_owned()).map_err(|e| context(e, "read", &path))
}

/// Set `name` to `value`.
pub fn write(name: &str, value: &str) -> io::Result<()> {
    let path = proc_path(name)?;
    fs::write(&path, value).map_err(|e| context(e, "write", &path))
}

fn proc_path(name: &str) -> io::Result<String> {
    let rel = if name.contains('/') { name.trim_start_matches('/').to_owned() } else { name.replace('.', "/") };
    if rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid sysctl name {name:?}")));
    }
    Ok(format!("/proc/sys/{rel}"))
}

fn context(e: io::Error, op: &str, path: &str) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {op} {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::proc_path;

    #[test]
    fn paths() {
        assert_eq!(proc_path("net.ipv4.ip_forward").unwrap(), "/proc/sys/net/ipv4/ip_forward");
        assert_eq!(
            proc_path("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            "/proc/sys/net/ipv4/conf/eth0.100/forwarding"
        );
        for bad in ["", "net..ip_forward", "net/../../etc/passwd", "net.ipv4."] {
            assert!(proc_path(bad).is_err(), "{bad}");
        }
    }
}
