//! Live migration over TLS (`-object tls-creds-x509` / `tls-creds-psk` + `migrate_set_parameter
//! tls-creds`): x509 and PSK migrations end with the guest's ledger verified on the
//! destination; a TLS destination refuses a plain source, a client certificate from another
//! CA, a source that does not trust the destination's CA and a client `tls-authz` does not
//! name, with a clear error each time, the source running on and the destination still
//! waiting; a corrupted TLS record fails the migration cleanly with the source running;
//! post-copy's return path and recovery run over TLS. Certificates are made by the test (rcgen).

mod common;
mod tlsutil;
use common::*;
use std::path::Path;
use std::time::Duration;
use tlsutil::*;

const T: Duration = Duration::from_secs(60);
const APPEND: &str = "mode=dirty mib=64 rate=20 hb_ms=100 cpus=1";

/// A destination with `objects` and a monitor, waiting on `port`, `tls-creds` set to `creds`.
fn destination(dir: &Path, port: u16, objects: &[String], creds: &str) -> (Vm, Hmp) {
    let sock = dir.join("dst.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let incoming = format!("tcp:127.0.0.1:{port}");
    let mut args: Vec<&str> = vec!["-m", "256", "-monitor", &mon, "-incoming", &incoming];
    for o in objects {
        args.extend_from_slice(&["-object", o]);
    }
    let dst = Vm::guest(&args, APPEND);
    dst.wait_stderr("waiting for an incoming migration", T);
    let mut hmp = Hmp::connect(&sock);
    if !creds.is_empty() {
        let out = hmp.cmd(&format!("migrate_set_parameter tls-creds {creds}"));
        assert!(out.trim().is_empty(), "{out}");
    }
    (dst, hmp)
}

fn source(dir: &Path, objects: &[String]) -> (Vm, Hmp) {
    let sock = dir.join("src.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut args: Vec<&str> = vec!["-m", "256", "-monitor", &mon];
    for o in objects {
        args.extend_from_slice(&["-object", o]);
    }
    let mut src = Vm::guest(&args, APPEND);
    src.wait_for("GUEST READY", T);
    let hmp = Hmp::connect(&sock);
    for _ in 0..5 {
        src.wait_for("HEARTBEAT", T);
    }
    (src, hmp)
}

/// Migrates and checks the guest on the destination: heartbeats continue, ledger verifies.
fn migrate_ok(src: &mut Vm, hmp: &mut Hmp, dst: &mut Vm, port: u16) -> String {
    let out = hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: completed"), "{out}\n{info}");
    src.collect_for(Duration::from_millis(200));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    info
}

/// The source failed this attempt and runs on with its memory intact.
fn source_runs_on(src: &mut Vm, hmp: &mut Hmp, what: &str) -> String {
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: failed"), "{what}: {info}");
    assert!(hmp.cmd("info status").contains("running"), "{what}");
    let h1 = src.wait_for("HEARTBEAT", T);
    let h2 = src.wait_for("HEARTBEAT", T);
    assert!(field(&h2, "seq") > field(&h1, "seq"));
    src.send(b"v");
    src.wait_for("LEDGER OK", T);
    info
}

#[test]
fn x509_migration_with_verified_peers() {
    let dir = tmpdir("tls-x509");
    let ca = Ca::new("Godwit test CA");
    let srv = ca.server_dir(&dir.join("server"), &["localhost", "127.0.0.1"]);
    let cli = ca.client_dir(&dir.join("client"), &ca);
    let port = free_port();
    let (mut dst, mut dhmp) = destination(
        &dir,
        port,
        &[format!("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on", srv.display())],
        "tls0",
    );
    assert!(dhmp.cmd("info migrate_parameters").contains("tls-creds: 'tls0'"));
    let (mut src, mut hmp) = source(&dir, &[format!("tls-creds-x509,id=tls0,dir={},endpoint=client", cli.display())]);
    // No such object: refused before anything moves.
    hmp.cmd("migrate_set_parameter tls-creds nope");
    let out = hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    let info = hmp.wait_migration(T);
    assert!(format!("{out}{info}").contains("No TLS credentials with id 'nope'"), "{out}\n{info}");
    hmp.cmd("migrate_set_parameter tls-creds tls0");
    hmp.cmd("migrate_set_parameter tls-hostname localhost");
    let params = hmp.cmd("info migrate_parameters");
    assert!(params.contains("tls-creds: 'tls0'") && params.contains("tls-hostname: 'localhost'"), "{params}");
    migrate_ok(&mut src, &mut hmp, &mut dst, port);
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
    hmp.quit();
    src.wait_exit(T);
}

#[test]
fn psk_migration() {
    let dir = tmpdir("tls-psk");
    let key = "9a3f0e1d2c4b5a6978877665544332211000ffeeddccbbaa0123456789abcdef";
    let sdir = psk_dir(&dir.join("server"), "qemu", key);
    let cdir = psk_dir(&dir.join("client"), "qemu", key);
    let wrong = psk_dir(&dir.join("wrong"), "qemu", "00112233445566778899aabbccddeeff");
    let port = free_port();
    let (mut dst, _dhmp) = destination(
        &dir,
        port,
        &[format!("tls-creds-psk,id=tls0,dir={},endpoint=server", sdir.display())],
        "tls0",
    );
    let (mut src, mut hmp) = source(
        &dir,
        &[
            format!("tls-creds-psk,id=tls0,dir={},endpoint=client,username=qemu", cdir.display()),
            format!("tls-creds-psk,id=bad,dir={},endpoint=client", wrong.display()),
        ],
    );
    // A wrong key is refused on both sides; the destination waits on.
    hmp.cmd("migrate_set_parameter tls-creds bad");
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    let info = source_runs_on(&mut src, &mut hmp, "wrong PSK");
    assert!(info.contains("refused the pre-shared key"), "{info}");
    dst.wait_stderr("the client 'qemu' does not hold the pre-shared key; still waiting", T);
    hmp.cmd("migrate_set_parameter tls-creds tls0");
    migrate_ok(&mut src, &mut hmp, &mut dst, port);
    hmp.quit();
    src.wait_exit(T);
}

#[test]
fn tls_destination_refuses_plain_and_unverified_sources() {
    let dir = tmpdir("tls-refuse");
    let ca = Ca::new("Godwit test CA");
    let other = Ca::new("Some other CA");
    let srv = ca.server_dir(&dir.join("server"), &["localhost", "127.0.0.1"]);
    let good = ca.client_dir(&dir.join("good"), &ca);
    // A client certificate the destination's CA never signed.
    let foreign = other.client_dir(&dir.join("foreign"), &ca);
    // A client that trusts another CA than the one that signed the destination's certificate.
    let distrust = ca.client_dir(&dir.join("distrust"), &other);
    // A certificate from the right CA for another name than tls-authz lets in.
    let intruder = ca.client_dir_named(&dir.join("intruder"), &ca, "intruder");
    let port = free_port();
    let (mut dst, mut dhmp) = destination(
        &dir,
        port,
        &[
            format!("tls-creds-x509,id=tls0,dir={},endpoint=server", srv.display()),
            // QEMU's syntax: the DN as GnuTLS writes it (a comma in it would be doubled).
            "authz-simple,id=auth0,identity=CN=godwit-source".to_string(),
        ],
        "tls0",
    );
    assert_eq!(dhmp.cmd("migrate_set_parameter tls-authz auth0").trim(), "");
    let (mut src, mut hmp) = source(
        &dir,
        &[
            format!("tls-creds-x509,id=good,dir={},endpoint=client", good.display()),
            format!("tls-creds-x509,id=foreign,dir={},endpoint=client", foreign.display()),
            format!("tls-creds-x509,id=distrust,dir={},endpoint=client", distrust.display()),
            format!("tls-creds-x509,id=intruder,dir={},endpoint=client", intruder.display()),
        ],
    );
    // 1. A plain source.
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    source_runs_on(&mut src, &mut hmp, "plain source");
    dst.wait_stderr("does not speak TLS", T);
    // 2. A client certificate from another CA.
    hmp.cmd("migrate_set_parameter tls-creds foreign");
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    let info = source_runs_on(&mut src, &mut hmp, "foreign client certificate");
    assert!(info.contains("refused this TLS client"), "{info}");
    dst.wait_stderr("the client's certificate does not verify", T);
    // 3. The source does not trust the destination's certificate.
    hmp.cmd("migrate_set_parameter tls-creds distrust");
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    let info = source_runs_on(&mut src, &mut hmp, "untrusted destination");
    assert!(info.contains("UnknownIssuer"), "{info}");
    // 4. A verified certificate tls-authz does not let in.
    hmp.cmd("migrate_set_parameter tls-creds intruder");
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    source_runs_on(&mut src, &mut hmp, "unauthorized client");
    dst.wait_stderr("the client 'CN=intruder' is not authorized by tls-authz", T);
    // The destination never ran the guest and still takes the right source.
    assert!(!dst.seen.iter().any(|l| l.contains("HEARTBEAT")));
    hmp.cmd("migrate_set_parameter tls-creds good");
    migrate_ok(&mut src, &mut hmp, &mut dst, port);
    hmp.quit();
    src.wait_exit(T);
}

#[test]
fn corrupted_tls_record_fails_cleanly() {
    let dir = tmpdir("tls-flip");
    let ca = Ca::new("Godwit test CA");
    let srv = ca.server_dir(&dir.join("server"), &["localhost", "127.0.0.1"]);
    let cli = ca.client_dir(&dir.join("client"), &ca);
    let port = free_port();
    let (mut dst, _dhmp) = destination(
        &dir,
        port,
        &[format!("tls-creds-x509,id=tls0,dir={},endpoint=server", srv.display())],
        "tls0",
    );
    let (mut src, mut hmp) = source(&dir, &[format!("tls-creds-x509,id=tls0,dir={},endpoint=client", cli.display())]);
    hmp.cmd("migrate_set_parameter tls-creds tls0");
    // One byte in the middle of the RAM records (past the handshake) is changed on the wire.
    let p = proxy(port, Fault::FlipAt { conn: 0, at: 3 << 20 });
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{}", p.port));
    // The source learns it from the destination's alert or from the closed connection,
    // whichever reaches it first; the reason is the destination's to give (checked below).
    source_runs_on(&mut src, &mut hmp, "corrupted record");
    assert_eq!(dst.wait_exit(T), Some(1));
    let err = dst.stderr.lock().unwrap().clone();
    assert!(err.contains("incoming migration failed") && err.contains("corrupted or forged record"), "{err}");
    assert!(!dst.seen.iter().any(|l| l.contains("HEARTBEAT")), "destination ran the guest");
    hmp.quit();
    src.wait_exit(T);
}

fn remaining_kb(info: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix("remaining ram: "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn wait_status(h: &mut Hmp, want: &str) -> String {
    let end = std::time::Instant::now() + T;
    loop {
        let info = h.cmd("info migrate");
        if info.contains(&format!("Migration status: {want}")) {
            return info;
        }
        assert!(std::time::Instant::now() < end && !info.contains("Migration status: failed"), "never reached {want}: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn postcopy_return_path_and_recovery_over_tls() {
    let dir = tmpdir("tls-postcopy");
    let ca = Ca::new("Godwit test CA");
    let srv = ca.server_dir(&dir.join("server"), &["localhost", "127.0.0.1"]);
    let cli = ca.client_dir(&dir.join("client"), &ca);
    let port = free_port();
    let (mut dst, mut dhmp) = destination(
        &dir,
        port,
        &[format!("tls-creds-x509,id=tls0,dir={},endpoint=server", srv.display())],
        "tls0",
    );
    let (mut src, mut hmp) = source(&dir, &[format!("tls-creds-x509,id=tls0,dir={},endpoint=client", cli.display())]);
    hmp.cmd("migrate_set_parameter tls-creds tls0");
    // A guest pre-copy cannot move over 16 MB/s; post-copy capped too, so a cut lands half-way.
    hmp.cmd("migrate_set_parameter max-bandwidth 16M");
    hmp.cmd("migrate_set_parameter max-postcopy-bandwidth 16M");
    assert_eq!(hmp.cmd("migrate_set_capability postcopy-ram on").trim(), "");
    let p = proxy(port, Fault::None);
    hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{}", p.port));
    let end = std::time::Instant::now() + T;
    loop {
        let info = hmp.cmd("info migrate");
        if info.contains("dirty sync count: 2") || info.contains("dirty sync count: 3") {
            break;
        }
        assert!(std::time::Instant::now() < end && !info.contains("failed"), "{info}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(hmp.cmd("migrate_start_postcopy").trim(), "");
    let info = wait_status(&mut hmp, "postcopy-active");
    let total = remaining_kb(&info);
    loop {
        let info = hmp.cmd("info migrate");
        if remaining_kb(&info) <= total / 2 {
            assert!(info.contains("postcopy-active"), "finished before the cut: {info}");
            break;
        }
        assert!(std::time::Instant::now() < end, "{info}");
        std::thread::sleep(Duration::from_millis(20));
    }
    p.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_status(&mut hmp, "postcopy-paused");
    wait_status(&mut dhmp, "postcopy-paused");
    // Recovery, secured like the first connection.
    let port2 = free_port();
    assert_eq!(dhmp.cmd(&format!("migrate_recover tcp:127.0.0.1:{port2}")).trim(), "");
    dst.wait_stderr("waiting for the source to resume post-copy", T);
    hmp.cmd(&format!("migrate -d -r tcp:127.0.0.1:{port2}"));
    wait_status(&mut hmp, "completed");
    wait_status(&mut dhmp, "completed");
    src.collect_for(Duration::from_millis(200));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    hmp.quit();
    src.wait_exit(T);
}
