//! godwit-img on backing chains against the installed qemu-img: `info --backing-chain` (text and
//! JSON), `map` with layer depths, `create -b`, `convert` (flattening and `-B`), `commit` and
//! `rebase` (safe, `-u`, onto nothing) giving the same results as qemu-img on the same inputs.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{run_in, s, G};

use common::Scratch;



fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu(dir: &Path, args: &[&str]) -> String {
    ok(run_in(Some(dir), "qemu-img", args))
}
fn ours(dir: &Path, args: &[&str]) -> String {
    ok(run_in(Some(dir), G, args))
}

/// A chain made by qemu-img/qemu-io in `dir`: base (qcow2 or raw) <- mid <- top, relative
/// names, data at every level (partial clusters, zero clusters over data).
fn chain(dir: &Path, raw_base: bool) {
    let (base, bf) = if raw_base { ("base.raw", "raw") } else { ("base.qcow2", "qcow2") };
    qemu(dir, &["create", "-q", "-f", bf, base, "6M"]);
    ok(run_in(Some(dir), "qemu-io", &["-f", bf, "-c", "write -P 0x11 0 2M", "-c", "write -P 0x12 4M 1000", base]));
    qemu(dir, &["create", "-q", "-f", "qcow2", "-b", base, "-F", bf, "mid.qcow2"]);
    ok(run_in(Some(dir), "qemu-io", &["-f", "qcow2", "-c", "write -P 0x21 100000 5000", "-c", "write -z 1M 128K", "-c", "write -P 0x22 3M 70000", "mid.qcow2"]));
    qemu(dir, &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    ok(run_in(Some(dir), "qemu-io", &["-f", "qcow2", "-c", "write -P 0x31 1000 100", "-c", "write -P 0x32 3100000 200000", "-c", "write -z 5M 64K", "top.qcow2"]));
}

fn raw(dir: &Path, img: &str) -> Vec<u8> {
    let out = dir.join("flat.raw");
    let _ = std::fs::remove_file(&out);
    qemu(dir, &["convert", "-O", "raw", img, s(&out)]);
    std::fs::read(&out).unwrap()
}

/// `map --output=json` as (start, length, depth, present, zero, data) runs; host offsets and
/// the "data over a file hole" detail (ext4 writeback state) are left out, runs re-merged.
fn map_runs(out: &str) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let mut v: Vec<(u64, u64, u64, bool, bool, bool)> = Vec::new();
    for line in out.lines().filter(|l| l.contains("\"start\"")) {
        let num = |k: &str| -> u64 {
            let i = line.find(&format!("\"{k}\": ")).unwrap() + k.len() + 4;
            line[i..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        let flag = |k: &str| line.contains(&format!("\"{k}\": true"));
        let data = flag("data");
        let e = (num("start"), num("length"), num("depth"), flag("present"), flag("zero") && !data, data);
        match v.last_mut() {
            Some(l) if (l.2, l.3, l.4, l.5) == (e.2, e.3, e.4, e.5) && l.0 + l.1 == e.0 => l.1 += e.1,
            _ => v.push(e),
        }
    }
    v
}

/// The facts of `info --output=json` (one image or a chain) that do not depend on the qemu-img
/// version: names, formats, sizes, backing fields, qcow2 feature fields.
fn info_facts(out: &str) -> Vec<Vec<(String, String)>> {
    let v: serde_json::Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("bad JSON {e}: {out}"));
    let imgs = match v {
        serde_json::Value::Array(a) => a,
        o => vec![o],
    };
    let keys = ["filename", "format", "virtual-size", "cluster-size", "backing-filename", "full-backing-filename", "backing-filename-format", "dirty-flag"];
    let data = ["compat", "compression-type", "extended-l2", "refcount-bits", "lazy-refcounts", "corrupt"];
    imgs.iter()
        .map(|i| {
            let mut f: Vec<(String, String)> = keys.iter().map(|k| (k.to_string(), i[*k].to_string())).collect();
            f.extend(data.iter().map(|k| (k.to_string(), i["format-specific"]["data"][*k].to_string())));
            f
        })
        .collect()
}

/// Same JSON facts from `info ... --output=json`.
fn same_info(dir: &Path, args: &[&str]) {
    let mut a = vec!["info", "--output=json"];
    a.extend_from_slice(args);
    assert_eq!(info_facts(&ours(dir, &a)), info_facts(&qemu(dir, &a)), "{a:?}");
}

/// Same exit code and `check --output=json` numbers.
fn same_check(dir: &Path, img: &str) {
    let args = ["check", "--output=json", img];
    let (a, b) = (run_in(Some(dir), "qemu-img", &args), run_in(Some(dir), G, &args));
    assert_eq!(b.status.code(), a.status.code(), "check {img}");
    let facts = |o: &Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        ["image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters", "corruptions", "leaks", "check-errors"]
            .map(|k| v[k].to_string())
    };
    assert_eq!(facts(&b), facts(&a), "check --output=json {img}");
}

