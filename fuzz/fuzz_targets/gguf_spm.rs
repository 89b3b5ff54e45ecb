#![no_main]
//! Fuzz target `gguf_spm`: a SentencePiece `tokenizer.model` → `format::gguf::spm::parse_model`,
//! the minimal protobuf reader behind GGUF's SentencePiece vocabularies.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(pieces) = llmfs::format::gguf::spm::parse_model(data) {
        assert!(!pieces.is_empty() && pieces.len() <= data.len());
    }
});
