//! Where tensor bytes come from: stored bytes in a file, or a recipe over another source (a cast,
//! a dequantization, a delta applied to its base, a LoRA merge). The recipes' sources wrap their
//! base's [`TensorSource`] and it names them, so they are defined together here.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use crate::cache::with_scratch;
use crate::codec::delta as codec;
use crate::codec::quant_file::QuantSource;
use crate::compute;
use crate::compute::merge::LoraFactors;
use crate::compute::mergekit::CompactStats;
use crate::format::{Dtype, Header, StoredType};
use crate::source::{ReadError, SourceFile};

/// How the bytes of one tensor are produced.
#[derive(Clone, Debug)]
pub enum TensorSource {
    /// Stored verbatim at `offset` in `file`.
    Stored { file: Arc<SourceFile>, offset: u64, dtype: Dtype },
    /// Another tensor converted to `to`.
    Cast { inner: Arc<TensorSource>, to: Dtype },
    /// Group-wise quantized codes and scales in a container, dequantized.
    Dequant(Arc<QuantSource>),
    /// A delta-coded tensor applied to its base (or stored whole).
    Delta(Arc<LosslessSource>),
    /// A lossy (q8 or bitdelta) delta applied to its base.
    LossyDelta(Arc<LossySource>),
    /// FastChat's apply_delta: `f16(base + delta)`, both f16.
    AddF16 { base: Arc<TensorSource>, delta: Arc<TensorSource> },
    /// A LoRA merge `W + s·B·A` of a 2-D weight with `cols` columns.
    Lora { base: Arc<TensorSource>, factors: Arc<LazyFactors>, cols: usize },
    /// Several tensors merged by one of mergekit's methods.
    Merged(Arc<MergedSource>),
    /// A tensor of a GGUF view: ggml blocks of another source's rows.
    Ggml(Arc<super::gguf::GgmlSource>),
}

impl TensorSource {
    pub fn dtype(&self) -> Dtype {
        match self {
            TensorSource::Stored { dtype, .. } => *dtype,
            TensorSource::Cast { to, .. } => *to,
            TensorSource::Dequant(q) => q.dtype,
            TensorSource::Delta(d) => d.dtype,
            TensorSource::LossyDelta(d) => d.dtype,
            TensorSource::AddF16 { .. } => Dtype::F16,
            TensorSource::Lora { base, .. } => base.dtype(),
            TensorSource::Merged(m) => m.out_dtype,
            // Blocks of bytes (see `stored_type`), except the plain float types.
            TensorSource::Ggml(g) => match g.ggml_type() {
                crate::codec::ggml::GgmlType::F32 => Dtype::F32,
                crate::codec::ggml::GgmlType::F16 => Dtype::F16,
                crate::codec::ggml::GgmlType::BF16 => Dtype::BF16,
                _ => Dtype::U8,
            },
        }
    }

    /// How its bytes are stored: its element type (every source so far produces elements; a
    /// source of ggml blocks produces whole blocks). A read's range counts these blocks.
    pub fn stored_type(&self) -> StoredType {
        match self {
            TensorSource::Ggml(g) => g.stored_type(),
            _ => StoredType::Element(self.dtype()),
        }
    }

    /// Bytes stored verbatim can be read straight into the reply, without decoding or caching.
    pub fn as_stored(&self) -> Option<(&SourceFile, u64)> {
        match self {
            TensorSource::Stored { file, offset, .. } => Some((file, *offset)),
            _ => None,
        }
    }

