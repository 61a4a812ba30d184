//! A fixed-size output line with decimal and hex formatting (no `core::fmt`), sent through the
//! write system call. CPL3 only.

use crate::kernel::sys;
use crate::user::syscall;

pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Line { buf: [0; 512], len: 0 }
    }
    pub fn byte(&mut self, b: u8) -> &mut Self {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
        self
    }
    pub fn s(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            self.byte(b);
        }
        self
    }
    pub fn u(&mut self, mut v: u64) -> &mut Self {
        let mut d = [0u8; 20];
        let mut n = 0;
        loop {
            d[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.byte(d[n]);
        }
        self
    }
    pub fn x(&mut self, v: u64) -> &mut Self {
        self.s("0x");
        let mut started = false;
        for i in (0..16).rev() {
            let d = ((v >> (4 * i)) & 0xf) as u8;
            if d != 0 || started || i == 0 {
                started = true;
                self.byte(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
        self
    }
    /// Append "\n" and write the line to the serial port.
    pub fn send(&mut self) {
        self.byte(b'\n');
        syscall(sys::WRITE, self.buf.as_ptr() as u64, self.len as u64, 0);
        self.len = 0;
    }
}
