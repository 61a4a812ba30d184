//! multifd (`migrate_set_capability multifd on`, `multifd-channels`, `multifd-compression`):
//! migrations over several connections end with the guest's ledger verified on the
//! destination — on loopback with TLS and auto-converge, and with 4 channels and zstd across a shaped link
//! between two network namespaces (tc: tbf rate, netem delay and loss); one channel cut in the
//! middle fails the migration cleanly, the source running on with its memory intact; post-copy
//! with multifd is refused.

mod common;
mod linksim;
mod tlsutil;
use common::*;
use linksim::{Link, Shape};
use std::path::Path;
use std::time::Duration;
use tlsutil::*;

const T: Duration = Duration::from_secs(120);

fn monitor_arg(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let sock = dir.join(name);
    let mon = format!("unix:{},server,nowait", sock.display());
    (sock, mon)
}

fn set(hmp: &mut Hmp, line: &str) {
    let out = hmp.cmd(line);
    assert!(out.trim().is_empty(), "{line}: {out}");
}

#[test]
fn multifd_with_tls_and_zlib_on_loopback() {
    let dir = tmpdir("mfd-tls");
    let ca = Ca::new("Godwit test CA");
    let srv = ca.server_dir(&dir.join("server"), &["localhost", "127.0.0.1"]);
    let cli = ca.client_dir(&dir.join("client"), &ca);
    let append = "mode=dirty mib=96 rate=40 entropy=50 hb_ms=100 cpus=1";
    let port = free_port();
    let (dsock, dmon) = monitor_arg(&dir, "dst.sock");
    let sobj = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", srv.display());
    let incoming = format!("tcp:127.0.0.1:{port}");
    let mut dst = Vm::guest(&["-m", "256", "-monitor", &dmon, "-object", &sobj, "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let mut dh = Hmp::connect(&dsock);
    set(&mut dh, "migrate_set_parameter tls-creds tls0");
    let (ssock, smon) = monitor_arg(&dir, "src.sock");
    let cobj = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", cli.display());
    let mut src = Vm::guest(&["-m", "256", "-monitor", &smon, "-object", &cobj], append);
    src.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&ssock);
    set(&mut hmp, "migrate_set_capability multifd on");
    // QEMU refuses post-copy with multifd; so does Godwit.
    assert!(hmp.cmd("migrate_set_capability postcopy-ram on").contains("Postcopy is not yet compatible with multifd"));
    // multifd composes with auto-converge (it throttles the guest if it outruns the link).
    set(&mut hmp, "migrate_set_capability auto-converge on");
    set(&mut hmp, "migrate_set_parameter multifd-channels 3");
    set(&mut hmp, "migrate_set_parameter multifd-compression zlib");
    set(&mut hmp, "migrate_set_parameter tls-creds tls0");
    let caps = hmp.cmd("info migrate_capabilities");
    assert!(caps.contains("multifd: on"), "{caps}");
    let params = hmp.cmd("info migrate_parameters");
    assert!(params.contains("multifd-channels: 3") && params.contains("multifd-compression: zlib"), "{params}");
    for _ in 0..5 {
        src.wait_for("HEARTBEAT", T);
    }
    hmp.cmd(&format!("migrate {incoming}"));
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: completed"), "{info}");
    let mb = info.lines().find(|l| l.starts_with("multifd bytes:")).and_then(|l| l.split_whitespace().nth(2)).and_then(|v| v.parse::<u64>().ok());
    assert!(mb.is_some_and(|k| k > 1024), "RAM went over the channels: {info}");
    src.collect_for(Duration::from_millis(200));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    hmp.quit();
    src.wait_exit(T);
}

#[test]
fn one_multifd_connection_cut_fails_cleanly() {
    let (mut dst, mut src, mut hmp, port) = loopback_pair("mfd-cut", "mode=dirty mib=128 rate=20 hb_ms=100 cpus=1");
    set(&mut hmp, "migrate_set_capability multifd on");
    set(&mut hmp, "migrate_set_parameter multifd-channels 4");
    // Slow enough that the cut lands in the middle of the first pass.
    set(&mut hmp, "migrate_set_parameter max-bandwidth 40");
    for _ in 0..10 {
        src.wait_for("HEARTBEAT", T);
    }
    // Connection 0 is the main one; 1..=4 are the channels: cut the third channel after 4 MiB.
    let p = proxy(port, Fault::CutAfter { conn: 3, after: 4 << 20 });
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{}", p.port));
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: failed"), "{info}");
    assert!(info.contains("multifd channel"), "the reason names the channel: {info}");
    assert!(hmp.cmd("info status").contains("running"));
    let h1 = src.wait_for("HEARTBEAT", T);
    let h2 = src.wait_for("HEARTBEAT", T);
    assert!(field(&h2, "seq") > field(&h1, "seq"));
    src.send(b"v");
    src.wait_for("LEDGER OK", T);
    assert_eq!(dst.wait_exit(T), Some(1));
    let err = dst.stderr.lock().unwrap().clone();
    assert!(err.contains("incoming migration failed"), "{err}");
    assert!(!dst.seen.iter().any(|l| l.contains("HEARTBEAT")), "destination ran the guest");
    hmp.quit();
    src.wait_exit(T);
}

/// Spawns godwit with the test guest inside a namespace.
fn in_ns(ns: &str, args: &[&str], append: &str) -> Vm {
    let g = guest_bin();
    let godwit = godwit_bin();
    let mut full = vec!["netns", "exec", ns, godwit.to_str().unwrap(), "-kernel", g.to_str().unwrap(), "-append", append];
    full.extend_from_slice(args);
    Vm::spawn_cmd("ip", &full)
}

/// `NAME: N kbytes` from `info migrate`.
fn kbytes(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim_start_matches(':').split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no '{name}' in {info}"))
}

#[test]
fn four_channels_with_zstd_over_a_shaped_link() {
    // A 1 Gbit/s link (tbf) between two namespaces; the guest rewrites 128 MiB at 60 MiB/s with
    // pages three-quarters compressible.
    let link = Link::new("mfd", Shape { rate_bps: 1_000_000_000, ..Default::default() });
    let dir = tmpdir("mfd-link");
    let append = "mode=dirty mib=128 rate=60 entropy=25 hb_ms=100 cpus=1";
    let incoming = format!("tcp:{}:6667", link.b_addr);
    let mut dst = in_ns(&link.b, &["-m", "512", "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let (ssock, smon) = monitor_arg(&dir, "src.sock");
    let mut src = in_ns(&link.a, &["-m", "512", "-monitor", &smon], append);
    src.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&ssock);
    set(&mut hmp, "migrate_set_capability multifd on");
    set(&mut hmp, "migrate_set_parameter multifd-channels 4");
    set(&mut hmp, "migrate_set_parameter multifd-compression zstd");
    set(&mut hmp, "migrate_set_parameter multifd-zstd-level 1");
    for _ in 0..10 {
        src.wait_for("HEARTBEAT", T);
    }
    hmp.cmd(&format!("migrate {incoming}"));
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: completed"), "{info}");
    // Compression worked: far fewer bytes crossed the link than the pages held.
    let (wire, pages) = (kbytes(&info, "transferred ram"), kbytes(&info, "normal bytes"));
    assert!(wire * 2 < pages, "transferred {wire} KiB for {pages} KiB of pages: {info}");
    assert!(kbytes(&info, "multifd bytes") * 10 > wire * 9, "RAM went over the channels: {info}");
    src.collect_for(Duration::from_millis(200));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
    hmp.quit();
    src.wait_exit(T);
}

#[test]
fn forecast_learns_the_compression_ratio() {
    // A guest dirtying up to 32 MiB/s of highly compressible pages, a 4 MiB/s cap: plain
    // pre-copy cannot keep up (unless the guest ran 8x slower than asked); compressed ~15x,
    // the same cap carries more than the guest dirties.
    let (mut dst, mut src, mut hmp, port) = loopback_pair("mfd-forecast", "mode=dirty mib=64 rate=32 entropy=5 hb_ms=100 cpus=1");
    set(&mut hmp, "migrate_set_parameter max-bandwidth 4M");
    for _ in 0..10 {
        src.wait_for("HEARTBEAT", T);
    }
    let plain = hmp.cmd("info migrate_forecast");
    assert!(plain.contains("precopy: does not converge"), "{plain}");
    set(&mut hmp, "migrate_set_capability multifd on");
    set(&mut hmp, "migrate_set_parameter multifd-compression zstd");
    let zstd = hmp.cmd("info migrate_forecast");
    assert!(zstd.contains("precopy: converges"), "{zstd}");
    // And it does.
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: completed"), "{info}");
    src.collect_for(Duration::from_millis(200));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    hmp.quit();
    src.wait_exit(T);
}
