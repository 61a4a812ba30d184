//! Save/restore of a virtio-mmio device ([`vmstate::Stateful`] for [`MmioTransport`]).
//!
//! Section `dev.virtio-<name><index>` (e.g. `dev.virtio-blk0`), version 1: the status, the
//! features offered and accepted with their selectors, the queue selector, each queue's
//! configuration (size, ready, ring addresses) and progress (`next_avail`, `next_used`,
//! event-idx), the interrupt status, the config generation, and the device config space
//! (which holds the disk capacity).
//!
//! The VMM pauses the device before saving ([`MmioTransport::pause`] drains the request in
//! flight), so no popped-but-unfinished request exists at save time: everything the guest
//! queued and the device did not take is still in the available ring, in guest RAM, and is
//! served once after the restore. Restoring checks everything first (same device type, queue
//! count and maxima, the negotiated features offered here, the same config space, rings in
//! guest RAM) and changes nothing when a check fails. A device that was running (`DRIVER_OK`)
//! is re-activated; it keeps the paused/running mode it had before the restore, and when
//! running it starts on the rings at once, so restore it after guest RAM (or keep it paused
//! until then).

use crate::device::{status, VirtioDevice};
use crate::mmio::{lock, MmioTransport};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmstate::{Section, StateError, Stateful};

/// Current section version.
pub const STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct QueueV1 {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct TransportV1 {
    device_type: u32,
    status: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    config: Vec<u8>,
    queues: Vec<QueueV1>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; self.device.config_len()];
        self.device.read_config(0, &mut c);
        c
    }

    fn state_err(&self, reason: impl Into<String>) -> StateError {
        StateError::Mismatch(format!("{}: {}", self.state_id(), reason.into()))
    }

    /// Checks a decoded state against this device and builds its queues.
    fn validate(&self, s: &TransportV1) -> vmstate::Result<Vec<Queue>> {
        if s.device_type != self.device.device_type() {
            return Err(self.state_err(format!(
                "saved device type {} but this is type {}",
                s.device_type,
                self.device.device_type()
            )));
        }
        let maxes = self.device.queue_max_sizes();
        if s.queues.len() != maxes.len() {
            return Err(self.state_err(format!("{} queues saved, {} here", s.queues.len(), maxes.len())));
        }
        let offered = self.device.device_features();
        if s.driver_features & !offered != 0 {
            return Err(self.state_err(format!(
                "the guest negotiated features {:#x} this device does not offer (offers {offered:#x})",
                s.driver_features
            )));
        }
        let config = self.config_bytes();
        if s.config != config {
            return Err(self.state_err("device configuration differs (disk size or properties changed)"));
        }
        let running = s.status & status::DRIVER_OK != 0;
        let mut queues = Vec::with_capacity(maxes.len());
        for (i, (q, &max)) in s.queues.iter().zip(maxes).enumerate() {
            if q.max_size != max {
                return Err(self.state_err(format!("queue {i}: saved maximum size {} but {max} here", q.max_size)));
            }
            let st = QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            let queue = Queue::try_from(st).map_err(|e| StateError::Malformed {
                id: self.state_id(),
                reason: format!("queue {i}: {e}"),
            })?;
            if running && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(self.state_err(format!("queue {i}: rings are outside guest RAM")));
            }
            queues.push(queue);
        }
        Ok(queues)
    }
}

impl<D: VirtioDevice> Stateful for MmioTransport<D> {
    fn state_id(&self) -> String {
        format!("dev.virtio-{}{}", self.device.name(), self.index)
    }

    fn save_state(&self) -> vmstate::Result<Section> {
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let q = lock(q);
                QueueV1 {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                }
            })
            .collect();
        let s = TransportV1 {
            device_type: self.device.device_type(),
            status: self.status,
            device_features: self.device.device_features(),
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            config: self.config_bytes(),
            queues,
        };
        Section::encode(self.state_id(), STATE_VERSION, &s)
    }

    fn restore_state(&mut self, section: &Section) -> vmstate::Result<()> {
        let s: TransportV1 = section.decode(&self.state_id(), STATE_VERSION)?;
        let queues = self.validate(&s)?;
        // Stop the worker, then put everything back.
        self.reset();
        for (slot, q) in self.queues.iter().zip(queues) {
            *lock(slot) = q;
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt.set_status(s.interrupt_status);
        self.status = s.status;
        let running = s.status & status::DRIVER_OK != 0 && s.status & status::DEVICE_NEEDS_RESET == 0;
        if running {
            self.activate().map_err(|e| StateError::Apply { id: self.state_id(), reason: e.to_string() })?;
            if s.interrupt_status != 0 {
                // A spurious interrupt is harmless; a lost one would hang the driver.
                self.interrupt.trigger(0);
            }
            // The driver may have queued requests (and kicked) before the state was saved;
            // that kick went to the old worker. A spurious kick is harmless, a lost one hangs a
            // polling driver forever: look at every queue once.
            self.kick_all_queues();
        }
        Ok(())
    }
}
