#![no_main]
//! Fuzz target `merge_stats`: see fuzz/harness.rs for what it calls and its input layout.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::merge_stats(data));
