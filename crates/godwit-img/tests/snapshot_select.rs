//! Snapshot selection exactly as qemu-img does it, checked against the installed qemu-img on an
//! image where a snapshot is *named* "1" and another has *id* 1: `convert -l snapshot.name=`
//! (names only), `-l snapshot.id=` (ids only), both (both must match), a bare `-l X` (id first,
//! then name); `snapshot -a X` (id, then name) and `snapshot -d X` (name only). Each case runs
//! both tools on copies of the same image and compares exit status and resulting bytes/lists.

use std::path::{Path, PathBuf};

mod common;
use common::{run, s, G};


fn ok(tool: &str, args: &[&str]) {
    let o = run(tool, args);
    assert!(o.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("godwit-snapsel-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}


/// id 1 "a" holds 0xaa, id 2 "1" holds 0xbb, the active layer 0xcc.
fn image(d: &Path) -> PathBuf {
    let img = d.join("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    for (pat, tag) in [("0xaa", Some("a")), ("0xbb", Some("1")), ("0xcc", None)] {
        ok("qemu-io", &["-c", &format!("write -P {pat} 0 64k"), s(&img)]);
        if let Some(t) = tag {
            ok("qemu-img", &["snapshot", "-c", t, s(&img)]);
        }
    }
    img
}

/// (id, name) of each snapshot, from qemu-img's JSON.
fn list(img: &Path) -> Vec<(String, String)> {
    let o = run("qemu-img", &["info", "-U", "--output=json", s(img)]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.get("snapshots")
        .and_then(|s| s.as_array())
        .map(|a| a.iter().map(|s| (s["id"].as_str().unwrap().to_string(), s["name"].as_str().unwrap().to_string())).collect())
        .unwrap_or_default()
}

fn first_byte(tool: &str, args: &[&str], out: &Path) -> (bool, Option<u8>) {
    let _ = std::fs::remove_file(out);
    let o = run(tool, args);
    (o.status.success(), std::fs::read(out).ok().and_then(|b| b.first().copied()))
}

#[test]
fn convert_selects_the_snapshot_qemu_img_selects() {
    let d = dir("convert");
    let img = image(&d);
    let out = d.join("o.raw");
    let mut expected_hits = 0;
    for spec in ["snapshot.name=1", "snapshot.id=1", "1", "a", "snapshot.id=2,snapshot.name=1", "snapshot.id=1,snapshot.name=1", "snapshot.name=2", "nope"] {
        let args = ["convert", "-l", spec, "-O", "raw", s(&img), s(&out)];
        let q = first_byte("qemu-img", &args, &out);
        let g = first_byte(G, &args, &out);
        assert_eq!(g, q, "convert -l {spec}: godwit-img (ok, first byte) vs qemu-img");
        expected_hits += q.0 as u32;
    }
    // The cases above really tell the snapshots apart (name=1 -> 0xbb, id=1 -> 0xaa).
    assert_eq!(expected_hits, 5);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn snapshot_apply_and_delete_select_as_qemu_img() {
    let d = dir("apply-delete");
    let img = image(&d);
    for op in ["-a", "-d"] {
        for key in ["1", "2", "a", "nope"] {
            let (qi, gi) = (d.join("q.qcow2"), d.join("g.qcow2"));
            std::fs::copy(&img, &qi).unwrap();
            std::fs::copy(&img, &gi).unwrap();
            let q = run("qemu-img", &["snapshot", op, key, s(&qi)]);
            let g = run(G, &["snapshot", op, key, s(&gi)]);
            assert_eq!(g.status.success(), q.status.success(), "snapshot {op} {key}: {}", String::from_utf8_lossy(&g.stderr));
            assert_eq!(list(&gi), list(&qi), "snapshot {op} {key}: snapshots left");
            let (qr, gr) = (d.join("q.raw"), d.join("g.raw"));
            ok("qemu-img", &["convert", "-O", "raw", s(&qi), s(&qr)]);
            ok("qemu-img", &["convert", "-O", "raw", s(&gi), s(&gr)]);
            assert_eq!(std::fs::read(&gr).unwrap(), std::fs::read(&qr).unwrap(), "snapshot {op} {key}: active layer");
            let c = run("qemu-img", &["check", s(&gi)]);
            assert!(c.status.success(), "snapshot {op} {key}: qemu-img check: {}", String::from_utf8_lossy(&c.stdout));
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}
