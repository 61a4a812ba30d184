//! The benchmark suite's reusable parts: sample statistics, parsing of HMP answers (QEMU's and
//! Godwit's `info migrate` text), the results table/JSON, and the migration report chart drawn
//! from Godwit's `migrate -r FILE` JSON. The binary (`godwit-bench`, see `bench/README.md`)
//! drives the VMMs; everything here is plain data in and out, so it is unit-tested.

pub mod chart;
pub mod hmptext;
pub mod results;
pub mod stats;
pub mod linuxlog;
