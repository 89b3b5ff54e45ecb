#![no_main]
//! Fuzz target `gguf`: a whole GGUF file → `format::gguf::parse` (and `parse_header` with the
//! buffer as a prefix of a larger file, which must accept at least what `parse` accepts); an
//! accepted header is re-encoded and must parse back to the same key-values and tensor infos.

use llmfs::format::gguf::{parse, parse_header, value};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(file) = parse(data) else { return };
    let larger = parse_header(data, data.len() as u64 + 4096).expect("a prefix of a larger file parses too");
    assert_eq!(larger, file);
    let header = value::encode_header(&file.kvs, &file.tensors, file.alignment);
    let size = file.tensors.iter().map(|t| file.tensor_range(t).1 - file.data_offset).max().unwrap_or(0);
    let again = parse_header(&header, header.len() as u64 + size).expect("a re-encoded header parses");
    assert_eq!((again.kvs, again.tensors), (file.kvs, file.tensors));
});