    /// The files this tensor reads from (checked when a file that contains it is opened).
    pub fn files(&self, out: &mut Vec<Arc<SourceFile>>) {
        match self {
            TensorSource::Stored { file, .. } => out.push(file.clone()),
            TensorSource::Cast { inner, .. } => inner.files(out),
            TensorSource::Dequant(q) => out.push(q.file.clone()),
            TensorSource::Delta(d) => {
                out.push(d.file.clone());
                if let Some(base) = &d.base {
                    base.files(out);
                }
            }
            TensorSource::LossyDelta(d) => {
                out.push(d.file.clone());
                d.base.files(out);
            }
            TensorSource::AddF16 { base, delta } => {
                base.files(out);
                delta.files(out);
            }
            TensorSource::Lora { base, .. } => base.files(out),
            TensorSource::Merged(m) => {
                m.inputs.iter().for_each(|s| s.files(out));
                out.extend(m.stats_file().cloned());
            }
            TensorSource::Ggml(g) => g.inner.iter().for_each(|s| s.files(out)),
        }
    }

    /// Compute now the whole-tensor quantities that a read of any range needs (a merge's
    /// cut-offs, norms and rescale factors), for this tensor and the tensors it reads. A fill
    /// calls it for every tensor of a file, in parallel, before it decodes the pieces: left to
    /// the pieces, every pool thread took a piece of the same tensor and waited for the one
    /// computing its cut-offs, so a TIES fill on 16 cores ran on about one core.
    pub fn prepare(&self) -> Result<(), ReadError> {
        if !self.needs_prepare() {
            return Ok(());
        }
        match self {
            TensorSource::Stored { .. } | TensorSource::Dequant(_) => Ok(()),
            TensorSource::Cast { inner, .. } => inner.prepare(),
            TensorSource::Delta(d) => d.base.as_ref().map_or(Ok(()), |b| b.prepare()),
            TensorSource::LossyDelta(d) => d.base.prepare(),
            TensorSource::AddF16 { base, delta } => base.prepare().and_then(|()| delta.prepare()),
            TensorSource::Lora { base, .. } => base.prepare(),
            TensorSource::Merged(m) => {
                m.inputs.par_iter().try_for_each(TensorSource::prepare)?;
                m.stats().map(drop)
            }
            TensorSource::Ggml(g) => g.inner.iter().try_for_each(|s| s.prepare()),
        }
    }

    /// Whether [`TensorSource::prepare`] has anything to compute: a merge that needs whole-tensor
    /// quantities, here or in a tensor this one reads.
    pub fn needs_prepare(&self) -> bool {
        match self {
            TensorSource::Stored { .. } | TensorSource::Dequant(_) => false,
            TensorSource::Cast { inner, .. } => inner.needs_prepare(),
            TensorSource::Delta(d) => d.base.as_ref().is_some_and(|b| b.needs_prepare()),
            TensorSource::LossyDelta(d) => d.base.needs_prepare(),
            TensorSource::AddF16 { base, delta } => base.needs_prepare() || delta.needs_prepare(),
            TensorSource::Lora { base, .. } => base.needs_prepare(),
            TensorSource::Merged(m) => {
                m.merge.needs_stats() || m.inputs.iter().any(TensorSource::needs_prepare)
            }
            TensorSource::Ggml(g) => g.inner.iter().any(|s| s.needs_prepare()),
        }
    }

    /// `f` over elements `elems` of this tensor as bytes: a stored tensor of a local file in
    /// place, out of the page cache through a mapping (no copy: on 2 cores the copy of `pread`
    /// was a quarter of a cast's fill), anything else produced into scratch memory first.
    pub fn with_elements<R>(
        &self,
        elems: Range<usize>,
        f: impl FnOnce(&[u8]) -> Result<R, ReadError>,
    ) -> Result<R, ReadError> {
        let n = elems.len() * self.stored_type().block_bytes();
        let f = match self {
            TensorSource::Stored { file, offset, dtype } => {
                match file.read_mapped(offset + (elems.start * dtype.size()) as u64, n, f) {
                    Ok(done) => return done?,
                    Err(f) => f,
                }
            }
            _ => f,
        };
        with_scratch(n, |buf| {
            self.read(elems, buf)?;
            f(buf)
        })
    }

