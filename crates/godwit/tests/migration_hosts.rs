//! The seed's live migration between two "hosts": two network namespaces joined by a veth pair
//! (the test creates and removes them), the disk image in a directory both see (as with NFS).
//! The guest writes memory and disk while it moves; on the destination both ledgers verify,
//! the source ends `postmigrate`, the image is clean and was never written by two processes.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Two namespaces, `a` (10.77.N.1) and `b` (10.77.N.2), removed on drop.
struct Hosts {
    a: String,
    b: String,
    b_addr: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2 (ip) is needed for this test");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    fn new(tag: &str) -> Hosts {
        let n = std::process::id() % 200 + 20;
        let a = format!("gw-{tag}-a-{}", std::process::id());
        let b = format!("gw-{tag}-b-{}", std::process::id());
        let (va, vb) = (format!("gwa{n}{}", &tag[..1]), format!("gwb{n}{}", &tag[..1]));
        let _ = Command::new("ip").args(["netns", "del", &a]).output();
        let _ = Command::new("ip").args(["netns", "del", &b]).output();
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        let a_addr = format!("10.77.{n}.1");
        let b_addr = format!("10.77.{n}.2");
        ip(&["-n", &a, "addr", "add", &format!("{a_addr}/24"), "dev", &va]);
        ip(&["-n", &b, "addr", "add", &format!("{b_addr}/24"), "dev", &vb]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Hosts { a, b, b_addr }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).output();
    }
}

/// Spawns godwit inside a namespace.
fn in_ns(ns: &str, args: &[&str], append: &str) -> Vm {
    let g = guest_bin();
    let godwit = godwit_bin();
    let mut full = vec!["netns", "exec", ns, godwit.to_str().unwrap(), "-kernel", g.to_str().unwrap(), "-append", append];
    full.extend_from_slice(args);
    Vm::spawn_cmd("ip", &full)
}

#[test]
fn migration_between_two_hosts_with_a_shared_disk() {
    let hosts = Hosts::new("mig");
    let dir = tmpdir("hosts");
    let img = dir.join("shared.qcow2");
    create_image(&img, "qcow2", "64M");
    let drive = format!("file={}", img.display());
    let append = "mode=dirty mib=128 rate=40 disk=on disk_mib=8 hb_ms=100 cpus=2";
    let incoming = format!("tcp:{}:6666", hosts.b_addr);
    let dst = in_ns(&hosts.b, &["-m", "512", "-smp", "2", "-drive", &drive, "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let sock = dir.join("src.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut src = in_ns(&hosts.a, &["-m", "512", "-smp", "2", "-drive", &drive, "-monitor", &mon], append);
    src.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock);
    for _ in 0..8 {
        src.wait_for("HEARTBEAT", T);
    }
    let out = hmp.cmd(&format!("migrate {incoming}"));
    assert!(out.contains("completed"), "{out}");
    assert!(hmp.cmd("info status").contains("postmigrate"));
    let mut dst = dst;
    src.collect_for(Duration::from_millis(300));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    dst.wait_for("DISK OK", T);
    // The destination holds the image now: the source's copy cannot write it any more.
    let out = std::process::Command::new("qemu-img").args(["info", img.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success(), "the destination must hold the image lock");
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
    hmp.quit();
    src.wait_exit(T);
    let (code, out) = qemu_img_check(&img);
    assert_eq!(code, 0, "{out}");
}
