//! Fuzz target: arbitrary bytes as the top of a backing chain whose backing files are
//! in-memory images (the input itself and its two halves), so hostile backing names, formats,
//! loops and depths are explored (see `qcow2::fuzzing::exercise_chain`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (a, b) = data.split_at(data.len() / 2);
    qcow2::fuzzing::exercise_chain(data, &[a, b]);
});
