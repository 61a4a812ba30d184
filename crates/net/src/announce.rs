//! Announcing a guest after it moved (live migration switchover, `loadvm`): the destination
//! sends a few broadcast frames with the guest's MAC as source, so every switch and Linux
//! bridge on the segment re-learns which port the guest is behind at once, instead of
//! forwarding to the old host until its forwarding entry ages out (minutes).
//!
//! The frame is a RARP request (EtherType 0x8035, "reverse request", sender and target
//! hardware address = the guest's MAC, both protocol addresses 0.0.0.0), padded to the 60-byte
//! Ethernet minimum; this is what QEMU's `announce-self` sends, so equipment tuned for QEMU
//! migrations sees the same thing. It needs no knowledge of the guest's IP address.
//!
//! Timing follows QEMU's migration parameters: `rounds` frames per NIC; the first at once, then
//! after `initial` ms, and each later gap `step` ms longer than the one before, capped at `max`
//! ms. With the defaults (5 rounds, 50/550/100 ms) the frames leave at 0, 50, 200, 450 and
//! 800 ms. `rounds = 0` disables announcements.

use crate::mac::MacAddr;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// EtherType of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Length of an announcement frame (minimum Ethernet frame without the FCS).
pub const FRAME_LEN: usize = 60;

/// Builds the announcement frame for `mac` (without any virtio-net header).
pub fn rarp_frame(mac: MacAddr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    let m = mac.bytes();
    f[0..6].copy_from_slice(&MacAddr::BROADCAST.0); // destination
    f[6..12].copy_from_slice(&m); // source: the guest
    f[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // operation: reverse request
    f[22..28].copy_from_slice(&m); // sender hardware address
    // 28..32 sender protocol address 0.0.0.0
    f[32..38].copy_from_slice(&m); // target hardware address
    // 38..42 target protocol address 0.0.0.0, 42..60 padding
    f
}

/// How many announcements and when (QEMU's `announce-*` migration parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceParams {
    /// Frames per NIC; 0 = do not announce.
    pub rounds: u32,
    /// Gap after the first frame, ms.
    pub initial_ms: u64,
    /// Largest gap, ms.
    pub max_ms: u64,
    /// How much each gap grows, ms.
    pub step_ms: u64,
}

impl Default for AnnounceParams {
    /// QEMU's defaults: 5 rounds, 50 ms initial, 550 ms max, 100 ms step.
    fn default() -> Self {
        AnnounceParams { rounds: 5, initial_ms: 50, max_ms: 550, step_ms: 100 }
    }
}

impl AnnounceParams {
    /// The gap before round `k` (k ≥ 1; round 0 is immediate).
    pub fn gap(&self, k: u32) -> Duration {
        let ms = self
            .initial_ms
            .saturating_add(self.step_ms.saturating_mul(u64::from(k.saturating_sub(1))))
            .min(self.max_ms);
        Duration::from_millis(ms)
    }

    /// When each round is due, relative to the start.
    pub fn offsets(&self) -> Vec<Duration> {
        let mut t = Duration::ZERO;
        (0..self.rounds)
            .map(|k| {
                if k > 0 {
                    t += self.gap(k);
                }
                t
            })
            .collect()
    }
}

/// A running announcement: which round is next and when it is due.
#[derive(Debug, Clone)]
pub struct AnnounceSchedule {
    params: AnnounceParams,
    sent: u32,
    next: Instant,
}

impl AnnounceSchedule {
    /// Starts a schedule whose first round is due at `now`; `None` when `rounds` is 0.
    pub fn start(params: AnnounceParams, now: Instant) -> Option<Self> {
        (params.rounds > 0).then_some(AnnounceSchedule { params, sent: 0, next: now })
    }

    /// When the next round is due.
    pub fn deadline(&self) -> Instant {
        self.next
    }

    /// True if a round is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// Records a round as sent at `now`; returns false once all rounds are done.
    pub fn sent(&mut self, now: Instant) -> bool {
        self.sent += 1;
        if self.sent >= self.params.rounds {
            return false;
        }
        self.next = now + self.params.gap(self.sent);
        true
    }

    /// Rounds sent so far.
    pub fn rounds_sent(&self) -> u32 {
        self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_bytes() {
        let mac = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let f = rarp_frame(mac);
        let mut want = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        want.extend([0x80, 0x35, 0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03]);
        want.extend([0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0]);
        want.extend([0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0]);
        want.resize(60, 0);
        assert_eq!(f.to_vec(), want);
    }

    #[test]
    fn default_schedule_matches_qemu() {
        let p = AnnounceParams::default();
        let ms: Vec<u128> = p.offsets().iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![0, 50, 200, 450, 800]);
    }

    #[test]
    fn gaps_are_capped_and_zero_rounds_disable() {
        let p = AnnounceParams { rounds: 8, initial_ms: 100, max_ms: 250, step_ms: 100 };
        let gaps: Vec<u128> = (1..8).map(|k| p.gap(k).as_millis()).collect();
        assert_eq!(gaps, vec![100, 200, 250, 250, 250, 250, 250]);
        assert!(AnnounceSchedule::start(AnnounceParams { rounds: 0, ..p }, Instant::now()).is_none());
        let big = AnnounceParams { rounds: 3, initial_ms: u64::MAX, max_ms: 10, step_ms: u64::MAX };
        assert_eq!(big.gap(2), Duration::from_millis(10));
    }

    #[test]
    fn schedule_runs_its_rounds() {
        let p = AnnounceParams { rounds: 3, ..Default::default() };
        let t0 = Instant::now();
        let mut s = AnnounceSchedule::start(p, t0).unwrap();
        assert!(s.due(t0));
        assert!(s.sent(t0));
        assert_eq!(s.deadline(), t0 + Duration::from_millis(50));
        assert!(!s.due(t0 + Duration::from_millis(49)));
        let t1 = s.deadline();
        assert!(s.sent(t1));
        assert_eq!(s.deadline(), t1 + Duration::from_millis(150));
        assert!(!s.sent(s.deadline()));
        assert_eq!(s.rounds_sent(), 3);
    }
}
