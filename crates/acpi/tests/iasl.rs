//! The tables disassemble cleanly with ACPICA's `iasl -d` (Debian `acpica-tools`), and the
//! disassembled DSDT compiles back to the same AML.

use acpi::{build, Platform, VirtioMmio, DEFAULT_BASE};
use std::path::Path;
use std::process::Command;

fn iasl() -> &'static str {
    match Command::new("iasl").arg("-v").output() {
        Ok(_) => "iasl",
        Err(e) => panic!("iasl is needed for this test (Debian package acpica-tools: apt-get install acpica-tools): {e}"),
    }
}

/// A scratch directory for one test, removed when the test ends.
fn tmpdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("godwit-acpi-{name}-")).tempdir().expect("scratch directory")
}

/// Runs `iasl args` in `dir`; returns its combined output, failing on a non-zero exit.
fn run(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(iasl())
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run iasl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "iasl {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

fn platform() -> Platform {
    Platform {
        vcpus: 2,
        virtio: (0..3)
            .map(|i| VirtioMmio {
                base: 0xfeb0_0000 + i * 0x200,
                gsi: 16 + i as u32,
            })
            .collect(),
    }
}

/// The text without comments, with every run of white space made one space.
fn squash(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn dsdt_disassembles_cleanly_and_recompiles_to_the_same_aml() {
    let t = build(&platform(), DEFAULT_BASE).unwrap();
    let dsdt = t.table_at(t.layout.dsdt).unwrap();
    let scratch = tmpdir("dsdt");
    let d = scratch.path();
    std::fs::write(d.join("dsdt.dat"), dsdt).unwrap();
    let log = run(&d, &["-d", "dsdt.dat"]);
    for bad in ["Error", "Warning", "error", "warning"] {
        assert!(!log.contains(bad), "iasl -d reported {bad:?}:\n{log}");
    }
    let dsl = std::fs::read_to_string(d.join("dsdt.dsl")).expect("iasl wrote dsdt.dsl");
    let flat = squash(&dsl);
    assert!(
        flat.contains("DefinitionBlock (\"\", \"DSDT\", 2, \"GODWIT\", \"GODWITVM\", 0x00000001)"),
        "{dsl}"
    );
    assert!(
        flat.contains("Device (COM1) { Name (_HID, EisaId (\"PNP0501\") )"),
        "{dsl}"
    );
    assert!(
        flat.contains("IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08, )"),
        "{dsl}"
    );
    assert!(flat.contains("IRQNoFlags () {4}"), "{dsl}");
    for i in 0..3u32 {
        let want = format!(
            "Device (VR{i:02}) {{ Name (_HID, \"LNRO0005\") Name (_UID, {}) Name (_CRS, ResourceTemplate () {{ \
             Memory32Fixed (ReadWrite, 0x{:08X}, 0x00000200, ) \
             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }} }})",
            ["Zero", "One", "0x02"][i as usize],
            0xfeb0_0000 + i * 0x200,
            16 + i
        );
        assert!(flat.contains(&want), "missing {want}\nin:\n{dsl}");
    }
    assert!(
        flat.contains("Name (_S5, Package (0x04) { 0x05, Zero, Zero, Zero })"),
        "{dsl}"
    );
    for want in [
        "Device (GED0) { Name (_HID, \"ACPI0013\" )",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000009, }",
        "OperationRegion (EREG, SystemIO, 0x0603, One)",
        "Method (_EVT, 1, Serialized) { Local0 = ESEL If ((Local0 & One)) {",
        "Notify (PWRB, 0x80)",
        "Device (PWRB) { Name (_HID, EisaId (\"PNP0C0C\") )",
    ] {
        assert!(flat.contains(want), "missing {want}\nin:\n{dsl}");
    }

    // Compile the disassembly back: the AML body must be byte-identical to ours.
    run(&d, &["-p", "re", "dsdt.dsl"]);
    let aml = std::fs::read(d.join("re.aml")).expect("iasl wrote re.aml");
    assert_eq!(&aml[36..], &dsdt[36..], "recompiled AML differs");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn static_tables_disassemble_cleanly() {
    let t = build(&platform(), DEFAULT_BASE).unwrap();
    let l = t.layout;
    let scratch = tmpdir("static");
    let d = scratch.path();
    for (name, addr, expect) in [
        (
            "facp",
            l.fadt,
            vec![
                "Hardware Reduced (V5) : 1",
                "Reset Register Supported (V2) : 1",
                "Address : 0000000000000600",
            ],
        ),
        (
            "apic",
            l.madt,
            vec![
                "Processor ID : 01",
                "I/O APIC",
                "Interrupt Source Override",
                "Local APIC NMI",
            ],
        ),
        (
            "xsdt",
            l.xsdt,
            vec!["ACPI Table Address 0", "ACPI Table Address 1"],
        ),
    ] {
        std::fs::write(d.join(format!("{name}.dat")), t.table_at(addr).unwrap()).unwrap();
        let log = run(&d, &["-d", &format!("{name}.dat")]);
        let dsl =
            std::fs::read_to_string(d.join(format!("{name}.dsl"))).expect("iasl wrote the .dsl");
        for bad in [
            "Error",
            "Warning",
            "Invalid",
            "terminates in the middle",
            "Unknown",
        ] {
            assert!(
                !dsl.contains(bad) && !log.contains(bad),
                "{name}: {bad:?} in:\n{log}\n{dsl}"
            );
        }
        let flat = squash(&dsl);
        for e in expect {
            assert!(flat.contains(e), "{name}: missing {e:?} in:\n{dsl}");
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}
