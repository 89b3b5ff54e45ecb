//! Deltas: a fine-tune stored as its difference from a base, read back as the full model.
//!
//! FastChat's make_delta.py and apply_delta.py materialize whole models; llmfs keeps only the
//! difference and applies it per chunk on read. A delta entry owns one *container* per file of
//! the target directory, with the same name, in `STORE/models/NAME/`. A container is a
//! safetensors file (standard tools open it) whose `__metadata__` says what it holds:
//!
//! ```text
//! llmfs.kind = "safetensors"   the target file was a safetensors file:
//!     __header__    U8   the target's header bytes, verbatim (so the file reads back byte-identical)
//!     T.frames      U8   per target tensor T: the codec's chunks (codec::delta)
//!     T.offsets     U64  chunk boundaries in T.frames
//!     T.q / T.scale      (codec q8: int8 codes and f32 scales of target − base)
//!     T.signs / T.scale  (codec bitdelta: sign bits and f32 row scales)
//!   llmfs.based = JSON list of the tensors coded against the base tensor of the same name; any
//!   other tensor (no base twin, or another shape or dtype) is stored whole, losslessly.
//! llmfs.kind = "verbatim"      any other file (config, tokenizer, or a .safetensors that does not
//!     parse): its bytes as one losslessly coded tensor `file.frames` / `file.offsets`.
//! llmfs.size = the target file's size
//! ```
//!
//! `make` writes containers (for `llmfs delta make` and for files written into `deltas/`);
//! Reading deltas back is the views' side, below this module: `variant::delta` describes a delta
//! entry's files (and an imported entry's) and holds the container keys; `variant::source` the
//! sources that read tensors back (they wrap the base's sources, so they live with them).

pub mod import;
pub mod make;
pub mod stream;

pub use crate::registry::recipe::DeltaCodec;
