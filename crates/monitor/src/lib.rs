//! Godwit's monitor: one command layer ([`Monitor`], [`Command`] → [`Reply`]) with two front
//! ends — HMP, QEMU's human monitor ([`hmp`]), and QMP, QEMU's JSON protocol ([`qmp`]) — plus
//! asynchronous events ([`EventBus`]) and the transports QEMU users expect: unix and TCP
//! sockets ([`MonitorServer`]) and the stdio console shared with the serial port
//! ([`StdioMux`]).
//!
//! The monitor does not know the VMM. The VMM implements [`Backend`] and emits [`Event`]s on
//! the bus; everything else (parsing, argument checking, rendering, negotiation, job
//! bookkeeping, client isolation) lives here. See `docs/monitor.md` for the command set.
//!
//! ```no_run
//! use monitor::{ChardevSpec, EventBus, Monitor, MonitorServer, Protocol, RunState, ServeOptions};
//! let events = EventBus::new();
//! let vm = monitor::mock::MockVm::new(events.clone(), RunState::Running, 1); // the VMM's Backend
//! let mon = Monitor::new(vm, events);
//! let spec = ChardevSpec::parse("unix:/tmp/qmp.sock,server,nowait").unwrap();
//! let _qmp = MonitorServer::start(mon, &spec, Protocol::Qmp, ServeOptions::default()).unwrap();
//! ```

pub mod backend;
pub mod block;
pub mod chardev;
pub mod command;
pub mod error;
pub mod events;
pub mod flush;
pub mod hmp;
pub mod hostinfo;
pub mod jobs;
pub mod migration;
pub mod mock;
pub mod probe;
mod monitor;
pub mod mux;
pub mod qmp;
pub mod runstate;
pub mod server;
pub mod term;
pub mod types;
mod util;

pub use backend::{Backend, CmdResult};
pub use chardev::ChardevSpec;
pub use command::{Command, MigrateArgs, Reply, SnapshotOp, SnapshotRequest};
pub use error::{CommandError, ErrorClass, MonitorError};
pub use events::{Event, EventBus, EventRecord, Timestamp};
pub use migration::{
    CapabilityStatus, MigrationCapability, MigrationForecast, MigrationInfo, MigrationParameters,
    MigrationStrategy, RamStats, StrategyForecast,
};
pub use monitor::Monitor;
pub use mux::{Focus, MuxExit, MuxOptions, MuxWriter, SerialSink, StdioMux};
pub use runstate::{InvalidTransition, RunState, RunStateMachine};
pub use server::{
    run_hmp_stream, run_qmp_stream, ListenAddr, MonitorServer, Protocol, ServeOptions,
};
pub use term::RawTerminal;
pub use types::{
    CpuInfo, JobInfo, JobStatus, JobType, MemorySpace, MigrationStatus, ShutdownCause,
    SnapshotInfo, StatusInfo, VersionInfo, VersionTriple, QEMU_COMPAT_VERSION,
};
