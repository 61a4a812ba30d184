//! Fuzz target: arbitrary bytes opened as a qcow2 image, then every read path, the checker and
//! a few writes/snapshot operations (see `qcow2::fuzzing::exercise_image`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qcow2::fuzzing::exercise_image(data);
});