    /// Produce blocks `elems` (row-major indices of elements, or of blocks for a block type)
    /// into `out` (`out.len() == elems.len() * stored_type().block_bytes()`).
    pub fn read(&self, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        match self {
            TensorSource::Stored { file, offset, dtype } => {
                file.read_exact_at(out, offset + (elems.start * dtype.size()) as u64)
            }
            TensorSource::Cast { inner, to } => {
                let from = inner.dtype();
                inner.with_elements(elems, |src| {
                    compute::backend::cast(from, *to, src, out).map_err(|e| ReadError::Decode(e.to_string()))
                })
            }
            TensorSource::Dequant(q) => q.read(elems, out),
            TensorSource::Delta(d) => d.read(elems, out),
            TensorSource::LossyDelta(d) => d.read(elems, out),
            // Both inputs in place where they are stored tensors (no `pread` copy, no fresh
            // zeroed buffer per piece).
            TensorSource::AddF16 { base, delta } => match &**base {
                // A base cast to f16 (FastChat loads it as fp16): its stored bytes, the cast fused
                // with the add.
                TensorSource::Cast { inner, to: Dtype::F16 } => {
                    let from = inner.dtype();
                    inner.with_elements(elems.clone(), |b| {
                        delta.with_elements(elems, |d| {
                            compute::backend::add_f16_of(from, b, d, out)
                                .map_err(|e| ReadError::Decode(e.to_string()))
                        })
                    })
                }
                _ => base.with_elements(elems.clone(), |b| {
                    delta.with_elements(elems, |d| {
                        compute::backend::add_f16(b, d, out);
                        Ok(())
                    })
                }),
            },
            TensorSource::Ggml(g) => g.read(elems, out),
            TensorSource::Merged(m) => m.read(elems, out),
            // The base copied into scratch memory first, not read in place as a cast's or an
            // f16 add's inputs are: the merge reads it a row segment at a time between long runs
            // of arithmetic, and in place it cost more CPU than the copy saved (`llmfs warm lora`
            // on 2 cores, 5 alternating runs: 0.73-0.88 user-s in place, 0.67-0.83 copied).
            TensorSource::Lora { base, factors, cols } => {
                let f = factors.get()?;
                with_scratch(out.len(), |w| {
                    base.read(elems.clone(), w)?;
                    compute::backend::lora_rows(&f, base.dtype(), *cols, elems, w, out)
                        .map_err(|e| ReadError::Decode(format!("LoRA merge: {e}")))
                })
            }
        }
    }
}

thread_local! {
    /// Per thread, for lossy deltas: the base's bytes, the codes and the scales of a read.
    static LOSSY_SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

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
    pub fn open(
        file: &Arc<SourceFile>,
        header: &Header,
        name: &str,
        dtype: Dtype,
        numel: usize,
        base: Option<TensorSource>,
    ) -> Result<Self, String> {
        let frames =
            header.tensor(&format!("{name}.frames")).ok_or_else(|| format!("{name}.frames missing"))?;
        let offsets_t =
            header.tensor(&format!("{name}.offsets")).ok_or_else(|| format!("{name}.offsets missing"))?;
        let chunks = codec::chunk_count(numel);
        if offsets_t.len() != (chunks as u64 + 1) * 8 {
            return Err(format!(
                "{name}: chunk table has {} entries, {numel} elements need {}",
                offsets_t.len() / 8,
                chunks + 1
            ));
        }
        let mut raw = vec![0u8; offsets_t.len() as usize];
        file.read_exact_at(&mut raw, header.data_start + offsets_t.start).map_err(|e| e.to_string())?;
        let offsets: Vec<u64> =
            raw.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).collect();
        // A frame is never larger than zstd's bound for a full chunk: a corrupt table cannot make
        // a read allocate more than that.
        let max_frame = zstd::zstd_safe::compress_bound(codec::DELTA_CHUNK_ELEMS * dtype.size()) as u64 + 64;
        if offsets.first() != Some(&0)
            || offsets.windows(2).any(|w| w[0] > w[1] || w[1] - w[0] > max_frame)
            || offsets.last() != Some(&frames.len())
        {
            return Err(format!("{name}: chunk table is inconsistent with its frames"));
        }
        Ok(LosslessSource {
            file: file.clone(),
            frames_at: header.data_start + frames.start,
            offsets,
            base,
            dtype,
            numel,
        })
    }

    pub fn read(&self, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
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
            let (lo, hi) = (range.start.max(elems.start), range.end.min(elems.end));
            self.read_chunk(chunk, range.clone(), frame_range, (lo, hi), elems.start, out)?;
            chunk += 1;
        }
        Ok(())
    }
}

