//! The HMP command table: every command and `info` subcommand with its names and aliases,
//! argument synopsis and help text, in `help` order (what `help` prints and what the parser
//! accepts as a command name).

/// One HMP command (or `info` subcommand) as `help` lists it.
#[derive(Debug, Clone, Copy)]
pub struct HmpEntry {
    /// `name|alias` as shown by help.
    pub names: &'static str,
    pub params: &'static str,
    pub help: &'static str,
}

/// Top-level commands, in `help` order.
pub const COMMANDS: &[HmpEntry] = &[
    HmpEntry {
        names: "announce_self",
        params: "[interfaces] [id]",
        help: "trigger GARP/RARP announcements",
    },
    HmpEntry {
        names: "cont|c",
        params: "",
        help: "resume emulation",
    },
    HmpEntry {
        names: "cpu",
        params: "index",
        help: "set the default CPU",
    },
    HmpEntry {
        names: "delvm",
        params: "tag",
        help: "delete a VM snapshot from its tag",
    },
    HmpEntry {
        names: "help|?",
        params: "[cmd]",
        help: "show the help",
    },
    HmpEntry {
        names: "info",
        params: "[subcommand]",
        help: "show various information about the system state",
    },
    HmpEntry {
        names: "loadvm",
        params: "tag",
        help: "restore a VM snapshot from its tag",
    },
    HmpEntry {
        names: "migrate",
        params: "[-d] [-r [file]] uri",
        help: "migrate to URI (-d: do not wait for completion; -r FILE: write the per-round \
               report to FILE; -r alone: resume a paused post-copy migration)",
    },
    HmpEntry {
        names: "migrate_cancel",
        params: "",
        help: "cancel the current VM migration",
    },
    HmpEntry {
        names: "migrate_incoming",
        params: "uri",
        help: "continue an incoming migration from an -incoming defer",
    },
    HmpEntry {
        names: "migrate_recover",
        params: "uri",
        help: "continue a paused incoming postcopy migration",
    },
    HmpEntry {
        names: "migrate_set_capability",
        params: "capability state",
        help: "enable/disable the usage of a capability for migration",
    },
    HmpEntry {
        names: "migrate_set_parameter",
        params: "parameter value",
        help: "set the parameter for migration",
    },
    HmpEntry {
        names: "migrate_continue",
        params: "state",
        help: "continue migration from the given paused state",
    },
    HmpEntry {
        names: "migrate_start_postcopy",
        params: "",
        help: "followup to a migration command to switch the migration to postcopy mode",
    },
    HmpEntry {
        names: "quit|q",
        params: "",
        help: "quit the emulator",
    },
    HmpEntry {
        names: "savevm",
        params: "[tag]",
        help: "save a VM snapshot; without a tag a new snapshot named vm-DATE is created",
    },
    HmpEntry {
        names: "stop|s",
        params: "",
        help: "stop emulation",
    },
    HmpEntry {
        names: "system_powerdown",
        params: "",
        help: "send system power down event",
    },
    HmpEntry {
        names: "system_reset",
        params: "",
        help: "reset the system",
    },
    HmpEntry {
        names: "x",
        params: "/fmt addr",
        help: "virtual memory dump starting at 'addr'",
    },
    HmpEntry {
        names: "xp",
        params: "/fmt addr",
        help: "physical memory dump starting at 'addr'",
    },
];

/// `info` subcommands, in `help info` order.
pub const INFO_COMMANDS: &[HmpEntry] = &[
    HmpEntry {
        names: "cpus",
        params: "",
        help: "show infos for each CPU",
    },
    HmpEntry {
        names: "migrate",
        params: "",
        help: "show migration status",
    },
    HmpEntry {
        names: "migrate_capabilities",
        params: "",
        help: "show current migration capabilities",
    },
    HmpEntry {
        names: "migrate_forecast",
        params: "",
        help: "predict whether and how fast a migration would converge, per strategy",
    },
    HmpEntry {
        names: "network",
        params: "",
        help: "show the network state",
    },
    HmpEntry {
        names: "migrate_parameters",
        params: "",
        help: "show current migration parameters",
    },
    HmpEntry {
        names: "snapshots",
        params: "",
        help: "show the currently saved VM snapshots",
    },
    HmpEntry {
        names: "status",
        params: "",
        help: "show the current VM status (running|paused)",
    },
    HmpEntry {
        names: "version",
        params: "",
        help: "show the version of QEMU this monitor speaks",
    },
];
