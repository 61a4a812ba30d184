//! Networking end to end: the test guest's virtio-net responder behind a tap on a Linux bridge,
//! pinged from a client in another network namespace; a live migration between two Godwit
//! processes whose taps sit on the same bridge (two hosts on one L2 segment), with the client
//! pinging every 10 ms throughout, once with announcements (the default) and once with
//! `announce-rounds 0`, reporting the lost pings of each; a tap handed over as an open
//! descriptor (`-netdev tap,fd=N`, as libvirt does); and the command-line errors.
//!
//! Topology (created and removed by the test; needs root and iproute2 + iputils-ping):
//! `gwn-lan-*` holds bridge `br0` (ageing 300 s, so a stale forwarding entry is not
//! forgotten during the test), the VMs' taps and one end of a veth pair; `gwn-cli-*` holds the
//! other end with the client's address.

mod common;
use common::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (network namespaces, a bridge, taps)");
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed for this test (Debian iproute2 / iputils-ping): {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run("ip", args);
}

/// A bridge segment with a client; removed on drop.
struct Lan {
    lan: String,
    cli: String,
    /// 10.<n>.0.x
    net: String,
}

impl Lan {
    fn new(tag: &str, taps: &[&str]) -> Lan {
        require_root();
        let pid = std::process::id();
        let n = (pid % 200 + 20) as u8;
        let lan = format!("gwn-lan-{tag}-{pid}");
        let cli = format!("gwn-cli-{tag}-{pid}");
        for ns in [&lan, &cli] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
        }
        let (vl, vc) = (format!("gwvl{tag}"), format!("gwvc{tag}"));
        ip(&["-n", &lan, "link", "add", &vl, "type", "veth", "peer", "name", &vc]);
        ip(&["-n", &lan, "link", "set", &vc, "netns", &cli]);
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge", "ageing_time", "30000", "stp_state", "0"]);
        ip(&["-n", &lan, "link", "set", &vl, "master", "br0"]);
        for t in taps {
            ip(&["-n", &lan, "tuntap", "add", t, "mode", "tap"]);
            ip(&["-n", &lan, "link", "set", t, "master", "br0"]);
            ip(&["-n", &lan, "link", "set", t, "up"]);
        }
        ip(&["-n", &lan, "link", "set", &vl, "up"]);
        ip(&["-n", &lan, "link", "set", "br0", "up"]);
        let net = format!("10.{n}.0");
        ip(&["-n", &cli, "addr", "add", &format!("{net}.1/24"), "dev", &vc]);
        ip(&["-n", &cli, "link", "set", &vc, "up"]);
        Lan { lan, cli, net }
    }

    fn guest_ip(&self) -> String {
        format!("{}.2", self.net)
    }

    /// Spawns godwit with the test guest inside the LAN namespace.
    fn vm(&self, args: &[&str], append: &str) -> Vm {
        let g = guest_bin();
        let godwit = godwit_bin();
        let mut full = vec!["netns", "exec", &self.lan, godwit.to_str().unwrap(), "-kernel", g.to_str().unwrap(), "-append", append];
        full.extend_from_slice(args);
        Vm::spawn_cmd("ip", &full)
    }

    /// Starts `ping -i interval -c count` from the client; the child prints its summary.
    fn ping(&self, count: u32, interval: &str) -> std::process::Child {
        Command::new("ip")
            .args(["netns", "exec", &self.cli, "ping", "-n", "-q", "-i", interval, "-c", &count.to_string(), "-W", "1"])
            .arg(self.guest_ip())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ping (Debian iputils-ping) is needed for this test")
    }

    /// Runs a ping to completion: (transmitted, received).
    fn ping_wait(child: std::process::Child) -> (u64, u64) {
        let out = child.wait_with_output().expect("ping");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("ping said: {text}"));
        let num = |pat: &str| -> u64 {
            let i = line.find(pat).unwrap_or_else(|| panic!("{line}"));
            line[..i].trim_end().rsplit([' ', ',']).next().unwrap().parse().unwrap()
        };
        (num(" packets transmitted"), num(" received"))
    }

    fn fdb_port(&self, mac: &str) -> Option<String> {
        let out = run("bridge", &["-n", &self.lan, "fdb", "show", "br", "br0"]);
        out.lines().find(|l| l.starts_with(mac) && !l.contains("permanent")).and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter().position(|x| *x == "dev").map(|i| w[i + 1].to_string())
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.lan]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.cli]).output();
    }
}