impl LosslessSource {
    /// Decode chunk `chunk` (elements `range`, its frame at `frame_range`) and put its elements
    /// `lo..hi` into `out`, which holds elements from `out_start` on.
    #[allow(clippy::too_many_arguments)]
    /// Decode chunk `chunk` (elements `range`) and put its elements `lo..hi` into `out`, which
    /// starts at element `out_start`. The stored frame, the base's bytes and (for a chunk only
    /// partly read) the decoded chunk live in per-thread scratch (`with_scratch`: nothing is
    /// allocated per read, and a base that is itself a delta gets buffers of its own); a chunk
    /// wholly inside the read decodes straight into `out`.
    fn read_chunk(
        &self,
        chunk: usize,
        range: Range<usize>,
        frame_range: Range<u64>,
        (lo, hi): (usize, usize),
        out_start: usize,
        out: &mut [u8],
    ) -> Result<(), ReadError> {
        let esize = self.dtype.size();
        let blen = range.len() * esize;
        let out = &mut out[(lo - out_start) * esize..(hi - out_start) * esize];
        with_scratch((frame_range.end - frame_range.start) as usize, |frame| {
            self.file.read_exact_at(frame, self.frames_at + frame_range.start)?;
            let mut with_base = |base: Option<&[u8]>| {
                let decode = |dst: &mut [u8]| {
                    codec::decode_lossless_chunk(frame, base, esize, dst).map_err(|e| {
                        ReadError::Decode(format!("{}: chunk {chunk}: {e}", self.file.path.display()))
                    })
                };
                if lo == range.start && hi == range.end {
                    return decode(out);
                }
                with_scratch(blen, |decoded| {
                    decode(decoded)?;
                    out.copy_from_slice(&decoded[(lo - range.start) * esize..(hi - range.start) * esize]);
                    Ok(())
                })
            };
            match &self.base {
                Some(b) => b.with_elements(range.clone(), |base| with_base(Some(base))),
                None => with_base(None),
            }
        })
    }
}

/// How a lossy delta is coded (see codec::delta).
#[derive(Clone, Copy, Debug)]
pub enum LossyCodec {
    /// One i8 code per element, one f32 scale per group of DELTA_Q8_GROUP elements.
    Q8,
    /// One sign bit per element, one f32 scale per row of `cols` elements.
    Bitdelta { cols: usize },
}

/// A lossy delta (q8 or bitdelta) in a container, applied to its base tensor.
#[derive(Debug)]
pub struct LossySource {
    pub file: Arc<SourceFile>,
    pub codes_at: u64,
    pub scales_at: u64,
    pub base: TensorSource,
    pub dtype: Dtype,
    pub codec: LossyCodec,
}

