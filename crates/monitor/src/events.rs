//! Asynchronous events (QMP's `STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`, ...): the typed
//! [`Event`], its wire form with a wall-clock timestamp, and the [`EventBus`] that broadcasts
//! every event to every subscriber (each connected, negotiated QMP client). Emitting never
//! blocks: a subscriber whose queue is full is dropped (its client is disconnected) rather than
//! stalling the VMM.

use crate::types::{JobStatus, MigrationStatus, ShutdownCause};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// An event, with QEMU's name and data members.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The VM left the running state.
    Stop,
    /// The VM entered the running state.
    Resume,
    /// The guest was asked to power down (ACPI power button).
    Powerdown,
    /// The guest or the host shut the VM down.
    Shutdown { guest: bool, reason: ShutdownCause },
    /// The VM was reset.
    Reset { guest: bool, reason: ShutdownCause },
    /// A migration changed status.
    Migration { status: MigrationStatus },
    /// A migration started RAM pass number `pass` (1 is the first full pass).
    MigrationPass { pass: u64 },
    /// A job (e.g. `snapshot-save`) changed status.
    JobStatusChange { id: String, status: JobStatus },
    /// Any other event: `name` in QEMU's upper-case spelling, `data` an object or nothing.
    Other { name: String, data: Option<Value> },
}

impl Event {
    /// QEMU's name for the event (`"STOP"`, `"JOB_STATUS_CHANGE"`, ...).
    pub fn name(&self) -> &str {
        match self {
            Event::Stop => "STOP",
            Event::Resume => "RESUME",
            Event::Powerdown => "POWERDOWN",
            Event::Shutdown { .. } => "SHUTDOWN",
            Event::Reset { .. } => "RESET",
            Event::Migration { .. } => "MIGRATION",
            Event::MigrationPass { .. } => "MIGRATION_PASS",
            Event::JobStatusChange { .. } => "JOB_STATUS_CHANGE",
            Event::Other { name, .. } => name,
        }
    }

    /// The `data` member, `None` for events without data (QEMU then omits the member).
    pub fn data(&self) -> Option<Value> {
        match self {
            Event::Stop | Event::Resume | Event::Powerdown => None,
            Event::Shutdown { guest, reason } | Event::Reset { guest, reason } => {
                Some(json!({ "guest": guest, "reason": reason }))
            }
            Event::Migration { status } => Some(json!({ "status": status })),
            Event::MigrationPass { pass } => Some(json!({ "pass": pass })),
            Event::JobStatusChange { id, status } => Some(json!({ "id": id, "status": status })),
            Event::Other { data, .. } => data.clone(),
        }
    }
}

/// Wall-clock time of an event, as QMP sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs(),
            microseconds: d.subsec_micros(),
        }
    }
}

/// An emitted event: the event and when it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub event: Event,
    pub timestamp: Timestamp,
}

impl EventRecord {
    pub fn name(&self) -> &str {
        self.event.name()
    }

    /// The QMP wire object: `{"event": .., "data": .., "timestamp": {"seconds": .., "microseconds": ..}}`
    /// (`data` only when the event has members, as QEMU does).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("event".into(), Value::String(self.event.name().to_string()));
        if let Some(data) = self.event.data() {
            m.insert("data".into(), data);
        }
        m.insert(
            "timestamp".into(),
            json!({ "seconds": self.timestamp.seconds, "microseconds": self.timestamp.microseconds }),
        );
        Value::Object(m)
    }
}

/// Identifies a subscription for [`EventBus::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// What a subscriber callback tells the bus after a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Keep me subscribed.
    Keep,
    /// Remove me (my client is gone or too slow).
    Drop,
}

type Subscriber = Box<dyn FnMut(&Arc<EventRecord>) -> Delivery + Send>;

#[derive(Default)]
struct BusInner {
    next_id: u64,
    subscribers: Vec<(u64, Subscriber)>,
}

/// Broadcasts events to every subscriber. Cheap to clone; all clones share the subscribers.
/// The VMM keeps a clone and calls [`emit`](Self::emit).
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<Mutex<BusInner>>,
}