fn append(lan: &Lan) -> String {
    format!("net=on ip={} hz=1000 hb_ms=500", lan.guest_ip())
}

fn status_field(vm: &mut Vm, key: &str) -> u64 {
    vm.send(b"s");
    let l = vm.wait_for("STATUS", T);
    field(&l, key).unwrap_or_else(|| panic!("no {key} in {l}"))
}

#[test]
fn a_client_pings_the_guest() {
    let lan = Lan::new("p", &["gwtp0"]);
    let dir = tmpdir("net-p");
    let mon = dir.join("mon");
    let monarg = format!("unix:{},server,nowait", mon.display());
    let mut vm = lan.vm(
        &["-netdev", "tap,id=n0,ifname=gwtp0,script=no,downscript=no", "-device", "virtio-net-device,netdev=n0,mac=52:54:00:00:10:01", "-monitor", &monarg],
        &append(&lan),
    );
    let l = vm.wait_for("GUEST NET", T);
    assert!(l.contains("mac=52:54:00:00:10:01"), "{l}");
    vm.wait_for("GUEST READY", T);
    let (tx, rx) = Lan::ping_wait(lan.ping(100, "0.01"));
    eprintln!("ping: {tx} sent, {rx} received");
    assert_eq!(tx, 100);
    assert!(rx >= 98, "{rx}/100 pings answered");
    assert!(status_field(&mut vm, "net_icmp") >= rx);
    assert!(status_field(&mut vm, "net_arp") >= 1);
    let info = Hmp::connect(&mon).cmd("info network");
    assert!(info.contains("net0: index=0,type=nic,model=virtio-net-device,macaddr=52:54:00:00:10:01"), "{info}");
    assert!(info.contains("type=tap,ifname=gwtp0"), "{info}");
    let rx: u64 = info.split_whitespace().find_map(|w| w.strip_prefix("rx=")).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(rx >= 100, "{info}");
}

/// Opens tap argv[1] (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) as descriptor 5, without close-on-exec,
/// and runs argv[2..] with it: what libvirt does before it starts the emulator with `fd=N`.
const OPEN_TAP_AS_FD5: &str = "import fcntl, os, struct, sys\n\
fd = os.open('/dev/net/tun', os.O_RDWR)\n\
fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH22x', sys.argv[1].encode(), 0x0002 | 0x1000 | 0x4000))\n\
os.dup2(fd, 5)\n\
os.set_inheritable(5, True)\n\
os.execv(sys.argv[2], sys.argv[2:])\n";

#[test]
fn a_client_pings_the_guest_on_an_inherited_tap_descriptor() {
    let lan = Lan::new("f", &["gwtf0"]);
    let dir = tmpdir("net-fd");
    let mon = dir.join("mon");
    let monarg = format!("unix:{},server,nowait", mon.display());
    let (g, godwit) = (guest_bin(), godwit_bin());
    let append = append(&lan);
    let args = [
        "netns", "exec", &lan.lan, "python3", "-c", OPEN_TAP_AS_FD5, "gwtf0", godwit.to_str().unwrap(),
        "-kernel", g.to_str().unwrap(), "-append", &append, "-monitor", &monarg,
        "-netdev", "tap,id=n0,fd=5", "-device", "virtio-net-device,netdev=n0,mac=52:54:00:00:10:0f",
    ];
    let mut vm = Vm::spawn_cmd("ip", &args);
    let l = vm.wait_for("GUEST NET", T);
    assert!(l.contains("mac=52:54:00:00:10:0f"), "{l}");
    vm.wait_for("GUEST READY", T);
    let (tx, rx) = Lan::ping_wait(lan.ping(50, "0.01"));
    assert_eq!(tx, 50);
    assert!(rx >= 49, "{rx}/50 pings answered through the inherited tap");
    assert!(status_field(&mut vm, "net_icmp") >= rx);
    let info = Hmp::connect(&mon).cmd("info network");
    assert!(info.contains("type=tap,ifname=gwtf0"), "the name comes from the descriptor: {info}");
}

