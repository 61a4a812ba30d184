//! zstd-compressed qcow2 both ways against qemu-img: images qemu-img compressed read back
//! identically through godwit-img, images godwit-img compressed (`convert -c -o
//! compression_type=zstd`) pass `qemu-img check` and compare identical in qemu-img; guest writes
//! over compressed clusters (copy-on-write through decompression) stay consistent.

use std::path::PathBuf;
use std::process::Output;

mod common;
use common::{run_in, s, G};

use common::Scratch;


fn run(tool: &str, args: &[&str]) -> Output {
    run_in(None, tool, args)
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A raw disk with compressible text, incompressible noise, zeros and a partial last cluster.
fn source(d: &Scratch, cluster: usize) -> PathBuf {
    let size = 40 * cluster + 3 * 512;
    let mut v = vec![0u8; size];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for (i, b) in v.iter_mut().enumerate() {
        let c = i / cluster;
        *b = match c % 5 {
            0 | 1 => b"godwit moves VMs; "[i % 18],
            2 => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
            3 => 0,
            _ => (i / 4096) as u8,
        };
    }
    let tail = size - 1000;
    v[tail..].fill(0x7e);
    let p = d.path("src.raw");
    std::fs::write(&p, &v).unwrap();
    p
}

#[test]
fn qemu_compressed_zstd_images_read_identically() {
    for cluster in [65536usize, 4096] {
        let d = Scratch::named("zstd", &format!("read{cluster}"));
        let src = source(&d, cluster);
        let img = d.path("q.qcow2");
        let o = format!("compression_type=zstd,cluster_size={cluster}");
        ok(run("qemu-img", &["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&img)]));
        let back = d.path("back.raw");
        ok(run(G, &["convert", "-O", "raw", s(&img), s(&back)]));
        assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap(), "contents differ");
        // Version-independent facts: compression type, sizes, check numbers, map runs.
        let json = |tool: &str, a: &[&str]| -> serde_json::Value {
            let o = run(tool, a);
            assert!(o.status.success(), "{tool} {a:?}");
            serde_json::from_slice(&o.stdout).unwrap()
        };
        let info = ["info", "--output=json", s(&img)];
        let (qi, gi) = (json("qemu-img", &info), json(G, &info));
        for k in ["virtual-size", "cluster-size", "format"] {
            assert_eq!(gi[k], qi[k], "info {k}");
        }
        assert_eq!(gi["format-specific"]["data"]["compression-type"], "zstd");
        assert_eq!(qi["format-specific"]["data"]["compression-type"], "zstd");
        let check = ["check", "--output=json", s(&img)];
        let (qc, gc) = (json("qemu-img", &check), json(G, &check));
        for k in ["image-end-offset", "total-clusters", "allocated-clusters", "compressed-clusters", "fragmented-clusters"] {
            assert_eq!(gc[k], qc[k], "check {k}");
        }
        let runs = |v: serde_json::Value| -> Vec<(u64, u64, bool, bool, bool)> {
            let mut r: Vec<(u64, u64, bool, bool, bool)> = Vec::new();
            for e in v.as_array().unwrap() {
                let x = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["present"] == true, e["zero"] == true, e["data"] == true);
                match r.last_mut() {
                    Some(l) if (l.2, l.3, l.4) == (x.2, x.3, x.4) && l.0 + l.1 == x.0 => l.1 += x.1,
                    _ => r.push(x),
                }
            }
            r
        };
        let map = ["map", "--output=json", s(&img)];
        assert_eq!(runs(json(G, &map)), runs(json("qemu-img", &map)), "map runs");
        let info = ok(run(G, &["info", s(&img)]));
        assert!(info.contains("compression type: zstd"), "{info}");
    }
}

#[test]
fn our_zstd_images_pass_qemu_check_and_compare_identical() {
    for cluster in [65536usize, 4096, 512 * 32] {
        let d = Scratch::named("zstd", &format!("write{cluster}"));
        let src = source(&d, cluster);
        let img = d.path("g.qcow2");
        let o = format!("compression_type=zstd,cluster_size={cluster}");
        ok(run(G, &["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&img)]));
        ok(run("qemu-img", &["check", s(&img)]));
        let cmp = ok(run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&img)]));
        assert!(cmp.contains("identical"), "{cmp}");
        // Compressible clusters really are compressed (qemu-img map: data without offset),
        // noise is stored plain, zeros are not stored.
        let map = ok(run("qemu-img", &["map", "--output=json", s(&img)]));
        assert!(map.lines().any(|l| l.contains("\"data\": true") && !l.contains("offset")), "{map}");
        assert!(map.lines().any(|l| l.contains("\"offset\"")), "{map}");
        assert!(std::fs::metadata(&img).unwrap().len() < std::fs::metadata(&src).unwrap().len() * 3 / 4);
        let info = ok(run("qemu-img", &["info", s(&img)]));
        assert!(info.contains("compression type: zstd"), "{info}");
        // qemu-io overwrites part of a compressed cluster and reads it back.
        ok(run("qemu-io", &["-f", "qcow2", "-c", &format!("write -P 0x33 {} 100", cluster + 10), s(&img)]));
        ok(run("qemu-img", &["check", s(&img)]));
        let back = d.path("back.raw");
        ok(run(G, &["convert", "-O", "raw", s(&img), s(&back)]));
        let mut want = std::fs::read(&src).unwrap();
        want[cluster + 10..cluster + 110].fill(0x33);
        assert!(std::fs::read(&back).unwrap() == want);
    }
}

#[test]
fn zstd_create_matches_qemu_and_zlib_compressed_writes_are_refused_clearly() {
    let d = Scratch::named("zstd", "create");
    for (tool, name) in [("qemu-img", "q.qcow2"), (G, "g.qcow2")] {
        ok(run(tool, &["create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", s(&d.path(name)), "16M"]));
    }
    let v = run("qemu-img", &["--version"]);
    if String::from_utf8_lossy(&v.stdout).contains("version 7.2") {
        assert!(std::fs::read(d.path("g.qcow2")).unwrap() == std::fs::read(d.path("q.qcow2")).unwrap(), "byte-identical");
    }
    let info = ok(run("qemu-img", &["info", "--output=json", s(&d.path("g.qcow2"))]));
    assert!(info.contains("\"compression-type\": \"zstd\""), "{info}");
    ok(run("qemu-img", &["check", s(&d.path("g.qcow2"))]));
    let src = source(&d, 65536);
    let o = run(G, &["convert", "-c", "-O", "qcow2", s(&src), s(&d.path("z.qcow2"))]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("compression_type=zstd"));
    let o = run(G, &["create", "-f", "qcow2", "-o", "compat=0.10,compression_type=zstd", s(&d.path("v2.qcow2")), "1M"]);
    assert!(!o.status.success());
}

#[test]
fn guest_writes_over_our_zstd_clusters_stay_consistent() {
    let d = Scratch::named("zstd", "cow");
    let src = source(&d, 65536);
    let img = d.path("g.qcow2");
    ok(run(G, &["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", s(&src), s(&img)]));
    let mut want = std::fs::read(&src).unwrap();
    {
        use qcow2::BlockBackend;
        let mut q = qcow2::Qcow2::open(&img, &qcow2::OpenOptions::default()).unwrap();
        for (off, len) in [(5usize, 10usize), (65536 * 3 - 100, 300), (65536 * 6, 65536)] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + off) as u8).collect();
            q.write_at(off as u64, &data).unwrap();
            want[off..off + len].copy_from_slice(&data);
        }
        q.write_zeroes(65536 * 10, 65536).unwrap();
        want[65536 * 10..65536 * 11].fill(0);
        q.close().unwrap();
    }
    ok(run("qemu-img", &["check", s(&img)]));
    let back = d.path("back.raw");
    ok(run("qemu-img", &["convert", "-O", "raw", s(&img), s(&back)]));
    assert!(std::fs::read(&back).unwrap() == want);
}
