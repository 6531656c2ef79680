//! The byte stream under a WebSocket: a plain TCP socket, or TLS over it (rustls) — with the
//! same non-blocking read/write semantics either way, so the pipe and the handshake code do
//! not care which. TLS records that rustls has queued but the socket has not taken yet are
//! pushed out by [`Transport::flush_tls`]; rustls bounds that queue (64 KiB), so a slow peer
//! still meets backpressure.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

pub enum Transport {
    Plain(TcpStream),
    Tls(TcpStream, Box<rustls::Connection>),
}

impl Transport {
    /// TLS server side over an accepted socket.
    pub fn tls_server(sock: TcpStream, cfg: Arc<rustls::ServerConfig>) -> io::Result<Transport> {
        let conn = rustls::ServerConnection::new(cfg).map_err(io::Error::other)?;
        Ok(Transport::Tls(sock, Box::new(conn.into())))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) | Transport::Tls(s, _) => s,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(..))
    }

    /// Does TLS have records waiting for the socket?
    pub fn wants_write(&self) -> bool {
        matches!(self, Transport::Tls(_, c) if c.wants_write())
    }

    /// Push queued TLS records to the socket: `WouldBlock` if some remain.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(sock, conn) => flush(sock, conn),
        }
    }

    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (sock, conn) = match self {
            Transport::Plain(s) => return s.read(buf),
            Transport::Tls(s, c) => (s, c),
        };
        loop {
            match conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: end of stream all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match conn.read_tls(sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            let processed = conn.process_new_packets();
            // Handshake messages and alerts go out now (an alert even when processing failed).
            let _ = flush(sock, conn);
            processed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))?;
        }
    }

    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (sock, conn) = match self {
            Transport::Plain(s) => return s.write(buf),
            Transport::Tls(s, c) => (s, c),
        };
        flush(sock, conn)?; // what is queued goes first; WouldBlock: the socket is full
        let n = conn.writer().write(buf)?;
        match flush(sock, conn) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        // The queue was just flushed, so rustls takes at least part of `buf`; were it to take
        // nothing, WouldBlock would wait for a writable event that might never come.
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(n)
    }

    pub fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        if let Transport::Tls(_, conn) = self {
            conn.send_close_notify();
            let _ = self.flush_tls();
        }
        self.tcp().shutdown(how)
    }
}

fn flush(sock: &mut TcpStream, conn: &mut rustls::Connection) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Source for Transport {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) | Transport::Tls(s, _) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) | Transport::Tls(s, _) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Transport::Plain(s) | Transport::Tls(s, _) => s.deregister(r),
        }
    }
}
