//! Godwit as libvirt's emulator: a libvirt session daemon (Debian's libvirt 9.0, run as an
//! unprivileged user when the test runs as root) probes the binary (`virsh domcapabilities`
//! must show microvm, kvm, host-passthrough), then `virsh define` + `virsh start` a microvm
//! domain running the test guest on a qcow2 disk, with the serial port on a pty: the guest
//! must boot and pass its memory and disk checks, `virsh shutdown` must power it off through
//! the ACPI power button (domain shut off, reason shutdown), and after a second start `virsh
//! destroy` must end it. A second test runs two daemons and moves a domain with `virsh migrate
//! --live` (shared image) and back with `virsh migrate --live --copy-storage-all` (a separate
//! image): the guest's heartbeats go on and its memory ledger and disk checks pass on each
//! destination; then `virsh shutdown` (honoured under Godwit; under QEMU 7.2, which gives a
//! libvirt microvm no power button, the guest runs on and `virsh destroy` ends it).
//! Another test gives the domain a NIC on a tap libvirt opens and passes as a descriptor.
//! A third moves a domain on a qcow2 overlay with `virsh migrate --live --copy-storage-inc`.
//! Needs the Debian packages libvirt-daemon, libvirt-daemon-driver-qemu and libvirt-clients.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

struct Session {
    dir: PathBuf,
    daemon: Child,
    as_root: bool,
    /// The network namespace the daemon runs in (and with it the emulators it starts).
    netns: Option<String>,
}