#[test]
fn info_and_map_of_qemu_made_chains_match_qemu_img() {
    for raw_base in [false, true] {
        let d = Scratch::named("chain", if raw_base { "info-raw" } else { "info" });
        chain(&d.0, raw_base);
        same_info(&d.0, &["--backing-chain", "top.qcow2"]);
        same_info(&d.0, &["mid.qcow2"]);
        // Absolute top path: the backing paths resolve against its directory.
        same_info(&d.0, &["--backing-chain", s(&d.path("top.qcow2"))]);
        let text = ours(&d.0, &["info", "--backing-chain", "top.qcow2"]);
        assert_eq!(text.matches("image: ").count(), 3, "{text}");
        assert!(text.contains("backing file: mid.qcow2\nbacking file format: qcow2\n"), "{text}");
        let abs = ours(&d.0, &["info", s(&d.path("top.qcow2"))]);
        assert!(abs.contains(&format!("backing file: mid.qcow2 (actual path: {})", s(&d.path("mid.qcow2")))), "{abs}");
        for img in ["top.qcow2", "mid.qcow2"] {
            let a = map_runs(&qemu(&d.0, &["map", "--output=json", img]));
            let b = map_runs(&ours(&d.0, &["map", "--output=json", img]));
            assert_eq!(b, a, "map --output=json {img}");
            let deepest = if img == "top.qcow2" { 2 } else { 1 };
            assert!(a.iter().any(|r| r.2 == deepest) && a.iter().any(|r| r.2 == 0), "the chain has depth");
        }
    }
}

