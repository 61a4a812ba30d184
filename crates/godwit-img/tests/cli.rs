//! godwit-img against the installed qemu-img: same command lines, same output and exit codes
//! on the same images (both directions: images made by either tool). The text layouts are
//! compared byte for byte against qemu-img 7.2 (the layout godwit-img prints); against newer
//! versions the JSON forms and exit codes are (see `same`).

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{run_in, s, G};

use common::Scratch;


fn run(tool: &str, args: &[&str]) -> Output {
    run_in(None, tool, args)
}

fn qemu(args: &[&str]) -> Output {
    run("qemu-img", args)
}
fn ours(args: &[&str]) -> Output {
    run(G, args)
}
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether the installed qemu-img is 7.2, whose human-readable layouts godwit-img reproduces
/// byte for byte. Newer qemu-img versions print other layouts (`VM_SIZE`, child nodes...):
/// against them only the facts are compared (JSON, exit codes, what the commands did).
fn qemu_is_72() -> bool {
    let o = qemu(&["--version"]);
    String::from_utf8_lossy(&o.stdout).contains("version 7.2")
}

/// Every member of `ours` is in `theirs` with the same value (recursively; arrays element by
/// element and of equal length). Newer qemu-img versions add members (child nodes...).
fn json_subset(ours: &serde_json::Value, theirs: &serde_json::Value, path: &str) -> Result<(), String> {
    use serde_json::Value;
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let w = b.get(k).ok_or_else(|| format!("{path}.{k}: missing in qemu-img's JSON"))?;
                json_subset(v, w, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Err(format!("{path}: {} vs {} elements", a.len(), b.len()));
            }
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                json_subset(v, w, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!("{path}: godwit-img {a} vs qemu-img {b}")),
    }
}