impl Session {
    fn env(&self, c: &mut Command) {
        let d = &self.dir;
        c.env("HOME", d.join("home"))
            .env("XDG_CONFIG_HOME", d.join("cfg"))
            .env("XDG_RUNTIME_DIR", d.join("run"))
            .env("XDG_CACHE_HOME", d.join("cache"));
    }
    fn cmd(&self, prog: &str) -> Command {
        let mut argv: Vec<&str> = Vec::new();
        if let (Some(ns), "libvirtd") = (&self.netns, prog) {
            argv.extend(["ip", "netns", "exec", ns.as_str()]);
        }
        if self.as_root {
            argv.extend(["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=kvm"]);
        }
        argv.push(prog);
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        self.env(&mut c);
        c
    }
    fn start(dir: &Path) -> Session {
        Session::start_in(dir, None)
    }
    /// A daemon in network namespace `netns` (when given).
    fn start_in(dir: &Path, netns: Option<&str>) -> Session {
        assert!(
            have("libvirtd") && have("virsh"),
            "this test needs libvirt: apt-get install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients"
        );
        // SAFETY: getuid has no preconditions.
        let as_root = unsafe { libc::getuid() } == 0;
        for sub in ["home", "cfg", "run", "cache", "img"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        if as_root {
            let st = Command::new("chown").args(["-R", "nobody:nogroup"]).arg(dir).status().unwrap();
            assert!(st.success());
            Command::new("chmod").args(["-R", "a+rX"]).arg(dir).status().unwrap();
        }
        let netns = netns.map(String::from);
        let mut s = Session { dir: dir.to_path_buf(), daemon: Command::new("true").spawn().unwrap(), as_root, netns };
        let _ = s.daemon.wait();
        let log = std::fs::File::create(dir.join("libvirtd.log")).unwrap();
        s.daemon = s.cmd("libvirtd").args(["--timeout", "0"]).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        let sock = dir.join("run/libvirt/libvirt-sock");
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < T, "libvirtd did not start: {}", s.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default()
    }
    fn uri(&self) -> String {
        format!("qemu+unix:///session?socket={}", self.dir.join("run/libvirt/libvirt-sock").display())
    }
    fn virsh(&self, args: &[&str]) -> String {
        let uri = self.uri();
        let out = self.cmd("virsh").arg("-c").arg(uri).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        let dom_log = std::fs::read_to_string(self.dir.join("cache/libvirt/qemu/log/gw.log")).unwrap_or_default();
        assert!(out.status.success(), "virsh {args:?}: {text}\ndomain log:\n{dom_log}");
        text
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A domain left running by a failed test would outlive its daemon.
        let _ = self.cmd("virsh").arg("-c").arg(self.uri()).args(["destroy", "gw"]).output();
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

#[test]
fn virsh_probes_starts_and_destroys_a_godwit_domain() {
    single_domain();
}

fn single_domain() {
    require_kvm();
    let dir = tmpdir("libvirt-virsh");
    let s = Session::start(&dir);
    // Binaries where the unprivileged daemon can read them.
    let (emu, kernel, disk) = (dir.join("img/godwit"), dir.join("img/guest"), dir.join("img/disk.qcow2"));
    std::fs::copy(godwit_bin(), &emu).unwrap();
    std::fs::copy(guest_bin(), &kernel).unwrap();
    create_image(&disk, "qcow2", "16M");
    if s.as_root {
        Command::new("chown").args(["-R", "nobody:nogroup"]).arg(dir.join("img")).status().unwrap();
    }
    let caps = s.virsh(&["domcapabilities", "--emulatorbin", emu.to_str().unwrap(), "--machine", "microvm", "--virttype", "kvm"]);
    for want in ["<machine>microvm</machine>", "<domain>kvm</domain>", "<mode name='host-passthrough' supported='yes'>"] {
        assert!(caps.contains(want), "{want} missing:\n{caps}");
    }
    let xml = format!(
        "<domain type='kvm'><name>gw</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='microvm'>hvm</type><kernel>{}</kernel>\
         <cmdline>mode=dirty mib=8 rate=5 disk=on disk_mib=2 hb_ms=100 cpus=1</cmdline></os>\
         <cpu mode='host-passthrough'/><devices><emulator>{}</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <target dev='vda' bus='virtio'/><address type='virtio-mmio'/></disk>\
         <controller type='usb' model='none'/><serial type='pty'/><memballoon model='none'/></devices></domain>",
        kernel.display(),
        emu.display(),
        disk.display()
    );
    let xml_path = dir.join("gw.xml");
    std::fs::write(&xml_path, xml).unwrap();
    if s.as_root {
        Command::new("chown").arg("nobody").arg(&xml_path).status().unwrap();
    }
    s.virsh(&["define", xml_path.to_str().unwrap()]);
    s.virsh(&["start", "gw"]);
    assert!(s.virsh(&["domstate", "gw"]).contains("running"));
    let mut pty = Pty::open(&s);
    pty.wait("HEARTBEAT");
    pty.check();
    // The ACPI power button: the test guest powers off through S5.
    shutdown(&s, &mut pty, true);
    // Again, ended by `virsh destroy` this time.
    s.virsh(&["start", "gw"]);
    let mut pty = Pty::open(&s);
    pty.wait("HEARTBEAT");
    s.virsh(&["destroy", "gw"]);
    let state = s.virsh(&["domstate", "--reason", "gw"]);
    assert!(state.contains("shut off (destroyed)"), "{state}");
    s.virsh(&["undefine", "gw"]);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `virsh shutdown` (QMP `system_powerdown`, as libvirt sends it to a domain without a guest
/// agent). Under Godwit the GED power button reaches the test guest, which enters ACPI S5:
/// libvirt sees SHUTDOWN and the domain ends up shut off. QEMU 7.2's microvm, as libvirt runs
/// it (`-no-acpi`), has no power button: the command succeeds (QEMU emits POWERDOWN and
/// nothing else), the guest runs on, and `virsh destroy` ends it, as for a guest that ignores
/// the button.
fn shutdown(s: &Session, pty: &mut Pty, honoured: bool) {
    s.virsh(&["shutdown", "gw"]);
    if honoured {
        pty.wait("GUEST POWEROFF");
        let t0 = Instant::now();
        loop {
            let state = s.virsh(&["domstate", "--reason", "gw"]);
            if state.contains("shut off") {
                assert!(state.contains("shut off (shutdown)"), "{state}");
                break;
            }
            assert!(t0.elapsed() < T, "the domain did not stop after the guest powered off: {state}");
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        let before = pty.seen_seq();
        let after = field(&pty.wait("HEARTBEAT"), "seq").unwrap();
        assert!(after > before, "the guest runs on: {before} then {after}");
        assert!(!pty.seen.iter().any(|l| l.contains("GUEST POWEROFF")));
        assert!(s.virsh(&["domstate", "gw"]).contains("running"));
        s.virsh(&["destroy", "gw"]);
        assert!(s.virsh(&["domstate", "gw"]).contains("shut off"));
    }
}

/// The guest's serial pty: lines in, bytes out.
struct Pty {
    file: std::fs::File,
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Pty {
    fn open(s: &Session) -> Pty {
        let path = s.virsh(&["ttyconsole", "gw"]).trim().to_string();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let reader = file.try_clone().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(reader).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Pty { file, rx, seen: Vec::new() }
    }
    fn wait(&mut self, pat: &str) -> String {
        let t0 = Instant::now();
        loop {
            let left = T.checked_sub(t0.elapsed()).unwrap_or_else(|| panic!("no {pat:?}: {:?}", self.seen.last()));
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(pat) {
                        return l;
                    }
                }
                Err(_) => panic!("no {pat:?} from the guest; last: {:?}", self.seen.last()),
            }
        }
    }
    /// The highest heartbeat number seen (after draining what is buffered).
    fn last_seq(&mut self) -> u64 {
        while let Ok(l) = self.rx.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        self.seen.iter().filter(|l| l.contains("HEARTBEAT")).filter_map(|l| field(l, "seq")).max().unwrap_or(0)
    }
    /// The highest heartbeat number read so far, without waiting (the guest may still run).
    fn seen_seq(&mut self) -> u64 {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
        self.seen.iter().filter(|l| l.contains("HEARTBEAT")).filter_map(|l| field(l, "seq")).max().unwrap_or(0)
    }
    fn check(&mut self) {
        self.file.write_all(b"v").unwrap();
        self.wait("LEDGER OK");
        self.wait("DISK OK");
    }
}

/// The domain; for QEMU, its virtio-mmio transports in virtio 1.x mode (QEMU 7.2's microvm
/// defaults them to legacy, which the test guest does not drive), through libvirt's
/// `qemu:commandline` passthrough.
fn domain_xml(kernel: &Path, emu: &Path, disk: &Path, qemu: bool) -> String {
    let (ns, extra) = if qemu {
        (
            " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'",
            "<qemu:commandline><qemu:arg value='-global'/><qemu:arg value='virtio-mmio.force-legacy=false'/></qemu:commandline>",
        )
    } else {
        ("", "")
    };
    format!(
        "<domain type='kvm'{ns}><name>gw</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='microvm'>hvm</type><kernel>{}</kernel>\
         <cmdline>mode=dirty mib=8 rate=5 disk=on disk_mib=2 hb_ms=100 cpus=1</cmdline></os>\
         <cpu mode='host-passthrough'/><devices><emulator>{}</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='{}'/>\
         <target dev='vda' bus='virtio'/><address type='virtio-mmio'/></disk>\
         <controller type='usb' model='none'/><serial type='pty'/><memballoon model='none'/></devices>{extra}</domain>",
        kernel.display(),
        emu.display(),
        disk.display()
    )
}

fn give_to_nobody(s: &Session, p: &Path) {
    if s.as_root {
        assert!(Command::new("chown").args(["-R", "nobody:nogroup"]).arg(p).status().unwrap().success());
    }
}

#[test]
fn virsh_migrate_live_and_copy_storage_all_between_two_daemons() {
    migrate_round_trip("godwit", None);
}

/// The same harness with QEMU 7.2 as `<emulator>` (Debian's qemu-system-x86), for comparison.
#[test]
fn virsh_migrate_round_trip_with_qemu_as_emulator() {
    // The machine's QEMU, or the private copy scripts/test.sh puts on PATH where Debian's
    // qemu-system-x86 cannot be installed beside a newer qemu-utils.
    let qemu = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("qemu-system-x86_64")).find(|q| q.exists()))
        .flatten()
        .unwrap_or_else(|| panic!("this test needs QEMU: apt-get install qemu-system-x86 (or run scripts/test.sh)"));
    migrate_round_trip("qemu", Some(qemu));
}

fn migrate_round_trip(tag: &str, emulator: Option<PathBuf>) {
    require_kvm();
    let dir = tmpdir(&format!("libvirt-virsh-mig-{tag}"));
    let (a, b) = (Session::start(&dir.join("a")), Session::start(&dir.join("b")));
    let img = dir.join("img");
    std::fs::create_dir_all(&img).unwrap();
    let (emu, kernel, disk, disk2) = (img.join("godwit"), img.join("guest"), img.join("disk.qcow2"), img.join("disk2.qcow2"));
    let is_qemu = emulator.is_some();
    let emu = match emulator {
        Some(e) => e,
        None => {
            std::fs::copy(godwit_bin(), &emu).unwrap();
            emu
        }
    };
    std::fs::copy(guest_bin(), &kernel).unwrap();
    create_image(&disk, "qcow2", "16M");
    create_image(&disk2, "qcow2", "16M");
    let xml = dir.join("gw.xml");
    std::fs::write(&xml, domain_xml(&kernel, &emu, &disk, is_qemu)).unwrap();
    give_to_nobody(&a, &dir);
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status();
    a.virsh(&["define", xml.to_str().unwrap()]);
    a.virsh(&["start", "gw"]);
    let mut on_a = Pty::open(&a);
    on_a.wait("HEARTBEAT");
    // 1. Live, shared image (--unsafe: a local file is not storage libvirt knows to be shared).
    a.virsh(&["migrate", "--live", "--unsafe", "gw", &b.uri(), "--migrateuri", "tcp://127.0.0.1"]);
    assert!(b.virsh(&["domstate", "gw"]).contains("running"));
    assert!(a.virsh(&["domstate", "gw"]).contains("shut off"), "the source domain is gone");
    let before = on_a.last_seq();
    let mut on_b = Pty::open(&b);
    let first = field(&on_b.wait("HEARTBEAT"), "seq").unwrap();
    assert!(first > before && before > 0, "heartbeats go on: {before} then {first}");
    on_b.check();
    // 2. Back, copying the disk to a separate image (NBD + blockdev-mirror under libvirt).
    let back = b.virsh(&["dumpxml", "--migratable", "gw"]).replace(disk.to_str().unwrap(), disk2.to_str().unwrap());
    let back_xml = dir.join("back.xml");
    std::fs::write(&back_xml, back).unwrap();
    give_to_nobody(&a, &back_xml);
    b.virsh(&["migrate", "--live", "--copy-storage-all", "--xml", back_xml.to_str().unwrap(), "gw", &a.uri(), "--migrateuri", "tcp://127.0.0.1"]);
    assert!(a.virsh(&["domstate", "gw"]).contains("running"));
    assert!(!b.virsh(&["list", "--all"]).contains("gw"), "the transient source domain is gone");
    assert!(a.virsh(&["domblklist", "gw"]).contains("disk2.qcow2"));
    let before = on_b.last_seq();
    let mut on_a = Pty::open(&a);
    let first = field(&on_a.wait("HEARTBEAT"), "seq").unwrap();
    assert!(first > before, "heartbeats go on: {before} then {first}");
    on_a.check();
    // 3. virsh shutdown of the migrated domain (see `shutdown` for what each emulator does).
    shutdown(&a, &mut on_a, !is_qemu);
    a.virsh(&["undefine", "gw"]);
    drop((a, b));
    let (code, out) = qemu_img_check(&disk2);
    assert_eq!(code, 0, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `virsh migrate --live --copy-storage-inc`: the domain's disk is a qcow2 overlay over a base
/// with 24 MiB of data; the destination has its own copy of the base and an empty overlay over
/// it, made beforehand with `qemu-img create -b` (what libvirt expects for an incremental
/// copy). libvirt mirrors with `sync: top`: the guest passes its checks on the destination, the
/// destination's top image holds the mirrored layer only (far less than the base's data),
/// `qemu-img check` is clean and the two chains read the same past the guest's ledger region.
#[test]
fn virsh_migrate_copy_storage_inc_moves_only_the_overlay() {
    require_kvm();
    let dir = tmpdir("libvirt-virsh-inc");
    let (a, b) = (Session::start(&dir.join("a")), Session::start(&dir.join("b")));
    let (img, img2) = (dir.join("img"), dir.join("img2"));
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&img2).unwrap();
    let (emu, kernel) = (img.join("godwit"), img.join("guest"));
    std::fs::copy(godwit_bin(), &emu).unwrap();
    std::fs::copy(guest_bin(), &kernel).unwrap();
    let (base, disk) = (img.join("base.qcow2"), img.join("disk.qcow2"));
    create_image(&base, "qcow2", "64M");
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5c 8M 24M", base.to_str().unwrap()]);
    std::fs::copy(&base, img2.join("base.qcow2")).unwrap();
    for d in [&disk, &img2.join("disk.qcow2")] {
        sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d.to_str().unwrap()]);
    }
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x77 40M 1M", "-c", "write -z 16M 1M", disk.to_str().unwrap()]);
    let xml = dir.join("gw.xml");
    std::fs::write(&xml, domain_xml(&kernel, &emu, &disk, false)).unwrap();
    give_to_nobody(&a, &dir);
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status();
    a.virsh(&["define", xml.to_str().unwrap()]);
    a.virsh(&["start", "gw"]);
    let mut on_a = Pty::open(&a);
    on_a.wait("HEARTBEAT");
    let moved = a.virsh(&["dumpxml", "--migratable", "gw"]).replace(img.to_str().unwrap(), img2.to_str().unwrap()).replace(img2.join("godwit").to_str().unwrap(), emu.to_str().unwrap()).replace(img2.join("guest").to_str().unwrap(), kernel.to_str().unwrap());
    let moved_xml = dir.join("moved.xml");
    std::fs::write(&moved_xml, moved).unwrap();
    give_to_nobody(&a, &moved_xml);
    // Ports of our own: libvirt's defaults (49152 on) collide with the other tests' daemons.
    let (mig, nbd) = (format!("tcp://127.0.0.1:{}", free_port()), free_port().to_string());
    a.virsh(&["migrate", "--live", "--copy-storage-inc", "--xml", moved_xml.to_str().unwrap(), "gw", &b.uri(), "--migrateuri", &mig, "--disks-port", &nbd]);
    assert!(b.virsh(&["domstate", "gw"]).contains("running"));
    assert!(b.virsh(&["domblklist", "gw"]).contains(img2.join("disk.qcow2").to_str().unwrap()));
    let before = on_a.last_seq();
    let mut on_b = Pty::open(&b);
    let first = field(&on_b.wait("HEARTBEAT"), "seq").unwrap();
    assert!(first > before && before > 0, "heartbeats go on: {before} then {first}");
    on_b.check();
    b.virsh(&["destroy", "gw"]);
    a.virsh(&["undefine", "gw"]);
    drop((a, b));
    let dtop = img2.join("disk.qcow2");
    let (code, out) = qemu_img_check(&dtop);
    assert_eq!(code, 0, "{out}");
    let map: serde_json::Value = serde_json::from_str(&sh("qemu-img", &["map", "-U", "--output=json", dtop.to_str().unwrap()])).unwrap();
    let top: u64 = map.as_array().unwrap().iter().filter(|e| e["depth"] == 0).map(|e| e["length"].as_u64().unwrap()).sum();
    eprintln!("copy-storage-inc: destination top image {top} bytes");
    assert!((2 << 20..12 << 20).contains(&top), "the destination's top holds the mirrored layer only: {top} bytes");
    // Past the guest's 2 MiB ledger region (rewritten on the destination since), both chains
    // read the same, every byte (the base's data, the top's data and its zeroed MiB).
    let tail = |p: &Path| {
        let out = p.with_extension("tail.raw");
        let _ = std::fs::remove_file(&out);
        sh("qemu-img", &["dd", "-U", "-f", "qcow2", "-O", "raw", "bs=1M", "skip=2", &format!("if={}", p.display()), &format!("of={}", out.display())]);
        out
    };
    let cmp = sh("qemu-img", &["compare", "-f", "raw", "-F", "raw", tail(&disk).to_str().unwrap(), tail(&dtop).to_str().unwrap()]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A NIC as libvirt gives one to an unprivileged daemon's domain: `<interface type='ethernet'>`
/// on a tap that exists (`managed='no'`, owned by the daemon's user), which libvirt opens and
/// hands to the emulator as `-netdev tap,fd=N`. The daemon runs in a network namespace holding
/// the tap, with the host side's address on it: the guest answers pings through the descriptor
/// libvirt passed; then `virsh shutdown` powers it off.
#[test]
fn virsh_starts_a_domain_on_a_tap_libvirt_opens() {
    require_kvm();
    // SAFETY: geteuid has no preconditions.
    assert!(unsafe { libc::geteuid() } == 0, "this test needs root (a network namespace and a tap)");
    let pid = std::process::id();
    let (ns, tap, net) = (format!("gwlv-{pid}"), format!("gwlv{}", pid % 100_000), format!("10.{}.1", pid % 200 + 20));
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    sh("ip", &["netns", "add", &ns]);
    let _del = DelNs(ns.clone()); // dropped after the session, whose daemon runs in it
    sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
    sh("ip", &["-n", &ns, "tuntap", "add", &tap, "mode", "tap", "user", "nobody"]);
    sh("ip", &["-n", &ns, "addr", "add", &format!("{net}.1/24"), "dev", &tap]);
    sh("ip", &["-n", &ns, "link", "set", &tap, "up"]);
    let dir = tmpdir("libvirt-virsh-net");
    let s = Session::start_in(&dir, Some(&ns));
    let (emu, kernel) = (dir.join("img/godwit"), dir.join("img/guest"));
    std::fs::copy(godwit_bin(), &emu).unwrap();
    std::fs::copy(guest_bin(), &kernel).unwrap();
    let xml = format!(
        "<domain type='kvm'><name>gw</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='microvm'>hvm</type><kernel>{}</kernel>\
         <cmdline>net=on ip={net}.2 hb_ms=100</cmdline></os>\
         <cpu mode='host-passthrough'/><devices><emulator>{}</emulator>\
         <interface type='ethernet'><mac address='52:54:00:00:77:02'/><target dev='{tap}' managed='no'/>\
         <model type='virtio'/><address type='virtio-mmio'/></interface>\
         <controller type='usb' model='none'/><serial type='pty'/><memballoon model='none'/></devices></domain>",
        kernel.display(),
        emu.display()
    );
    let xml_path = dir.join("gw.xml");
    std::fs::write(&xml_path, xml).unwrap();
    give_to_nobody(&s, &dir);
    s.virsh(&["define", xml_path.to_str().unwrap()]);
    s.virsh(&["start", "gw"]);
    let args = std::fs::read_to_string(dir.join("cache/libvirt/qemu/log/gw.log")).unwrap();
    assert!(args.contains("-netdev tap,fd="), "libvirt passes the tap it opened:\n{args}");
    let mut pty = Pty::open(&s);
    let l = pty.wait("GUEST NET");
    assert!(l.contains("mac=52:54:00:00:77:02"), "{l}");
    pty.wait("HEARTBEAT");
    let out = sh("ip", &["netns", "exec", &ns, "ping", "-n", "-q", "-c", "10", "-i", "0.1", "-W", "1", &format!("{net}.2")]);
    let line = out.lines().find(|l| l.contains("received")).unwrap_or_else(|| panic!("ping said: {out}"));
    let received: u64 = line.split(", ").find_map(|p| p.strip_suffix(" received")).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(received >= 9, "{line}");
    shutdown(&s, &mut pty, true);
    s.virsh(&["undefine", "gw"]);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