#[test]
fn legacy_net_nic_net_tap() {
    let lan = Lan::new("l", &["gwtl0"]);
    let mut vm = lan.vm(&["-net", "nic,model=virtio", "-net", "tap,ifname=gwtl0,script=no"], &append(&lan));
    let l = vm.wait_for("GUEST NET", T);
    assert!(l.contains("mac=52:54:00:12:34:56"), "QEMU's default MAC: {l}");
    vm.wait_for("GUEST READY", T);
    let (_, rx) = Lan::ping_wait(lan.ping(20, "0.02"));
    assert!(rx >= 19, "{rx}/20 pings answered");
}

/// One live migration with the client pinging every 10 ms; returns (lost pings, downtime ms,
/// bridge port of the guest's MAC right after the switchover).
fn migrate_while_pinging(tag: &str, announce: bool) -> (u64, u64, Option<String>) {
    let (tsrc, tdst) = (format!("gws{tag}"), format!("gwd{tag}"));
    let lan = Lan::new(tag, &[&tsrc, &tdst]);
    let dir = tmpdir(&format!("net-{tag}"));
    let mig = dir.join("mig.sock");
    let (msrc, mdst) = (dir.join("src.mon"), dir.join("dst.mon"));
    let mac = "52:54:00:00:20:01";
    let nic = |tap: &str| vec!["-netdev".to_string(), format!("tap,id=n0,ifname={tap}"), "-device".into(), format!("virtio-net-device,netdev=n0,mac={mac}")];
    let ap = append(&lan);
    let mut src_args = nic(&tsrc);
    src_args.extend(["-monitor".into(), format!("unix:{},server,nowait", msrc.display())]);
    let src_args: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let mut src = lan.vm(&src_args, &ap);
    src.wait_for("GUEST READY", T);
    let mut smon = Hmp::connect(&msrc);
    // The client knows the guest (ARP) and the bridge knows its port.
    let (_, rx) = Lan::ping_wait(lan.ping(10, "0.05"));
    assert!(rx >= 9, "warm-up: {rx}/10");
    assert_eq!(lan.fdb_port(mac).as_deref(), Some(tsrc.as_str()));
    // The destination starts after the warm-up: its tap comes up now, so it has not queued the
    // client's ARP broadcast (an answer to that stale request, delivered once the guest runs
    // there, would announce the guest by accident).
    let mut dst_args = nic(&tdst);
    dst_args.extend(["-incoming".into(), format!("unix:{}", mig.display()), "-monitor".into(), format!("unix:{},server,nowait", mdst.display())]);
    let dst_args: Vec<&str> = dst_args.iter().map(String::as_str).collect();
    let mut dst = lan.vm(&dst_args, &ap);
    dst.wait_stderr("waiting for an incoming migration", T);
    let mut dmon = Hmp::connect(&mdst);
    if !announce {
        let out = dmon.cmd("migrate_set_parameter announce-rounds 0");
        assert!(!out.contains("rror"), "{out}");
    }
    let out = dmon.cmd("info migrate_parameters");
    assert!(out.contains(&format!("announce-rounds: {}", if announce { 5 } else { 0 })), "{out}");

    let ping = lan.ping(600, "0.01");
    std::thread::sleep(Duration::from_millis(1000));
    let out = smon.cmd(&format!("migrate unix:{}", mig.display()));
    assert!(out.contains("completed"), "{out}");
    std::thread::sleep(Duration::from_millis(100));
    let port = lan.fdb_port(mac);
    let dst_net = dmon.cmd("info network");
    let dst_net = dst_net.lines().find(|l| l.contains("rx=")).unwrap_or("").trim().to_string();
    let info = smon.cmd("info migrate");
    let downtime = info
        .lines()
        .find_map(|l| l.strip_prefix("downtime:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = Lan::ping_wait(ping);
    dst.wait_for("HEARTBEAT", T);
    let after = status_field(&mut dst, "net_icmp");
    eprintln!(
        "announce={announce}: {tx} pings every 10 ms, {} lost; downtime {downtime} ms; guest MAC behind {port:?} 100 ms after the switchover (destination NIC then: {dst_net}); destination answered {after} so far",
        tx - rx
    );
    smon.quit();
    dmon.quit();
    drop(src);
    drop(dst);
    (tx - rx, downtime, port)
}

#[test]
fn live_migration_keeps_the_guest_reachable_only_with_announcements() {
    let (lost_on, downtime_on, port_on) = migrate_while_pinging("a", true);
    // Without announcements the guest can still re-teach the bridge by itself: a ping that was
    // in its receive ring (or a reply in its transmit ring) when the source paused is answered
    // from the destination once it runs there (about one migration in ten with a 1 ms guest
    // poll and a 10 ms ping). That is the network working by luck, not what this test
    // measures, so such a run is reported and repeated (three tries).
    let mut off = None;
    for attempt in 0..3 {
        let tag = format!("b{attempt}");
        let (lost, downtime, port) = migrate_while_pinging(&tag, false);
        if port.as_deref() == Some(format!("gws{tag}").as_str()) {
            off = Some((lost, downtime, port));
            break;
        }
        eprintln!(
            "without announcements, try {attempt}: the guest answered a frame caught at the switchover from the \
             destination, which moved the bridge entry to {port:?} ({lost} lost); trying again"
        );
    }
    let (lost_off, downtime_off, _) = off.expect("in three tries the bridge always learned the destination without announcements");
    eprintln!("lost pings (600 at 10 ms): with announcements {lost_on} (downtime {downtime_on} ms), without {lost_off} (downtime {downtime_off} ms)");
    // With announcements the bridge moves the guest's MAC to the destination's tap at once:
    // losses are bounded by the downtime (plus a few in flight at the switchover).
    assert_eq!(port_on.as_deref(), Some("gwda"), "bridge did not learn the destination port");
    assert!(lost_on <= 10 + downtime_on / 10, "{lost_on} pings lost with announcements (downtime {downtime_on} ms)");
    // Without them the bridge keeps forwarding to the source's (now silent) tap.
    assert!(lost_off >= 200, "only {lost_off} pings lost without announcements: the test does not show the difference");
}

#[test]
fn hmp_announce_self_moves_the_bridge_entry() {
    // Two VMs cannot share a MAC here, so announce from a second VM that has the first one's
    // MAC but no guest driver (net=off): the bridge must move the entry to its tap.
    let lan = Lan::new("h", &["gwth0", "gwth1"]);
    let dir = tmpdir("net-h");
    let mon = dir.join("mon");
    let mac = "52:54:00:00:30:01";
    let mut a = lan.vm(&["-netdev", "tap,id=n0,ifname=gwth0", "-device", &format!("virtio-net-device,netdev=n0,mac={mac}")], &append(&lan));
    a.wait_for("GUEST READY", T);
    let (_, rx) = Lan::ping_wait(lan.ping(5, "0.05"));
    assert!(rx >= 4);
    assert_eq!(lan.fdb_port(mac).as_deref(), Some("gwth0"));
    let mut b = lan.vm(
        &["-netdev", "tap,id=n0,ifname=gwth1", "-device", &format!("virtio-net-device,netdev=n0,mac={mac}"), "-monitor", &format!("unix:{},server,nowait", mon.display())],
        "hb_ms=500",
    );
    b.wait_for("GUEST READY", T);
    let mut h = Hmp::connect(&mon);
    let out = h.cmd("announce_self");
    assert!(!out.contains("rror"), "{out}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(lan.fdb_port(mac).as_deref(), Some("gwth1"));
    h.quit();
}

fn godwit_error(args: &[&str], unprivileged: bool) -> String {
    let g = guest_bin();
    let mut cmd = Command::new(godwit_bin());
    cmd.args(["-kernel", g.to_str().unwrap()]).args(args).stdin(Stdio::null());
    // SAFETY: geteuid has no preconditions.
    if unprivileged && unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("run godwit");
    assert_eq!(out.status.code(), Some(1), "godwit {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn bad_network_options_are_one_clear_line() {
    let e = godwit_error(&["-netdev", "tap,id=n0,ifname=gwx0", "-device", "virtio-net-device,netdev=n1"], false);
    assert!(e.contains("no -netdev with id 'n1'"), "{e}");
    let e = godwit_error(&["-netdev", "tap,id=n0,ifname=gwx0", "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34"], false);
    assert!(e.contains("malformed MAC address '52:54:00:12:34'"), "{e}");
    let e = godwit_error(&["-net", "nic,macaddr=52:54:00:xx:00:01", "-net", "tap"], false);
    assert!(e.contains("malformed MAC address"), "{e}");
    let e = godwit_error(&["-netdev", "user,id=n0"], false);
    assert!(e.contains("not supported"), "{e}");
    let e = godwit_error(&["-net", "nic"], false);
    assert!(e.contains("-net tap"), "{e}");
    // fd=: a descriptor that is not open, one that is not a tap (stdin is /dev/null here).
    let e = godwit_error(&["-netdev", "tap,id=n0,fd=77", "-device", "virtio-net-device,netdev=n0"], false);
    assert!(e.contains("fd=77") && e.contains("not an open descriptor"), "{e}");
    let e = godwit_error(&["-netdev", "tap,id=n0,fd=0", "-device", "virtio-net-device,netdev=n0"], false);
    assert!(e.contains("fd=0") && e.contains("not a tap device"), "{e}");
    // No CAP_NET_ADMIN (run as nobody when we are root): the tap cannot be created.
    let e = godwit_error(&["-netdev", "tap,id=n0,ifname=gwnoperm0", "-device", "virtio-net-device,netdev=n0"], true);
    assert!(e.contains("permission denied") && e.contains("gwnoperm0") && e.contains("CAP_NET_ADMIN"), "{e}");
}

#[test]
fn cold_migration_with_loadvm_announces_on_the_new_tap() {
    // savevm on one tap, quit, start the same command line on another tap with -loadvm: the
    // restored guest answers there and the bridge learned its new port from the announcement.
    let lan = Lan::new("c", &["gwca0", "gwcb0"]);
    let dir = tmpdir("net-c");
    let img = dir.join("vm.qcow2");
    create_image(&img, "qcow2", "16M");
    let drive = format!("file={}", img.display());
    let mon = dir.join("mon");
    let monarg = format!("unix:{},server,nowait", mon.display());
    let mac = "52:54:00:00:40:01";
    let dev = format!("virtio-net-device,netdev=n0,mac={mac}");
    let mut a = lan.vm(&["-drive", &drive, "-netdev", "tap,id=n0,ifname=gwca0", "-device", &dev, "-monitor", &monarg], &append(&lan));
    a.wait_for("GUEST READY", T);
    let (_, rx) = Lan::ping_wait(lan.ping(20, "0.02"));
    assert!(rx >= 19, "{rx}/20 before savevm");
    let mut h = Hmp::connect(&mon);
    assert_eq!(h.cmd("savevm net1").trim(), "");
    let saved = status_field(&mut a, "net_icmp");
    h.quit();
    a.wait_exit(T);
    drop(a);
    let mut b = lan.vm(&["-drive", &drive, "-netdev", "tap,id=n0,ifname=gwcb0", "-device", &dev, "-loadvm", "net1"], &append(&lan));
    b.wait_for("HEARTBEAT", T);
    assert_eq!(lan.fdb_port(mac).as_deref(), Some("gwcb0"), "the announcement after -loadvm moved the guest's port");
    let (_, rx) = Lan::ping_wait(lan.ping(20, "0.02"));
    assert!(rx >= 19, "{rx}/20 after -loadvm on the other tap");
    assert!(status_field(&mut b, "net_icmp") >= saved + rx, "counters continue from the snapshot");
}
