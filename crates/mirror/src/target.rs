//! Where the mirror writes: [`MirrorTarget`], implemented for an NBD client (writes pipelined
//! up to a window) and for any local [`BlockBackend`].

use qcow2::BlockBackend;

/// A mirror destination. `write`/`zero` may only queue the request; `drain` waits for all.
pub trait MirrorTarget: Send {
    fn size(&self) -> u64;
    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), String>;
    fn zero(&mut self, off: u64, len: u64) -> Result<(), String>;
    fn drain(&mut self) -> Result<(), String>;
    fn flush(&mut self) -> Result<(), String>;
    /// The target as a block backend, to pivot a drive onto it (`block-job-complete`).
    fn into_backend(self: Box<Self>) -> Option<Box<dyn BlockBackend>>;
}

/// Requests in flight on the NBD connection before the mirror waits for a reply.
const NBD_WINDOW: usize = 16;

/// An NBD export as the mirror target.
pub struct NbdTarget(pub nbd::NbdClient);

impl NbdTarget {
    fn room(&mut self) -> Result<(), String> {
        while self.0.in_flight() >= NBD_WINDOW {
            self.0.recv_reply().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl MirrorTarget for NbdTarget {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), String> {
        let max = self.0.max_block() as usize;
        for (i, c) in data.chunks(max).enumerate() {
            self.room()?;
            self.0.send_write(off + (i * max) as u64, c, false).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    fn zero(&mut self, off: u64, len: u64) -> Result<(), String> {
        let step = (self.0.max_block() as u64) & !4095;
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(step);
            self.room()?;
            self.0.send_write_zeroes(pos, n as u32).map_err(|e| e.to_string())?;
            pos += n;
        }
        Ok(())
    }
    fn drain(&mut self) -> Result<(), String> {
        self.0.drain().map_err(|e| e.to_string())
    }
    fn flush(&mut self) -> Result<(), String> {
        self.0.flush().map_err(|e| e.to_string())
    }
    fn into_backend(self: Box<Self>) -> Option<Box<dyn BlockBackend>> {
        Some(Box::new(self.0))
    }
}

/// A local block backend as the target (synchronous).
pub struct BackendTarget(pub Box<dyn BlockBackend>);

impl MirrorTarget for BackendTarget {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), String> {
        self.0.write_at(off, data).map_err(|e| e.to_string())
    }
    fn zero(&mut self, off: u64, len: u64) -> Result<(), String> {
        self.0.write_zeroes(off, len).map_err(|e| e.to_string())
    }
    fn drain(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), String> {
        self.0.flush().map_err(|e| e.to_string())
    }
    fn into_backend(self: Box<Self>) -> Option<Box<dyn BlockBackend>> {
        Some(self.0)
    }
}
