//! Reading a delta-coded tensor back: decode the chunks a range touches and apply them to the
//! same range of the base.

use std::ops::Range;
use std::sync::Arc;

use crate::codec::delta as codec;
use crate::format::{Dtype, Header};
use crate::variant::{ReadError, SourceFile, TensorSource};

/// A losslessly coded tensor in a container, against a base tensor (or none: stored whole).
#[derive(Debug)]
pub struct LosslessSource {
    pub file: Arc<SourceFile>,
    pub frames_at: u64,
    /// Chunk boundaries within the frames, checked to be increasing and inside the container.
    pub offsets: Vec<u64>,
    pub base: Option<TensorSource>,
    pub dtype: Dtype,
    pub numel: usize,
}

impl LosslessSource {
    /// Locate `name`'s frames in a container and read its chunk table.
    pub fn open(file: &Arc<SourceFile>, header: &Header, name: &str, dtype: Dtype, numel: usize, base: Option<TensorSource>) -> Result<Self, String> {
        let frames = header.tensor(&format!("{name}.frames")).ok_or_else(|| format!("{name}.frames missing"))?;
        let offsets_t = header.tensor(&format!("{name}.offsets")).ok_or_else(|| format!("{name}.offsets missing"))?;
        let chunks = codec::chunk_count(numel);
        if offsets_t.len() != (chunks as u64 + 1) * 8 {
            return Err(format!("{name}: chunk table has {} entries, {numel} elements need {}", offsets_t.len() / 8, chunks + 1));
        }
        let mut raw = vec![0u8; offsets_t.len() as usize];
        file.read_exact_at(&mut raw, header.data_start + offsets_t.start).map_err(|e| e.to_string())?;
        let offsets: Vec<u64> = raw.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).collect();
        if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[0] > w[1]) || offsets.last() != Some(&frames.len()) {
            return Err(format!("{name}: chunk table is inconsistent with its frames"));
        }
        Ok(LosslessSource { file: file.clone(), frames_at: header.data_start + frames.start, offsets, base, dtype, numel })
    }

    pub fn read(&self, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        let esize = self.dtype.size();
        if elems.is_empty() {
            return Ok(());
        }
        let mut chunk = elems.start / codec::DELTA_CHUNK_ELEMS;
        while chunk < self.offsets.len() - 1 {
            let range = codec::chunk_elems(chunk, self.numel);
            if range.start >= elems.end {
                break;
            }
            let frame_range = self.offsets[chunk]..self.offsets[chunk + 1];
            let mut frame = vec![0u8; (frame_range.end - frame_range.start) as usize];
            self.file.read_exact_at(&mut frame, self.frames_at + frame_range.start)?;
            let base = match &self.base {
                Some(b) => {
                    let mut bytes = vec![0u8; range.len() * esize];
                    b.read(range.clone(), &mut bytes)?;
                    Some(bytes)
                }
                None => None,
            };
            let mut decoded = vec![0u8; range.len() * esize];
            codec::decode_lossless_chunk(&frame, base.as_deref(), esize, &mut decoded)
                .map_err(|e| ReadError::Decode(format!("{}: chunk {chunk}: {e}", self.file.path.display())))?;
            let (lo, hi) = (range.start.max(elems.start), range.end.min(elems.end));
            out[(lo - elems.start) * esize..(hi - elems.start) * esize]
                .copy_from_slice(&decoded[(lo - range.start) * esize..(hi - range.start) * esize]);
            chunk += 1;
        }
        Ok(())
    }
}
