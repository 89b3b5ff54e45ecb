#![no_main]
//! Fuzz target `peft_config`: see fuzz/harness.rs for what it calls and its input layout.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::peft_config(data));