#[test]
fn create_with_backing_matches_qemu_img() {
    let d = Scratch::named("chain", "create");
    chain(&d.0, false);
    for (tool, name) in [("qemu-img", "q.qcow2"), (G, "g.qcow2")] {
        ok(run_in(Some(&d.0), tool, &["create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", name]));
    }
    // Same facts as qemu-img's overlay (and the same bytes with the qemu-img we know: 7.2).
    let facts = |n: &str| info_facts(&qemu(&d.0, &["info", "--output=json", n])).into_iter().flatten().filter(|f| f.0 != "filename").collect::<Vec<_>>();
    assert_eq!(facts("g.qcow2"), facts("q.qcow2"));
    qemu(&d.0, &["check", "g.qcow2"]);
    if qemu(&d.0, &["--version"]).contains("version 7.2") {
        assert!(std::fs::read(d.path("g.qcow2")).unwrap() == std::fs::read(d.path("q.qcow2")).unwrap(), "byte-identical overlay");
    }
    // The progress line names the backing file.
    let b = ours(&d.0, &["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "g2.qcow2", "8M"]);
    assert!(b.contains("size=8388608 backing_file=mid.qcow2 backing_fmt=qcow2"), "{b}");
    // Missing backing file, missing -F: refused (and -u creates anyway).
    for tool in ["qemu-img", G] {
        assert!(!run_in(Some(&d.0), tool, &["create", "-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2", "x.qcow2"]).status.success());
        assert!(!run_in(Some(&d.0), tool, &["create", "-f", "qcow2", "-b", "mid.qcow2", "y.qcow2"]).status.success());
    }
    ours(&d.0, &["create", "-q", "-f", "qcow2", "-u", "-b", "nope.qcow2", "-F", "qcow2", "z.qcow2", "1M"]);
    let j = qemu(&d.0, &["info", "--output=json", "z.qcow2"]);
    assert!(j.contains("\"backing-filename\": \"nope.qcow2\""), "{j}");
}

#[test]
fn convert_flattens_and_keeps_a_backing_file_with_b() {
    let d = Scratch::named("chain", "convert");
    chain(&d.0, false);
    let want = raw(&d.0, "top.qcow2");
    ours(&d.0, &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"]);
    assert_eq!(raw(&d.0, "flat.qcow2"), want, "flattened");
    assert!(!qemu(&d.0, &["info", "flat.qcow2"]).contains("backing file"));
    qemu(&d.0, &["check", "flat.qcow2"]);
    // -B: only the top layer is copied, the new image sits on mid.qcow2 like qemu-img's.
    for (tool, out) in [("qemu-img", "qb.qcow2"), (G, "gb.qcow2")] {
        ok(run_in(Some(&d.0), tool, &["convert", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2", out]));
        assert_eq!(raw(&d.0, out), want, "{tool} -B contents");
        qemu(&d.0, &["check", out]);
    }
    let top0 = |img: &str| -> Vec<(u64, u64, u64, bool, bool, bool)> {
        map_runs(&qemu(&d.0, &["map", "--output=json", img])).into_iter().filter(|r| r.2 == 0).collect()
    };
    assert_eq!(top0("gb.qcow2"), top0("qb.qcow2"), "same clusters in the new top layer");
}

/// Two copies of the same chain, one for each tool.
fn twin(tag: &str) -> (Scratch, Scratch) {
    let a = Scratch::named("chain", &format!("{tag}-q"));
    let b = Scratch::named("chain", &format!("{tag}-g"));
    chain(&a.0, false);
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(a.path(f), b.path(f)).unwrap();
    }
    (a, b)
}

fn same_state(a: &Path, b: &Path, imgs: &[&str]) {
    for img in imgs {
        assert_eq!(raw(b, img), raw(a, img), "contents of {img}");
        let ma = map_runs(&qemu(a, &["map", "--output=json", img]));
        let mb = map_runs(&qemu(b, &["map", "--output=json", img]));
        assert_eq!(mb, ma, "allocation of {img} across the chain");
        qemu(b, &["check", img]);
        let ia = info_facts(&qemu(a, &["info", "--output=json", img]));
        let ib = info_facts(&qemu(b, &["info", "--output=json", img]));
        assert_eq!(ib, ia, "info of {img}");
    }
}

#[test]
fn commit_matches_qemu_img() {
    for keep in [false, true] {
        let (a, b) = twin(if keep { "commit-d" } else { "commit" });
        let before = raw(&a.0, "top.qcow2");
        let mut args = vec!["commit", "-q"];
        if keep {
            args.push("-d");
        }
        args.push("top.qcow2");
        qemu(&a.0, &args);
        ours(&b.0, &args);
        same_state(&a.0, &b.0, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
        assert_eq!(raw(&b.0, "mid.qcow2"), before, "mid now holds the committed data");
    }
}

#[test]
fn commit_into_a_deeper_base_matches_qemu_img() {
    for base in ["base.qcow2", "mid.qcow2"] {
        let (a, b) = twin(&format!("commit-b-{base}"));
        let before = raw(&a.0, "top.qcow2");
        let args = ["commit", "-q", "-b", base, "top.qcow2"];
        qemu(&a.0, &args);
        ours(&b.0, &args);
        same_state(&a.0, &b.0, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
        assert_eq!(raw(&b.0, base), before, "{base} holds everything above it");
    }
    let (_a, b) = twin("commit-b-bad");
    assert!(!run_in(Some(&b.0), G, &["commit", "-b", "nothere.qcow2", "top.qcow2"]).status.success());
}

#[test]
fn rebase_matches_qemu_img() {
    // Safe rebase onto the base, skipping mid: contents kept, mid's data copied up.
    let (a, b) = twin("rebase");
    let before = raw(&a.0, "top.qcow2");
    let args = ["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"];
    qemu(&a.0, &args);
    ours(&b.0, &args);
    same_state(&a.0, &b.0, &["top.qcow2"]);
    assert_eq!(raw(&b.0, "top.qcow2"), before);
    // Onto nothing: the top becomes standalone.
    let args = ["rebase", "-b", "", "top.qcow2"];
    qemu(&a.0, &args);
    ours(&b.0, &args);
    same_state(&a.0, &b.0, &["top.qcow2"]);
    assert_eq!(raw(&b.0, "top.qcow2"), before);
    // Unsafe: only the header changes (contents may change, the same way in both).
    let (a, b) = twin("rebase-u");
    let args = ["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"];
    qemu(&a.0, &args);
    ours(&b.0, &args);
    same_state(&a.0, &b.0, &["top.qcow2"]);
    // Missing -F is refused by both.
    for (dir, tool) in [(&a.0, "qemu-img"), (&b.0, G)] {
        assert!(!run_in(Some(dir), tool, &["rebase", "-b", "mid.qcow2", "top.qcow2"]).status.success());
    }
}

#[test]
fn check_on_overlays_and_extended_l2_images_match_qemu_img() {
    let d = Scratch::named("chain", "check-ext");
    chain(&d.0, false);
    for img in ["top.qcow2", "mid.qcow2"] {
        same_check(&d.0, img);
    }
    // An extended-L2 overlay with subcluster writes over the chain.
    qemu(&d.0, &["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", "-b", "top.qcow2", "-F", "qcow2", "ext.qcow2"]);
    ok(run_in(Some(&d.0), "qemu-io", &["-f", "qcow2", "-c", "write -P 0x41 3000 100", "-c", "write -z 40000 2048", "-c", "write -P 0x42 1M 100000", "ext.qcow2"]));
    same_info(&d.0, &["--backing-chain", "ext.qcow2"]);
    same_check(&d.0, "ext.qcow2");
    assert!(ours(&d.0, &["info", "ext.qcow2"]).contains("extended l2: true"));
    assert_eq!(raw(&d.0, "ext.qcow2").len(), 6 << 20);
    let flat = d.path("ours.raw");
    ours(&d.0, &["convert", "-O", "raw", "ext.qcow2", s(&flat)]);
    assert!(std::fs::read(&flat).unwrap() == raw(&d.0, "ext.qcow2"), "contents through the chain");
    // Map: same runs and depths, and the same host offsets on unallocated subclusters of
    // allocated clusters (qemu-img prints them).
    let a = map_runs(&qemu(&d.0, &["map", "--output=json", "ext.qcow2"]));
    let b = map_runs(&ours(&d.0, &["map", "--output=json", "ext.qcow2"]));
    assert_eq!(b, a);
    let absent = |out: String| -> Vec<(u64, u64, u64, Option<u64>)> {
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["present"] == false)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["depth"].as_u64().unwrap(), e["offset"].as_u64()))
            .collect()
    };
    assert_eq!(absent(ours(&d.0, &["map", "--output=json", "ext.qcow2"])), absent(qemu(&d.0, &["map", "--output=json", "ext.qcow2"])));
    // Standalone, the unallocated subclusters of allocated clusters stay in the top layer.
    qemu(&d.0, &["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", "alone.qcow2", "4M"]);
    ok(run_in(Some(&d.0), "qemu-io", &["-f", "qcow2", "-c", "write -P 0x41 3000 100", "-c", "write -z 40000 2048", "-c", "write -P 0x42 1M 100000", "alone.qcow2"]));
    let qa = absent(qemu(&d.0, &["map", "--output=json", "alone.qcow2"]));
    assert!(qa.iter().any(|e| e.3.is_some()), "the image has unallocated subclusters in allocated clusters");
    assert_eq!(absent(ours(&d.0, &["map", "--output=json", "alone.qcow2"])), qa);
}

#[test]
fn writers_are_refused_on_a_base_a_running_qemu_reads() {
    let d = Scratch::named("chain", "lock");
    chain(&d.0, false);
    // qemu-io keeps top.qcow2 open (so mid.qcow2 and base.qcow2 are its backing files).
    let mut child = Command::new("qemu-io")
        .current_dir(&d.0)
        .args(["-f", "qcow2", "-c", "sleep 4000", "top.qcow2"])
        .spawn()
        .expect("qemu-io (Debian qemu-utils) is needed");
    let mut locked = false;
    for _ in 0..400 {
        if qcow2::backing::in_use_as_backing(&d.path("mid.qcow2")).unwrap() {
            locked = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let results: Vec<(String, bool, String)> = [
        vec!["snapshot", "-c", "s1", "mid.qcow2"],
        vec!["resize", "base.qcow2", "+1M"],
        vec!["commit", "mid.qcow2"],
        vec!["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
    ]
    .iter()
    .map(|a| {
        let o = run_in(Some(&d.0), G, a);
        (a.join(" "), o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    })
    .collect();
    // qemu-img itself refuses the same.
    let q = run_in(Some(&d.0), "qemu-img", &["snapshot", "-c", "s1", "mid.qcow2"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(locked, "qemu-io's backing lock never showed");
    assert!(!q.status.success(), "qemu-img agrees the base is in use");
    for (cmd, ok, err) in results {
        assert!(!ok && err.contains("lock"), "{cmd}: must be refused with a lock error, got {ok} {err}");
    }
    // Free again: writes work.
    ours(&d.0, &["snapshot", "-c", "s1", "mid.qcow2"]);
}

#[test]
fn info_works_without_the_backing_file_like_qemu_img() {
    let d = Scratch::named("chain", "nobacking");
    qemu(&d.0, &["create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "x.qcow2", "1M"]);
    same_info(&d.0, &["x.qcow2"]);
    for tool in ["qemu-img", G] {
        assert!(!run_in(Some(&d.0), tool, &["info", "--backing-chain", "x.qcow2"]).status.success(), "{tool}");
        assert!(!run_in(Some(&d.0), tool, &["map", "x.qcow2"]).status.success(), "{tool}");
    }
    // And a rebase -u repairs it.
    qemu(&d.0, &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]);
    ours(&d.0, &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "x.qcow2"]);
    qemu(&d.0, &["map", "x.qcow2"]);
    same_info(&d.0, &["--backing-chain", "x.qcow2"]);
}