impl LossySource {
    /// Locate `name`'s codes and scales (whichever lossy codec stored it), checking their sizes
    /// against the tensor's shape. `Ok(None)`: not lossy-coded.
    pub fn open(
        file: &Arc<SourceFile>,
        header: &Header,
        name: &str,
        shape: &[usize],
        dtype: Dtype,
        base: TensorSource,
    ) -> Result<Option<Self>, String> {
        let numel: usize = shape.iter().product();
        let scale = header.tensor(&format!("{name}.scale"));
        let lossy = header.tensor(&format!("{name}.q")).is_some()
            || header.tensor(&format!("{name}.signs")).is_some();
        // Validated here, not met by the decoder: it computes in F16, BF16 or F32, over a base
        // of the same type.
        if lossy && (!dtype.is_float() || base.dtype() != dtype) {
            return Err(format!(
                "{name}: a lossy delta of a {dtype} tensor over a {} base; lossy codecs take F16, BF16 \
                 or F32 over a base of the same type",
                base.dtype()
            ));
        }
        let (codes, codec, want_codes, want_scales) = if let Some(q) = header.tensor(&format!("{name}.q")) {
            (q, LossyCodec::Q8, numel as u64, codec::q8_groups(&(0..numel)).len() as u64)
        } else if let Some(s) = header.tensor(&format!("{name}.signs")) {
            let [rows, cols] = shape[..] else {
                return Err(format!("{name}: bitdelta of a tensor that is not 2-D"));
            };
            (s, LossyCodec::Bitdelta { cols }, numel.div_ceil(8) as u64, rows as u64)
        } else {
            return Ok(None);
        };
        let scale = scale.ok_or_else(|| format!("{name}.scale missing"))?;
        if codes.len() != want_codes || scale.len() != want_scales * 4 || scale.dtype != Dtype::F32 {
            return Err(format!("{name}: stored codes or scales do not match shape {shape:?}"));
        }
        Ok(Some(LossySource {
            file: file.clone(),
            codes_at: header.data_start + codes.start,
            scales_at: header.data_start + scale.start,
            base,
            dtype,
            codec,
        }))
    }

    pub fn read(&self, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        if elems.is_empty() {
            return Ok(());
        }
        // Per-thread buffers, taken out while in use (a base that is itself a delta gets its own)
        // and put back after. Not `with_scratch`, whose byte buffers carry no f32 alignment for
        // the scales.
        let mut bufs = LOSSY_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let result = self.read_with(elems, out, &mut bufs);
        LOSSY_SCRATCH.with(|s| *s.borrow_mut() = bufs);
        result
    }

    fn read_with(
        &self,
        elems: Range<usize>,
        out: &mut [u8],
        (base, code_bytes, scales): &mut (Vec<u8>, Vec<u8>, Vec<f32>),
    ) -> Result<(), ReadError> {
        base.resize(out.len(), 0);
        self.base.read(elems.clone(), base)?;
        let (codes, scale_range) = match self.codec {
            LossyCodec::Q8 => (elems.clone(), codec::q8_groups(&elems)),
            LossyCodec::Bitdelta { cols } => {
                (codec::bitdelta_sign_bytes(&elems), codec::bitdelta_rows(cols, &elems))
            }
        };
        code_bytes.resize(codes.len(), 0);
        self.file.read_exact_at(code_bytes, self.codes_at + codes.start as u64)?;
        scales.resize(scale_range.len(), 0.0);
        let scale_bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut scales[..]);
        self.file.read_exact_at(scale_bytes, self.scales_at + scale_range.start as u64 * 4)?;
        for s in scales.iter_mut() {
            *s = f32::from_bits(u32::from_le(s.to_bits()));
        }
        match self.codec {
            LossyCodec::Q8 => codec::decode_q8_range(
                bytemuck::cast_slice(&code_bytes[..]),
                scales,
                base,
                self.dtype,
                elems,
                out,
            ),
            LossyCodec::Bitdelta { cols } => {
                codec::decode_bitdelta_range(code_bytes, scales, base, self.dtype, cols, elems, out)
            }
        }
        Ok(())
    }
}

/// LoRA factors read (and widened to f32) on first use, then kept: every chunk of the merged
/// weight needs all of A and its rows of B.
#[derive(Debug)]
pub struct LazyFactors {
    pub(crate) a: TensorSource,
    pub(crate) b: TensorSource,
    /// Elements of A (r × in) and B (out × r).
    pub(crate) a_len: usize,
    pub(crate) b_len: usize,
    pub(crate) rank: usize,
    pub(crate) scale: f32,
    pub(crate) transposed: bool,
    /// Loaded at the first read that needs them; a failed load is not kept (the next read
    /// tries again: the store may be back).
    pub(crate) loaded: std::sync::Mutex<Option<Arc<LoraFactors>>>,
}

