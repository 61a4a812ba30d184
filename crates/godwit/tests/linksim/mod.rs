//! A link simulator for migration tests: two network namespaces ("hosts") joined by a veth
//! pair, shaped with `tc` — `tbf` for the rate, `netem` for delay and loss — set up by
//! [`Link::new`] and torn down on drop (the same namespace layout as `migration_hosts.rs`).
//! Shaping is applied on both ends' egress, so each direction gets the same link. `netem` is a
//! kernel module (`sch_netem`) some kernels lack: asking for delay or loss there fails with a
//! message saying so (never silently unshaped).
#![allow(dead_code)]

use std::process::Command;

/// What the link does.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// Bits per second (0 = unshaped).
    pub rate_bps: u64,
    /// One-way delay in ms (netem).
    pub delay_ms: u32,
    /// Packet loss in percent (netem).
    pub loss_pct: f32,
}

/// Two namespaces `a` (10.78.N.1) and `b` (10.78.N.2) joined by a shaped veth.
pub struct Link {
    pub a: String,
    pub b: String,
    pub a_addr: String,
    pub b_addr: String,
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd} is needed for the link simulator (Debian iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn must(cmd: &str, args: &[&str]) {
    if let Err(e) = run(cmd, args) {
        panic!("link simulator: {e}");
    }
}

impl Link {
    pub fn new(tag: &str, shape: Shape) -> Link {
        let pid = std::process::id();
        let n = pid % 200 + 20;
        let t = &tag[..tag.len().min(4)];
        let a = format!("gwl-{t}-a-{pid}");
        let b = format!("gwl-{t}-b-{pid}");
        let (va, vb) = (format!("gla{n}{t}"), format!("glb{n}{t}"));
        for ns in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let link = Link { a: a.clone(), b: b.clone(), a_addr: format!("10.78.{n}.1"), b_addr: format!("10.78.{n}.2") };
        must("ip", &["netns", "add", &a]);
        must("ip", &["netns", "add", &b]);
        must("ip", &["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        must("ip", &["link", "set", &va, "netns", &a]);
        must("ip", &["link", "set", &vb, "netns", &b]);
        must("ip", &["-n", &a, "addr", "add", &format!("{}/24", link.a_addr), "dev", &va]);
        must("ip", &["-n", &b, "addr", "add", &format!("{}/24", link.b_addr), "dev", &vb]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            must("ip", &["-n", ns, "link", "set", dev, "up"]);
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
            link.shape(ns, dev, shape);
        }
        link
    }

    fn shape(&self, ns: &str, dev: &str, s: Shape) {
        let netem = s.delay_ms > 0 || s.loss_pct > 0.0;
        let mut parent = vec!["root".to_string()];
        if netem {
            let mut args: Vec<String> = ["-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem"].map(String::from).to_vec();
            if s.delay_ms > 0 {
                args.extend(["delay".into(), format!("{}ms", s.delay_ms)]);
            }
            if s.loss_pct > 0.0 {
                args.extend(["loss".into(), format!("{}%", s.loss_pct)]);
            }
            // Enough queue for a fast link's bandwidth-delay product.
            args.extend(["limit".into(), "100000".into()]);
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = run("tc", &a) {
                panic!("link simulator: netem (delay/loss) is not available here — the kernel lacks sch_netem? ({e})");
            }
            parent = vec!["parent".into(), "1:".into()];
        }
        if s.rate_bps > 0 {
            // A burst of 20 ms at the rate (at least 64 KiB), queueing up to 100 ms.
            let burst = (s.rate_bps / 8 / 50).max(64 * 1024);
            let mut args: Vec<String> = ["-n", ns, "qdisc", "add", "dev", dev].map(String::from).to_vec();
            args.extend(parent);
            args.extend(["handle".into(), "2:".into(), "tbf".into(), "rate".into(), format!("{}bit", s.rate_bps)]);
            args.extend(["burst".into(), format!("{burst}b"), "latency".into(), "100ms".into()]);
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            must("tc", &a);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).output();
    }
}
