//! A pool of large I/O buffers. A connection takes a buffer only while it has bytes in
//! flight and gives it back when idle, so a thousand idle clients hold no buffers at all.
//! The pool keeps a bounded number of free buffers; past that, returned buffers are freed.

pub struct BufPool {
    size: usize,
    max_free: usize,
    free: Vec<Box<[u8]>>,
    /// One buffer for data that is consumed before the call that filled it returns (a
    /// super-frame read from an offloading TAP, cut into frames at once).
    scratch: Vec<u8>,
}

impl BufPool {
    pub fn new(size: usize, max_free: usize) -> BufPool {
        BufPool { size, max_free, free: Vec::new(), scratch: Vec::new() }
    }

    /// The scratch buffer, at least `len` bytes (allocated on first use).
    pub fn scratch(&mut self, len: usize) -> &mut [u8] {
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        &mut self.scratch[..len]
    }

    pub fn get(&mut self) -> Box<[u8]> {
        self.free.pop().unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }

    pub fn put(&mut self, buf: Box<[u8]>) {
        if self.free.len() < self.max_free {
            self.free.push(buf);
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let mut p = BufPool::new(1024, 2);
        let a = p.get();
        let ptr = a.as_ptr();
        p.put(a);
        let b = p.get();
        assert_eq!(b.as_ptr(), ptr);
        for _ in 0..5 {
            p.put(vec![0; 1024].into_boxed_slice());
        }
        assert_eq!(p.free_count(), 2);
    }
}