impl LazyFactors {
    pub fn get(&self) -> Result<Arc<LoraFactors>, ReadError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(factors) = &*loaded {
            return Ok(factors.clone());
        }
        let load = || {
            let widen = |s: &TensorSource, n: usize| -> Result<Vec<f32>, String> {
                if !s.dtype().is_float() {
                    return Err(format!("a LoRA factor is {}, not a float tensor", s.dtype()));
                }
                let mut bytes = vec![0u8; n * s.dtype().size()];
                s.read(0..n, &mut bytes).map_err(|e| e.to_string())?;
                Ok((0..n).map(|i| compute::merge::load(s.dtype(), &bytes, i)).collect())
            };
            Ok(Arc::new(LoraFactors {
                a: widen(&self.a, self.a_len)?,
                b: widen(&self.b, self.b_len)?,
                rank: self.rank,
                scale: self.scale,
                transposed: self.transposed,
            }))
        };
        let factors = load().map_err(ReadError::Decode)?;
        *loaded = Some(factors.clone());
        Ok(factors)
    }
}

/// A merged tensor: its inputs (in mergekit's order), the numbers of its merge, and its
/// whole-tensor statistics (TIES's magnitude cut-offs, SLERP's angle …): read from the entry's
/// stored statistics file where it has one (`llmfs merge` computed them), else computed at the
/// first read that needs them (entries made before the file existed). Either way they are kept
/// once known (a failed load or computation is not: the next read tries again).
#[derive(Debug)]
pub struct MergedSource {
    pub inputs: Vec<TensorSource>,
    pub merge: crate::merge::TensorMerge,
    pub out_dtype: Dtype,
    /// The entry's stored statistics and this tensor's name in them.
    stored: Option<(Arc<StoredStats>, String)>,
    stats: std::sync::Mutex<Option<Arc<CompactStats>>>,
}

