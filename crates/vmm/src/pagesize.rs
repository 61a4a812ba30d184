//! Which page size backs guest RAM while an incoming migration fills it.
//!
//! Guest RAM is advised for transparent huge pages (one fault maps 2 MiB). That is right for
//! a guest populating its own memory on a bare-metal host, but wrong for a destination
//! being filled page by page on a host that hands its free memory back to a hypervisor below
//! it (virtio-balloon *free page reporting*, as cloud VMs and this project's nested hosts do).
//! There, free blocks of the reporting order and up are returned to the layer below; a huge
//! page is carved from exactly such a block, so its first touch faults 512 times in the
//! hypervisor below. Small pages come first from unreported fragments, which are still
//! backed. Measured on this project's host (`cargo run --release -p migration --example
//! engine_throughput touch 1024 5 2`): first write to 1 GiB of fresh memory after a pause
//! runs at ~0.6 GB/s with huge pages against 2.3–3.2 GB/s with small ones
//! (`docs/migration-performance.md`).
//!
//! So where reporting is active, an incoming destination fills guest RAM with small pages
//! (the advice is given after it clears its RAM, before the stream starts, and stays: pages the
//! guest touches later are small too, and `khugepaged` leaves them). On this host that makes a
//! 16 GiB guest with 64 MiB touched migrate in ~64 ms instead of ~160 ms
//! (`bench/results/migration-size-smallpages.md`). `GODWIT_INCOMING_PAGES=huge` keeps huge
//! pages, `=small` forces small ones on any host.
//!
//! History: for a while this was opt-in, after the Linux boot-and-move test (`linux_moves`)
//! failed twice with it: "no line containing Freeing initrd memory" while the log went on to
//! `/init`. That is the mark of a test bug found later, and seen with huge pages as well: the
//! destination printed that line as its very first, `migrate` read it, and the next wait
//! never looked at it again (which line comes first after a move is a matter of timing).
//! A second test bug, a clock check taking a printk stamp against the line's
//! arrival although the console here prints seconds later, failed both page sizes. With both
//! fixed, the test passes with small pages at `-smp 1` and `-smp 2`
//! (`docs/migration-performance.md`).

use std::sync::OnceLock;

/// The virtio device ID of a memory balloon and its free-page-reporting feature bit.
const VIRTIO_ID_BALLOON: &str = "0x0005";
const VIRTIO_BALLOON_F_REPORTING: usize = 5;

/// True when an incoming migration should fill guest RAM with small pages: on hosts that
/// report free pages ([`host_reports_free_pages`]), unless `GODWIT_INCOMING_PAGES` says
/// `huge` (or `small` forces them anywhere). Decided once per process.
pub fn small_pages_while_receiving() -> bool {
    static CHOICE: OnceLock<bool> = OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("GODWIT_INCOMING_PAGES").as_deref() {
        Ok("small") => true,
        Ok("huge") => false,
        Err(_) => host_reports_free_pages(),
        Ok(other) => {
            let auto = host_reports_free_pages();
            tracing::warn!(
                "GODWIT_INCOMING_PAGES={other}: expected small or huge; using {} pages",
                if auto { "small" } else { "huge" }
            );
            auto
        }
    })
}

/// Whether this host hands free memory back to a hypervisor below it (a virtio balloon that
/// negotiated free page reporting): where fresh huge pages are cold (see the module text).
pub fn host_reports_free_pages() -> bool {
    free_page_reporting(std::path::Path::new("/sys/bus/virtio/devices"))
}

/// Whether a virtio balloon under `devices` (sysfs layout) negotiated free page reporting.
fn free_page_reporting(devices: &std::path::Path) -> bool {
    let Ok(entries) = std::fs::read_dir(devices) else { return false };
    entries.flatten().any(|e| {
        let dir = e.path();
        let id = std::fs::read_to_string(dir.join("device")).unwrap_or_default();
        let features = std::fs::read_to_string(dir.join("features")).unwrap_or_default();
        id.trim() == VIRTIO_ID_BALLOON && features.as_bytes().get(VIRTIO_BALLOON_F_REPORTING) == Some(&b'1')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(root: &std::path::Path, name: &str, id: &str, features: &str) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("device"), format!("{id}\n")).unwrap();
        std::fs::write(d.join("features"), format!("{features}\n")).unwrap();
    }

    #[test]
    fn reporting_is_read_from_the_balloons_negotiated_features() {
        let root = std::env::temp_dir().join(format!("godwit-pagesize-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        assert!(!free_page_reporting(&root), "no sysfs directory: no reporting");
        // A block device with bit 5 set is not a balloon.
        device(&root, "virtio0", "0x0002", "0110010100000000");
        assert!(!free_page_reporting(&root));
        // A balloon without reporting (bit 5 clear).
        device(&root, "virtio1", "0x0005", "0110000100000000");
        assert!(!free_page_reporting(&root));
        // A balloon with it.
        device(&root, "virtio2", "0x0005", "0110010100000000");
        assert!(free_page_reporting(&root));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