impl EventBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BusInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stamps `event` with the current time and hands it to every subscriber, in subscription
    /// order. Never blocks on a subscriber (callbacks must not block either).
    pub fn emit(&self, event: Event) {
        let record = Arc::new(EventRecord {
            event,
            timestamp: Timestamp::now(),
        });
        tracing::debug!(event = record.name(), "monitor event");
        let mut inner = self.lock();
        inner
            .subscribers
            .retain_mut(|(_, f)| f(&record) == Delivery::Keep);
    }

    /// Registers a callback run for each event (under the bus lock: it must be quick).
    pub fn subscribe_fn(
        &self,
        f: impl FnMut(&Arc<EventRecord>) -> Delivery + Send + 'static,
    ) -> SubscriptionId {
        self.subscribe_fn_then(f, || ()).0
    }

    /// Like [`subscribe_fn`](Self::subscribe_fn), and runs `then` while no event can be
    /// emitted: whatever `then` queues comes before the first event the callback sees (QMP
    /// uses it so the `qmp_capabilities` reply precedes every event, with no event lost between
    /// them). `then` must not block.
    pub fn subscribe_fn_then<T>(
        &self,
        f: impl FnMut(&Arc<EventRecord>) -> Delivery + Send + 'static,
        then: impl FnOnce() -> T,
    ) -> (SubscriptionId, T) {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.subscribers.push((id, Box::new(f)));
        let t = then();
        (SubscriptionId(id), t)
    }

    /// A queue of the events emitted from now on. If the queue holds `capacity` undelivered
    /// events the subscription is dropped and the receiver sees a disconnect after draining.
    pub fn subscribe(&self, capacity: usize) -> Receiver<Arc<EventRecord>> {
        let (tx, rx): (SyncSender<Arc<EventRecord>>, _) = mpsc::sync_channel(capacity.max(1));
        self.subscribe_fn(move |rec| match tx.try_send(rec.clone()) {
            Ok(()) => Delivery::Keep,
            Err(TrySendError::Full(_)) => {
                tracing::warn!("event subscriber too slow; dropping it");
                Delivery::Drop
            }
            Err(TrySendError::Disconnected(_)) => Delivery::Drop,
        });
        rx
    }

    /// Removes a subscription (no effect if it is already gone).
    pub fn unsubscribe(&self, id: SubscriptionId) {
        self.lock().subscribers.retain(|(i, _)| *i != id.0);
    }

    /// Number of live subscriptions (for tests and diagnostics).
    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_matches_qemu() {
        let rec = EventRecord {
            event: Event::Shutdown {
                guest: true,
                reason: ShutdownCause::GuestShutdown,
            },
            timestamp: Timestamp {
                seconds: 5,
                microseconds: 7,
            },
        };
        assert_eq!(
            rec.to_json(),
            json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"},
                   "timestamp": {"seconds": 5, "microseconds": 7}})
        );
        let stop = EventRecord {
            event: Event::Stop,
            timestamp: Timestamp {
                seconds: 1,
                microseconds: 2,
            },
        };
        assert_eq!(
            stop.to_json(),
            json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})
        );
        let job = Event::JobStatusChange {
            id: "j0".into(),
            status: JobStatus::Concluded,
        };
        assert_eq!(job.data(), Some(json!({"id": "j0", "status": "concluded"})));
        let m = Event::Migration {
            status: MigrationStatus::PostcopyActive,
        };
        assert_eq!(m.data(), Some(json!({"status": "postcopy-active"})));
        assert_eq!(
            Event::MigrationPass { pass: 3 }.data(),
            Some(json!({"pass": 3}))
        );
    }

    #[test]
    fn broadcast_reaches_every_subscriber_and_slow_ones_are_dropped() {
        let bus = EventBus::new();
        let a = bus.subscribe(8);
        let b = bus.subscribe(1);
        bus.emit(Event::Stop);
        bus.emit(Event::Resume); // b is full now: dropped
        assert_eq!(bus.subscriber_count(), 1);
        assert_eq!(
            a.try_iter()
                .map(|r| r.name().to_string())
                .collect::<Vec<_>>(),
            ["STOP", "RESUME"]
        );
        assert_eq!(
            b.try_iter()
                .map(|r| r.name().to_string())
                .collect::<Vec<_>>(),
            ["STOP"]
        );
        drop(a);
        bus.emit(Event::Stop); // a's receiver is gone: dropped on delivery
        assert_eq!(bus.subscriber_count(), 0);
    }
}