/// How many times this process computed a merged tensor's statistics on a read (not at
/// `llmfs merge`): the daemon logs each, and tests count them.
pub static STATS_COMPUTED_ON_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl MergedSource {
    /// `stored`: the entry's statistics file and this tensor's name in it (None: an entry made
    /// before merges stored them; computed at first read).
    pub fn new(
        inputs: Vec<TensorSource>,
        merge: crate::merge::TensorMerge,
        out_dtype: Dtype,
        stored: Option<(Arc<StoredStats>, String)>,
    ) -> Self {
        MergedSource { inputs, merge, out_dtype, stored, stats: Default::default() }
    }

    /// The stored statistics file this tensor reads, if any (checked when a file that contains
    /// the tensor is opened, like its inputs' files).
    pub fn stats_file(&self) -> Option<&Arc<SourceFile>> {
        self.stored.as_ref().map(|(s, _)| &s.file)
    }

    /// Every input whole, as values of the merge's dtype (mergekit casts each input to it on
    /// load), decoded in parallel pieces into recycled buffers (`compute::mergekit::VALUES`:
    /// every element is written).
    fn whole_inputs(&self) -> Result<Vec<Vec<f32>>, ReadError> {
        const PIECE: usize = 1 << 20;
        let numel = self.merge.numel();
        self.inputs
            .par_iter()
            .map(|s| {
                let mut values = compute::mergekit::VALUES.take(numel);
                if !s.dtype().is_float() {
                    // `load_into` writes nothing for these: zeros, as a fresh buffer held.
                    values.fill(0.0);
                }
                values.par_chunks_mut(PIECE).enumerate().try_for_each(|(i, dst)| {
                    let start = i * PIECE;
                    with_scratch(dst.len() * s.dtype().size(), |raw| {
                        s.read(start..start + dst.len(), raw)?;
                        compute::mergekit::load_into(s.dtype(), self.merge.dtype, raw, dst);
                        Ok::<(), ReadError>(())
                    })
                })?;
                Ok(values)
            })
            .collect()
    }

    /// The whole-tensor statistics from the inputs' whole tensors, in the compact form (kept
    /// ties as index intervals, `compute::mergekit::tie_runs`): what `llmfs merge` stores, and
    /// what a read of an entry without stored statistics computes (one function for both, so
    /// the stored numbers are the ones a read would compute).
    pub fn compute_stats(&self) -> Result<CompactStats, ReadError> {
        if !self.merge.needs_stats() {
            return Ok(CompactStats { stats: crate::merge::Stats::None, runs: vec![] });
        }
        let whole = self.whole_inputs()?;
        let refs: Vec<&[f32]> = whole.iter().map(Vec::as_slice).collect();
        let stats = self.merge.stats(&refs).map_err(|e| ReadError::Decode(format!("merge: {e}")))?;
        let compact = CompactStats::compact(&self.merge, &stats, &refs);
        whole.into_iter().for_each(|v| compute::mergekit::VALUES.give(v));
        Ok(compact)
    }

    /// The whole-tensor statistics: stored, or computed at the first call. No lock is held
    /// while they are loaded or computed: the computation runs on the rayon pool, whose threads,
    /// while they wait for a part of it, run other queued work, which may be a read of this same
    /// tensor; waiting there for the result would wait for itself. Two first calls at once (two
    /// readers of a tensor through the daemon) may each compute it; a fill computes each once
    /// ([`TensorSource::prepare`]).
    fn stats(&self) -> Result<Arc<CompactStats>, ReadError> {
        if !self.merge.needs_stats() {
            return Ok(Arc::new(CompactStats { stats: crate::merge::Stats::None, runs: vec![] }));
        }
        if let Some(s) = &*self.stats.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(s.clone());
        }
        let stats = match &self.stored {
            Some((file, name)) => file.get(name, &self.merge)?,
            None => {
                STATS_COMPUTED_ON_READ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    "merge: computing the whole-tensor statistics of a {} tensor on read \
                     (its entry stores none: merged before llmfs stored them)",
                    self.merge.shape.iter().map(usize::to_string).collect::<Vec<_>>().join("x")
                );
                Arc::new(self.compute_stats()?)
            }
        };
        Ok(self.stats.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(stats).clone())
    }

    /// Elements `elems` of the merged tensor into `out` (`out_dtype`). The inputs' bytes, their
    /// values and the merged values live in this thread's scratch (`with_scratch`): a chunk
    /// costs no allocation but the list of input slices.
    pub fn read(&self, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        if elems.is_empty() {
            return Ok(());
        }
        let stats = self.stats()?;
        // Blocks of whole units of the method (a row for DELLA's ranks) small enough that the
        // inputs' bytes, their values and the merged values stay in the core's L2 between the
        // passes over them (a 2 MiB piece at once went to memory for each pass).
        let g = self.merge.granularity().max(1);
        let block = (READ_BLOCK / g).max(1) * g;
        let size = self.out_dtype.size();
        let mut at = elems.start;
        while at < elems.end {
            let end = ((at / block + 1) * block).min(elems.end);
            let bytes = (at - elems.start) * size..(end - elems.start) * size;
            self.read_block(&stats, at..end, &mut out[bytes])?;
            at = end;
        }
        Ok(())
    }

    fn read_block(&self, stats: &CompactStats, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        // Linear of bf16 inputs to bf16: straight from the inputs' bytes (no f32 copies).
        if self.inputs.iter().all(|s| s.dtype() == Dtype::BF16)
            && self.merge.linear_bf16_applies(self.out_dtype)
        {
            let n = elems.len();
            return with_scratch(self.inputs.len() * n * 2, |raw| {
                for (s, dst) in self.inputs.iter().zip(raw.chunks_exact_mut(2 * n)) {
                    s.read(elems.clone(), dst)?;
                }
                let refs: Vec<&[u8]> = raw.chunks_exact(2 * n).collect();
                self.merge.apply_linear_bf16(&refs, out);
                Ok(())
            });
        }
        let g = self.merge.granularity().max(1);
        let start = elems.start / g * g;
        let end = elems.end.div_ceil(g).saturating_mul(g).min(self.merge.numel());
        let n = end - start;
        let k = self.inputs.len();
        // f32s for the k inputs and the merge, plus slack to align them (scratch is bytes).
        let floats = (k + 1) * n;
        with_scratch(floats * 4 + 3, |scratch| {
            let (_, values, _) = bytemuck::pod_align_to_mut::<u8, f32>(scratch);
            let (inputs, merged) = values[..floats].split_at_mut(k * n);
            for (s, dst) in self.inputs.iter().zip(inputs.chunks_exact_mut(n.max(1))) {
                with_scratch(n * s.dtype().size(), |raw| {
                    s.read(start..end, raw)?;
                    compute::mergekit::load_into(s.dtype(), self.merge.dtype, raw, dst);
                    Ok::<(), ReadError>(())
                })?;
            }
            let refs: Vec<&[f32]> = inputs.chunks_exact(n.max(1)).collect();
            // The kept ties of this range, from the stored intervals and the inputs' values.
            let local;
            let stats = if stats.runs.iter().all(Vec::is_empty) {
                &stats.stats
            } else {
                local = stats.resolve(&self.merge, &refs, start);
                &local
            };
            self.merge
                .apply(stats, &refs, start, merged)
                .map_err(|e| ReadError::Decode(format!("merge: {e}")))?;
            compute::mergekit::encode_into(
                self.out_dtype,
                &merged[elems.start - start..elems.end - start],
                out,
            );
            Ok(())
        })
    }
}

