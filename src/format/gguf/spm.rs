//! A minimal reader of SentencePiece's `tokenizer.model` (a protobuf `ModelProto`): just the
//! pieces (text, score, type), which is all convert_hf_to_gguf.py takes from it.
//!
//! `ModelProto { repeated SentencePiece pieces = 1; ... }` and
//! `SentencePiece { string piece = 1; float score = 2; Type type = 3 [default = NORMAL]; }`
//! (sentencepiece_model.proto). Every other field is skipped by its wire type. Lengths are checked
//! against the input before anything is sliced, so hostile input is an error, never a panic.

/// SentencePiece's piece types (`SentencePiece.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<PieceType> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpmError {
    #[error("tokenizer.model: truncated protobuf at byte {0}")]
    Truncated(usize),
    #[error("tokenizer.model: varint too long at byte {0}")]
    BadVarint(usize),
    #[error("tokenizer.model: unsupported wire type {wire} at byte {at}")]
    BadWireType { wire: u64, at: usize },
    #[error("tokenizer.model: piece {0} is not UTF-8")]
    NotUtf8(usize),
    #[error("tokenizer.model: piece {index} has unknown type {value}")]
    BadPieceType { index: usize, value: u64 },
    #[error("tokenizer.model: no pieces")]
    Empty,
}

struct Pb<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Pb<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn varint(&mut self) -> Result<u64, SpmError> {
        let start = self.pos;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or(SpmError::Truncated(self.pos))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(SpmError::BadVarint(start))
    }
    fn bytes(&mut self, n: u64) -> Result<&'a [u8], SpmError> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(SpmError::Truncated(self.pos));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    /// The next field: (number, wire type, its payload as varint or bytes).
    fn field(&mut self) -> Result<(u64, Field<'a>), SpmError> {
        let at = self.pos;
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let f = match wire {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed(self.bytes(8)?),
            2 => {
                let n = self.varint()?;
                Field::Bytes(self.bytes(n)?)
            }
            5 => Field::Fixed(self.bytes(4)?),
            _ => return Err(SpmError::BadWireType { wire, at }),
        };
        Ok((num, f))
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed(&'a [u8]),
    Bytes(&'a [u8]),
}

/// The pieces of a `tokenizer.model`, in id order.
pub fn parse_model(buf: &[u8]) -> Result<Vec<Piece>, SpmError> {
    let mut pb = Pb { buf, pos: 0 };
    let mut pieces = Vec::new();
    while !pb.done() {
        if let (1, Field::Bytes(msg)) = pb.field()? {
            pieces.push(parse_piece(msg, pieces.len())?);
        }
    }
    if pieces.is_empty() {
        return Err(SpmError::Empty);
    }
    Ok(pieces)
}

fn parse_piece(msg: &[u8], index: usize) -> Result<Piece, SpmError> {
    let mut pb = Pb { buf: msg, pos: 0 };
    let mut piece = Piece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    while !pb.done() {
        match pb.field()? {
            (1, Field::Bytes(b)) => {
                piece.piece = std::str::from_utf8(b).map_err(|_| SpmError::NotUtf8(index))?.to_owned()
            }
            (2, Field::Fixed(b)) if b.len() == 4 => {
                piece.score = f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            (3, Field::Varint(v)) => {
                piece.kind = PieceType::from_proto(v).ok_or(SpmError::BadPieceType { index, value: v })?
            }
            _ => {}
        }
    }
    Ok(piece)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(text: &str, score: f32, kind: u8) -> Vec<u8> {
        let mut m = vec![0x0a, text.len() as u8];
        m.extend_from_slice(text.as_bytes());
        m.push(0x15);
        m.extend_from_slice(&score.to_le_bytes());
        m.extend_from_slice(&[0x18, kind]);
        let mut out = vec![0x0a, m.len() as u8];
        out.extend(m);
        out
    }

    #[test]
    fn reads_pieces_and_skips_other_fields() {
        let mut buf = piece("<unk>", 0.0, 2);
        buf.extend(piece("▁a", -1.5, 1));
        // trainer_spec (field 2, bytes) and an unknown varint field 99.
        buf.extend_from_slice(&[0x12, 0x02, 0x08, 0x01]);
        buf.extend_from_slice(&[0x98, 0x06, 0x05]);
        let p = parse_model(&buf).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0], Piece { piece: "<unk>".into(), score: 0.0, kind: PieceType::Unknown });
        assert_eq!(p[1], Piece { piece: "▁a".into(), score: -1.5, kind: PieceType::Normal });
    }

    #[test]
    fn hostile_input_is_an_error() {
        assert_eq!(parse_model(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]), Err(SpmError::Truncated(6)));
        assert!(matches!(parse_model(&[0x0b]), Err(SpmError::BadWireType { wire: 3, .. })));
        assert!(matches!(parse_model(&[0x08; 11]), Err(SpmError::Truncated(_) | SpmError::BadVarint(_))));
        assert_eq!(parse_model(&[]), Err(SpmError::Empty));
        let mut bad = piece("x", 0.0, 9);
        assert!(matches!(parse_model(&bad), Err(SpmError::BadPieceType { value: 9, .. })));
        bad.truncate(bad.len() - 1);
        assert!(parse_model(&bad).is_err());
    }
}
