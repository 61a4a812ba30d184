//! MAC addresses: parsing the `aa:bb:cc:dd:ee:ff` form QEMU's `mac=`/`macaddr=` take, printing,
//! and the default address of NIC `n` (QEMU's `52:54:00:12:34:56 + n` scheme, locally
//! administered, unicast).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed MAC address '{text}': {reason} (expected six hex pairs like 52:54:00:12:34:56)")]
pub struct MacParseError {
    pub text: String,
    pub reason: &'static str,
}

impl MacAddr {
    /// The broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// The default address of the `n`-th NIC of a VM, as QEMU assigns them.
    pub fn default_for(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(n)])
    }

    /// True for a group (multicast or broadcast) address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, MacParseError> {
        let err = |reason| MacParseError { text: s.to_string(), reason };
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(err("not six bytes"));
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(err("each byte is two hex digits"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err("not a hex digit"))?;
        }
        let mac = MacAddr(m);
        if mac.is_multicast() {
            return Err(err("a multicast address cannot be a NIC's address"));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert_eq!("52-54-00-ab-cd-01".parse::<MacAddr>().unwrap(), m);
        assert_eq!(MacAddr::default_for(0).to_string(), "52:54:00:12:34:56");
        assert_eq!(MacAddr::default_for(1).to_string(), "52:54:00:12:34:57");
    }

    #[test]
    fn malformed() {
        for s in ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:5", "52:54:00:12:34:zz", "01:00:5e:00:00:01", "5254.0012.3456"] {
            let e = s.parse::<MacAddr>().unwrap_err();
            assert!(e.to_string().contains("malformed MAC address"), "{s}: {e}");
        }
    }
}