/// Elements per block of [`MergedSource::read`] (see there).
const READ_BLOCK: usize = 16 << 10;

/// A merge entry's stored statistics file (`merge::stats_file`), parsed at the first read that
/// needs it and kept (the file is small: one parse serves every tensor of the entry). A file
/// that cannot be read or parsed fails that read with EIO and a log line, and the next read
/// tries again.
#[derive(Debug)]
pub struct StoredStats {
    pub file: Arc<SourceFile>,
    parsed: std::sync::Mutex<Option<Arc<StatsByTensor>>>,
}

/// A parsed statistics file: each tensor's statistics, shared with the tensor's source.
type StatsByTensor = BTreeMap<String, Arc<CompactStats>>;

impl StoredStats {
    pub fn new(file: Arc<SourceFile>) -> Self {
        StoredStats { file, parsed: Default::default() }
    }

    /// Tensor `name`'s statistics, checked to fit its merge.
    pub fn get(&self, name: &str, merge: &crate::merge::TensorMerge) -> Result<Arc<CompactStats>, ReadError> {
        let table = self.table()?;
        let bad =
            |reason: String| ReadError::Decode(format!("{}: {name}: {reason}", self.file.path.display()));
        let stats = table.get(name).ok_or_else(|| bad("no statistics stored for this tensor".into()))?;
        crate::merge::stats_file::check_fits(stats, merge).map_err(bad)?;
        Ok(stats.clone())
    }

    fn table(&self) -> Result<Arc<StatsByTensor>, ReadError> {
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &*parsed {
            return Ok(t.clone());
        }
        // The fingerprint check: a file changed since the merge fails here, as any stored file.
        self.file.check()?;
        let bytes = self.file.read_all()?;
        let table = crate::merge::stats_file::decode(&bytes)
            .map_err(|e| ReadError::Decode(format!("{}: {e}", self.file.path.display())))?;
        let table: Arc<StatsByTensor> = Arc::new(table.into_iter().map(|(k, v)| (k, Arc::new(v))).collect());
        *parsed = Some(table.clone());
        Ok(table)
    }
}