fn same_json(args: &[&str]) {
    let a = qemu(args);
    let b = ours(args);
    assert_eq!(b.status.code(), a.status.code(), "exit code of {args:?}");
    let parse = |o: &Output, who: &str| -> serde_json::Value {
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{who} {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
    };
    if a.stdout.is_empty() && b.stdout.is_empty() {
        return;
    }
    if let Err(e) = json_subset(&parse(&b, "godwit-img"), &parse(&a, "qemu-img"), "") {
        panic!("{args:?}: {e}");
    }
}

/// Same exit code and the same facts. Against qemu-img 7.2: the same stdout and stderr (tool
/// name aside), byte for byte. Against a newer one: the JSON form of the same command (or,
/// for `snapshot -l`, of `info`), compared member by member.
fn same(args: &[&str]) {
    if args.contains(&"--output=json") {
        return same_json(args);
    }
    let a = qemu(args);
    let b = ours(args);
    assert_eq!(b.status.code(), a.status.code(), "exit code of {args:?}");
    if !qemu_is_72() {
        assert_eq!(b.stderr.is_empty(), a.stderr.is_empty(), "stderr of {args:?}");
        let json_args: Vec<&str> = match args {
            ["snapshot", "-l", rest @ ..] => ["info", "-U", "--output=json"].iter().copied().chain(rest.iter().copied()).collect(),
            [cmd @ ("info" | "check" | "map"), rest @ ..] => [*cmd, "--output=json"].iter().copied().chain(rest.iter().copied()).collect(),
            _ => return,
        };
        return same_json(&json_args);
    }
    let norm = |v: &[u8]| {
        String::from_utf8_lossy(v)
            .replace("qemu-img: ", "")
            .replace("godwit-img: ", "")
    };
    assert_eq!(
        String::from_utf8_lossy(&b.stdout),
        String::from_utf8_lossy(&a.stdout),
        "stdout of {args:?}"
    );
    assert_eq!(norm(&b.stderr), norm(&a.stderr), "stderr of {args:?}");
}

/// `map` output with the host-file hole detail taken out: whether an unwritten part of a data
/// cluster shows as a hole depends on the file system's writeback state at that instant (ext4
/// unwritten extents), so both tools can legitimately differ from one run to the next. Data
/// runs are re-merged when they are contiguous in guest and host.
fn norm_map(out: &str, json: bool) -> Vec<(u64, u64, String, Option<u64>)> {
    let mut v: Vec<(u64, u64, String, Option<u64>)> = Vec::new();
    for line in out.lines() {
        let num = |k: &str| -> Option<u64> {
            let i = line.find(&format!("\"{k}\": "))? + k.len() + 4;
            line[i..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let (start, len, kind, off) = if json {
            let data = line.contains("\"data\": true");
            let kind = if data {
                "data".to_string()
            } else {
                line.split("\"present\"")
                    .nth(1)
                    .unwrap_or("")
                    .split("\"data\"")
                    .next()
                    .unwrap_or("")
                    .to_string()
            };
            (
                num("start").unwrap(),
                num("length").unwrap(),
                kind,
                num("offset"),
            )
        } else {
            let f: Vec<&str> = line.split_whitespace().collect();
            let h = |t: &str| u64::from_str_radix(t.trim_start_matches("0x"), 16).unwrap();
            if f.first() == Some(&"Offset") {
                continue;
            }
            (h(f[0]), h(f[1]), "data".to_string(), Some(h(f[2])))
        };
        if let Some(l) = v.last_mut() {
            if l.2 == kind && l.0 + l.1 == start && (kind != "data" || l.3.map(|o| o + l.1) == off)
            {
                l.1 += len;
                continue;
            }
        }
        v.push((start, len, kind, off));
    }
    v
}

fn same_map(img: &Path) {
    for json in [true, false] {
        let mut args = vec!["map"];
        if json {
            args.push("--output=json");
        }
        args.push(s(img));
        let a = ok(&qemu(&args));
        let b = ok(&ours(&args));
        let (na, nb) = (norm_map(&a, json), norm_map(&b, json));
        if json {
            assert_eq!(
                nb,
                na,
                "map --output=json of {}:\nqemu:\n{a}\nours:\n{b}",
                s(img)
            );
        } else {
            // Human output leaves holes out, so runs may be split differently: every run of
            // either tool must lie inside a run of the other with the same guest->host delta.
            let inside = |x: &(u64, u64, String, Option<u64>),
                          ys: &[(u64, u64, String, Option<u64>)]| {
                ys.iter().any(|y| {
                    y.0 <= x.0
                        && x.0 + x.1 <= y.0 + y.1
                        && y.3.unwrap() as i128 - y.0 as i128 == x.3.unwrap() as i128 - x.0 as i128
                })
            };
            assert!(
                nb.iter().all(|x| inside(x, &na))
                    && na
                        .iter()
                        .all(|x| nb.iter().any(|y| y.0 == x.0) || inside(x, &nb)),
                "map of {}:\nqemu:\n{a}\nours:\n{b}",
                s(img)
            );
        }
    }
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(s(img));
    ok(&run("qemu-io", &a));
}

#[test]
fn create_is_byte_identical() {
    let d = Scratch::named("cli", "create");
    for o in [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "refcount_bits=8",
    ] {
        for size in ["64M", "1G", "100000"] {
            let (a, b) = (d.path("q.qcow2"), d.path("g.qcow2"));
            let mut qa = vec!["create", "-f", "qcow2"];
            if !o.is_empty() {
                qa.extend(["-o", o]);
            }
            let mut ga = qa.clone();
            qa.extend([s(&a), size]);
            ga.extend([s(&b), size]);
            let qo = ok(&qemu(&qa));
            let go = ok(&ours(&ga));
            assert_eq!(
                go.replace("g.qcow2", "q.qcow2"),
                qo,
                "create message for -o {o}"
            );
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "bytes differ for -o '{o}' size {size}"
            );
        }
    }
    let r = d.path("r.img");
    assert_eq!(
        ok(&ours(&["create", "-f", "raw", s(&r), "1M"])),
        format!("Formatting '{}', fmt=raw size=1048576\n", s(&r))
    );
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 1 << 20);
}

#[test]
fn info_list_map_match() {
    let d = Scratch::named("cli", "info");
    // An image QEMU made, with a savevm snapshot (VM size, clock) and qemu-img snapshots.
    let img = d.path("a.qcow2");
    ok(&qemu(&["create", "-q", "-f", "qcow2", s(&img), "64M"]));
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 200k",
            "write -z 1M 128k",
            "write -P 0x22 10M 4k",
        ],
    );
    ok(&qemu(&["snapshot", "-c", "first snap", s(&img)]));
    let mut vm = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "stdio",
            "-drive",
        ])
        .arg(format!("file={},if=none,format=qcow2", s(&img)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (Debian qemu-system-x86) is needed for this test");
    use std::io::Write;
    vm.stdin
        .take()
        .unwrap()
        .write_all(b"savevm vm1\nquit\n")
        .unwrap();
    assert!(vm.wait().unwrap().success());
    qemu_io(&img, &["write -P 0x33 64k 64k"]);
    for args in [
        vec!["info", s(&img)],
        vec!["info", "--output=json", s(&img)],
        vec!["snapshot", "-l", s(&img)],
        vec!["check", s(&img)],
        vec!["check", "--output=json", s(&img)],
    ] {
        same(&args);
    }
    same_map(&img);
    // The same after our own snapshot operations, and on a v2 image with 512-byte clusters.
    ok(&ours(&["snapshot", "-c", "ours", s(&img)]));
    ok(&ours(&["snapshot", "-a", "first snap", s(&img)]));
    ok(&ours(&["snapshot", "-d", "vm1", s(&img)]));
    let v2 = d.path("v2.qcow2");
    ok(&ours(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=512",
        s(&v2),
        "3M",
    ]));
    qemu_io(&v2, &["write -P 0x44 1000 300k", "write -P 0x55 2M 20k"]);
    ok(&ours(&["snapshot", "-c", "x", s(&v2)]));
    let raw = d.path("r.raw");
    ok(&qemu(&["create", "-q", "-f", "raw", s(&raw), "5M"]));
    for f in [&img, &v2] {
        for args in [
            vec!["info", s(f)],
            vec!["info", "--output=json", s(f)],
            vec!["snapshot", "-l", s(f)],
            vec!["check", s(f)],
            vec!["check", "--output=json", s(f)],
        ] {
            same(&args);
        }
        same_map(f);
    }
    same(&["info", "-f", "raw", s(&raw)]);
    same(&["info", "--output=json", "-f", "raw", s(&raw)]);
}

fn set_refcount(img: &Path, cluster: u64, val: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    // Fresh qemu-img layout: refcount block 0 at cluster 2 (64 KiB clusters, 16-bit).
    f.write_all_at(&val.to_be_bytes(), 0x20000 + 2 * cluster)
        .unwrap();
}

#[test]
fn check_findings_and_exit_codes_match() {
    let d = Scratch::named("cli", "check");
    let base = d.path("base.qcow2");
    ok(&qemu(&["create", "-q", "-f", "qcow2", s(&base), "64M"]));
    qemu_io(&base, &["write -P 0x11 0 64k"]); // L2 at cluster 4, data at cluster 5
                                              // Leak: a cluster inside the file with a refcount but no reference.
    let leak = d.path("leak.qcow2");
    std::fs::copy(&base, &leak).unwrap();
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&leak)
        .unwrap();
    f.set_len(7 * 65536).unwrap();
    set_refcount(&leak, 6, 1);
    same(&["check", s(&leak)]);
    same(&["check", "--output=json", s(&leak)]);
    assert_eq!(ours(&["check", s(&leak)]).status.code(), Some(3));
    // Corruption: a referenced data cluster with refcount 0.
    let bad = d.path("bad.qcow2");
    std::fs::copy(&base, &bad).unwrap();
    set_refcount(&bad, 5, 0);
    same(&["check", s(&bad)]);
    same(&["check", "--output=json", s(&bad)]);
    assert_eq!(ours(&["check", s(&bad)]).status.code(), Some(2));
    // Repair leaks with our tool; QEMU then finds it clean.
    let o = ours(&["check", "-r", "leaks", s(&leak)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 leaked clusters\n    0 corruptions"));
    assert_eq!(qemu(&["check", s(&leak)]).status.code(), Some(0));
    let o = ours(&["check", "-r", "all", s(&bad)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(qemu(&["check", s(&bad)]).status.code(), Some(0));
    // Compressed clusters (qemu-img convert -c): check statistics, info, map.
    let raw = d.path("text.raw");
    std::fs::write(&raw, b"compressible text ".repeat(200_000)).unwrap();
    let comp = d.path("comp.qcow2");
    ok(&qemu(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&comp),
    ]));
    qemu_io(&comp, &["write -P 0x11 1M 64k"]);
    same(&["check", s(&comp)]);
    same(&["check", "--output=json", s(&comp)]);
    same(&["info", s(&comp)]);
    same(&["map", "--output=json", s(&comp)]);
    let (a, b) = (qemu(&["map", s(&comp)]), ours(&["map", s(&comp)]));
    assert_eq!(
        (a.status.code(), b.status.code()),
        (Some(1), Some(1)),
        "human map of compressed clusters fails in both"
    );
    // Raw images have no check, as in qemu-img.
    let raw = d.path("r.img");
    ok(&qemu(&["create", "-q", "-f", "raw", s(&raw), "1M"]));
    assert_eq!(
        ours(&["check", "-f", "raw", s(&raw)]).status.code(),
        qemu(&["check", "-f", "raw", s(&raw)]).status.code()
    );
}

#[test]
fn snapshot_convert_resize_roundtrip() {
    let d = Scratch::named("cli", "conv");
    let img = d.path("x.qcow2");
    ok(&ours(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&img),
        "8M",
    ]));
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    ok(&ours(&["snapshot", "-c", "one", s(&img)]));
    qemu_io(&img, &["write -P 0x22 512k 1M"]);
    ok(&ours(&["snapshot", "-c", "two", s(&img)]));
    qemu_io(&img, &["write -P 0x33 7M 1M"]);
    assert_eq!(qemu(&["check", s(&img)]).status.code(), Some(0));
    for l in [None, Some("snapshot.name=one"), Some("snapshot.name=two")] {
        let (a, b) = (d.path("q.raw"), d.path("g.raw"));
        let mut qa = vec!["convert", "-f", "qcow2", "-O", "raw"];
        if let Some(l) = l {
            qa.extend(["-l", l]);
        }
        let mut ga = qa.clone();
        qa.extend([s(&img), s(&a)]);
        ga.extend([s(&img), s(&b)]);
        ok(&qemu(&qa));
        ok(&ours(&ga));
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "convert {l:?} differs"
        );
        // And raw -> qcow2 with our tool reads back identical in QEMU.
        let c = d.path("c.qcow2");
        ok(&ours(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&b),
            s(&c),
        ]));
        assert_eq!(qemu(&["check", s(&c)]).status.code(), Some(0));
        ok(&qemu(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&c),
            s(&a),
        ]));
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    }
    ok(&ours(&["snapshot", "-a", "one", s(&img)]));
    ok(&ours(&["snapshot", "-d", "two", s(&img)]));
    ok(&ours(&["resize", s(&img), "+8M"]));
    let info = ok(&qemu(&["info", "--output=json", s(&img)]));
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    assert_eq!(qemu(&["check", s(&img)]).status.code(), Some(0));
    same(&["snapshot", "-l", s(&img)]);
    // Errors: one line, exit 1.
    for bad in [
        vec!["snapshot", "-a", "nope", s(&img)],
        vec!["snapshot", "-d", "nope", s(&img)],
        vec!["info", s(&d.path("missing.qcow2"))],
        vec!["create", "-f", "qcow2", s(&d.path("y.qcow2")), "12Q"],
        vec!["frobnicate"],
        vec!["check", "-r", "everything", s(&img)],
        vec!["resize", s(&img), "1M"],
    ] {
        let o = ours(&bad);
        assert_eq!(o.status.code(), Some(1), "{bad:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.lines().count(), 1, "{bad:?}: {e}");
        assert_eq!(
            qemu(&bad).status.code(),
            Some(1),
            "qemu-img agrees on failure for {bad:?}"
        );
    }
}
