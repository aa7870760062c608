//! Compression of pseudo-gradients for the wire: none (fp32), block-wise int8, top-k
//! with int8 values, and top-k with 2-bit values (as SparseLoCo sends). Lossy codecs keep
//! an error-feedback residual, so what one round leaves out is added back the next round
//! instead of being lost.
//!
//! Payload layout (little-endian), validated field by field by [`decode`]:
//! - tag `0` fp32: `u32 n`, then `n` f32.
//! - tag `1` int8: `u32 n`, `u32 block`, `ceil(n / block)` f32 scales, `n` i8.
//! - tag `2` top-k: `u32 n`, `u32 k`, `u32 block`, `ceil(k / block)` f32 scales, `k` i8
//!   values, then `k` indices as LEB128 gaps (the first from 0, each later one from the
//!   previous index plus one), strictly increasing and below `n`.
//! - tag `3` top-k 2-bit: `u32 n`, `u32 k`, `u32 block`, `ceil(k / block)` f32 scales,
//!   `ceil(k / 4)` bytes of 2-bit codes (four per byte, the first in the lowest bits;
//!   unused bits 0), then the `k` indices as for tag 2. Code `q` is the value
//!   `(q - 1.5) x scale`: the levels -1.5, -0.5, 0.5 and 1.5 scales, the scale being the
//!   block's largest magnitude / 1.5.
//!
//! Every scale (tags 1 to 3) must be finite and not negative (`-0.0` counts as 0): a NaN,
//! infinite or negative scale is [`CodecError::NonFinite`] (`non_finite`), as is any
//! decoded value that is not finite.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::bytes::Cursor;

/// How a task compresses the updates its peers exchange.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Compression {
    /// Raw fp32: 4 bytes per parameter.
    None,
    /// Block-wise int8: one f32 scale per `block` values (max-abs / 127).
    Int8 {
        /// Values per scale; 256 keeps the overhead under 2%.
        block: usize,
    },
    /// The `fraction` of coordinates with the largest magnitude (after error feedback),
    /// chosen within equal chunks of at most 1,024 coordinates, in proportion to length,
    /// their values in block-wise int8.
    TopK {
        /// Share of coordinates sent, in `(0, 1]`.
        fraction: f32,
    },
    /// Chosen as [`TopK`](Self::TopK) does, their values in 2 bits (four levels per
    /// block scale): a quarter of the bytes per value, the error fed back.
    #[serde(rename = "top_k_2bit")]
    TopK2Bit {
        /// Share of coordinates sent, in `(0, 1]`.
        fraction: f32,
    },
}

/// Smallest and largest int8 block a payload may declare.
pub const BLOCK_RANGE: std::ops::RangeInclusive<usize> = 8..=65_536;

impl Compression {
    /// The first byte of this codec's payloads.
    pub fn tag(&self) -> u8 {
        match self {
            Self::None => 0,
            Self::Int8 { .. } => 1,
            Self::TopK { .. } => 2,
            Self::TopK2Bit { .. } => 3,
        }
    }

    /// About how many bytes one update of `params` parameters takes (for telling
    /// contributors what a round costs; top-k counts about 2.5 bytes per kept value, its
    /// 2-bit form about 1.5).
    pub fn approx_bytes(&self, params: usize) -> usize {
        let p = params as f64;
        let b = match *self {
            Self::None => 4.0 * p,
            Self::Int8 { block } => p * (1.0 + 4.0 / block.max(1) as f64),
            Self::TopK { fraction } => p * f64::from(fraction) * 2.5,
            Self::TopK2Bit { fraction } => p * f64::from(fraction) * 1.5,
        };
        b.ceil() as usize + 16
    }

    /// Checks the parameters, naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Self::None => Ok(()),
            Self::Int8 { block } if BLOCK_RANGE.contains(&block) => Ok(()),
            Self::Int8 { block } => Err(format!(
                "int8 block {block} outside {}..={}",
                BLOCK_RANGE.start(),
                BLOCK_RANGE.end()
            )),
            Self::TopK { fraction } | Self::TopK2Bit { fraction }
                if fraction > 0.0 && fraction <= 1.0 =>
            {
                Ok(())
            }
            Self::TopK { fraction } | Self::TopK2Bit { fraction } => {
                Err(format!("top-k fraction {fraction} outside (0, 1]"))
            }
        }
    }
}

/// Why a payload was refused.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum CodecError {
    /// The first byte names no codec.
    #[error("unknown codec tag {0}")]
    UnknownCodec(u8),
    /// The payload is for a model of another size.
    #[error("payload has {got} values, the model has {want}")]
    WrongLength {
        /// Declared count.
        got: usize,
        /// The receiver's model size.
        want: usize,
    },
    /// Shorter or longer than its header says.
    #[error("payload is {0}")]
    Malformed(&'static str),
    /// A scale or a value is NaN or infinite.
    #[error("payload holds a non-finite value")]
    NonFinite,
}

/// Encodes `values` once, with no residual kept: for whole weights or a change whose
/// decoded values the sender does not need (a keyframe, a model answer, a mix offer).
pub fn encode_once(kind: Compression, values: &[f32]) -> Vec<u8> {
    match kind {
        Compression::None => encode_fp32(values),
        Compression::Int8 { block } => encode_int8(values, block),
        Compression::TopK { fraction } => encode_topk(values, fraction, false),
        Compression::TopK2Bit { fraction } => encode_topk(values, fraction, true),
    }
}

/// A codec with its error-feedback residual: one per peer, kept across rounds.
#[derive(Clone, Debug)]
pub struct Compressor {
    kind: Compression,
    residual: Vec<f32>,
}

impl Compressor {
    /// A compressor for vectors of `len` values.
    pub fn new(kind: Compression, len: usize) -> Self {
        let residual = match kind {
            Compression::None => Vec::new(),
            _ => vec![0.0; len],
        };
        Self { kind, residual }
    }

    /// The codec.
    pub fn kind(&self) -> Compression {
        self.kind
    }

    /// Encodes `delta` (plus the residual of earlier rounds) and returns the payload and
    /// exactly what a receiver will decode from it; the residual keeps the difference.
    pub fn encode(&mut self, delta: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let input: Vec<f32> = if self.residual.len() == delta.len() {
            delta
                .iter()
                .zip(&self.residual)
                .map(|(d, r)| d + r)
                .collect()
        } else {
            delta.to_vec()
        };
        let bytes = encode_once(self.kind, &input);
        // A non-finite input can fail to decode (its scales or values are not finite);
        // it then counts as sending nothing. Callers check their input first.
        let decoded = decode(&bytes, input.len()).unwrap_or_else(|_| vec![0.0; input.len()]);
        if self.residual.len() == input.len() {
            for ((r, x), d) in self.residual.iter_mut().zip(&input).zip(&decoded) {
                *r = x - d;
            }
        }
        (bytes, decoded)
    }
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

fn encode_fp32(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + 4 * x.len());
    out.push(0);
    put_u32(&mut out, x.len());
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Appends block scales, then the int8 values of `x`.
fn put_int8(out: &mut Vec<u8>, x: &[f32], block: usize) {
    let scales: Vec<f32> = x
        .chunks(block)
        .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0)
        .collect();
    for s in &scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for (b, &s) in x.chunks(block).zip(&scales) {
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        out.extend(
            b.iter()
                .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
}

fn encode_int8(x: &[f32], block: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + x.len() + 4 * x.len().div_ceil(block));
    out.push(1);
    put_u32(&mut out, x.len());
    put_u32(&mut out, block);
    put_int8(&mut out, x, block);
    out
}

/// The block the top-k codec uses for its values.
const TOPK_BLOCK: usize = 256;

/// Top-k selects within chunks of this many coordinates.
const TOPK_CHUNK: usize = 1024;

/// Appends block scales (largest magnitude / 1.5), then the 2-bit codes of `x`, four per
/// byte.
fn put_2bit(out: &mut Vec<u8>, x: &[f32], block: usize) {
    let scales: Vec<f32> = x
        .chunks(block)
        .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 1.5)
        .collect();
    for s in &scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    // The nearest level, chosen by comparison so that a value keeps its sign however
    // small it is next to the scale (rounding `v / s + 1.5` would not).
    let codes: Vec<u8> = x
        .chunks(block)
        .zip(&scales)
        .flat_map(|(b, &s)| {
            b.iter().map(move |&v| match v {
                v if v <= -s && s > 0.0 => 0,
                v if v < 0.0 => 1,
                v if v >= s && s > 0.0 => 3,
                _ => 2,
            })
        })
        .collect();
    out.extend(
        codes
            .chunks(4)
            .map(|c| c.iter().rev().fold(0u8, |byte, &q| byte << 2 | q)),
    );
}

fn encode_topk(x: &[f32], fraction: f32, two_bit: bool) -> Vec<u8> {
    let n = x.len();
    let k = ((n as f64 * f64::from(fraction)).ceil() as usize).clamp(1.min(n), n);
    // The largest values of each chunk of the vector, `k` spread over the chunks in
    // proportion to their length: a global selection starves whole layers whose values
    // are small (biases, the last layer) until their residual grows huge.
    let chunks = n.div_ceil(TOPK_CHUNK).max(1);
    let mut idx: Vec<u32> = Vec::with_capacity(k);
    let mut order: Vec<u32> = Vec::with_capacity(TOPK_CHUNK);
    for c in 0..chunks {
        let (lo, hi) = (c * n / chunks, (c + 1) * n / chunks);
        let take = (c + 1) * k / chunks - c * k / chunks;
        order.clear();
        order.extend(lo as u32..hi as u32);
        if take < order.len() {
            order.select_nth_unstable_by(take, |&a, &b| {
                x[b as usize].abs().total_cmp(&x[a as usize].abs())
            });
            order.truncate(take);
        }
        order.sort_unstable();
        idx.extend_from_slice(&order);
    }
    let values: Vec<f32> = idx.iter().map(|&i| x[i as usize]).collect();
    let mut out = Vec::with_capacity(13 + 3 * k);
    out.push(if two_bit { 3 } else { 2 });
    put_u32(&mut out, n);
    put_u32(&mut out, k);
    put_u32(&mut out, TOPK_BLOCK);
    if two_bit {
        put_2bit(&mut out, &values, TOPK_BLOCK);
    } else {
        put_int8(&mut out, &values, TOPK_BLOCK);
    }
    let mut next = 0u32;
    for &i in &idx {
        let mut gap = i - next;
        loop {
            let byte = (gap & 0x7f) as u8;
            gap >>= 7;
            if gap == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        next = i + 1;
    }
    out
}

type Reader<'a> = Cursor<'a, CodecError>;

/// An int8 block size, checked against [`BLOCK_RANGE`].
fn block(r: &mut Reader<'_>) -> Result<usize, CodecError> {
    let block = r.u32()? as usize;
    if BLOCK_RANGE.contains(&block) {
        Ok(block)
    } else {
        Err(CodecError::Malformed("declaring an impossible block size"))
    }
}

/// `count` int8 values with their block scales.
fn int8(r: &mut Reader<'_>, count: usize, block: usize) -> Result<Vec<f32>, CodecError> {
    let scales = scales(r, count, block)?;
    let q = r.take(count)?;
    Ok(q.chunks(block)
        .zip(&scales)
        .flat_map(|(b, &s)| b.iter().map(move |&v| f32::from(v as i8) * s))
        .collect())
}

/// Block scales for `count` values, each finite and not negative.
fn scales(r: &mut Reader<'_>, count: usize, block: usize) -> Result<Vec<f32>, CodecError> {
    let scales = r.f32s(count.div_ceil(block))?;
    if scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
        return Err(CodecError::NonFinite);
    }
    Ok(scales)
}

/// `count` 2-bit values with their block scales; the unused bits of the last byte must
/// be 0.
fn two_bit(r: &mut Reader<'_>, count: usize, block: usize) -> Result<Vec<f32>, CodecError> {
    let scales = scales(r, count, block)?;
    let packed = r.take(count.div_ceil(4))?;
    if !count.is_multiple_of(4) && packed.last().is_some_and(|b| b >> (2 * (count % 4)) != 0) {
        return Err(CodecError::Malformed("holding bits past its last value"));
    }
    Ok((0..count)
        .map(|i| {
            let q = (packed[i / 4] >> (2 * (i % 4))) & 3;
            (f32::from(q) - 1.5) * scales[i / block]
        })
        .collect())
}

/// Decodes a payload for a model of `len` parameters, validating every field; the result
/// has exactly `len` finite values.
pub fn decode(bytes: &[u8], len: usize) -> Result<Vec<f32>, CodecError> {
    let mut r = Reader::new(bytes, CodecError::Malformed("truncated"));
    let tag = r.take(1)?[0];
    if tag > 3 {
        return Err(CodecError::UnknownCodec(tag));
    }
    let n = r.u32()? as usize;
    if n != len {
        return Err(CodecError::WrongLength { got: n, want: len });
    }
    let out = match tag {
        0 => r.f32s(n)?,
        1 => {
            let block = block(&mut r)?;
            int8(&mut r, n, block)?
        }
        _ => {
            let k = r.u32()? as usize;
            if k > n {
                return Err(CodecError::Malformed("selecting more values than exist"));
            }
            let block = block(&mut r)?;
            let values = if tag == 3 {
                two_bit(&mut r, k, block)?
            } else {
                int8(&mut r, k, block)?
            };
            let mut out = vec![0.0; n];
            let mut next: u64 = 0;
            for v in values {
                let mut gap: u64 = 0;
                for shift in (0..35).step_by(7) {
                    let byte = r.take(1)?[0];
                    gap |= u64::from(byte & 0x7f) << shift;
                    if byte & 0x80 == 0 {
                        break;
                    }
                    if shift == 28 {
                        return Err(CodecError::Malformed("holding an overlong index"));
                    }
                }
                let i = next + gap;
                if i >= n as u64 {
                    return Err(CodecError::Malformed("indexing past the model"));
                }
                out[i as usize] = v;
                next = i + 1;
            }
            out
        }
    };
    if !r.is_empty() {
        return Err(CodecError::Malformed("longer than its header says"));
    }
    // Checked once for every codec: fp32 values, and the infinite values finite scales
    // can still make (a level times a scale near the largest float, or an int8 -128 no
    // encoder writes).
    if out.iter().any(|x| !x.is_finite()) {
        return Err(CodecError::NonFinite);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n).map(|_| r.normal_f32() * 0.01).collect()
    }

    #[test]
    fn fp32_round_trips_exactly() {
        let x = noise(1000, 1);
        let (bytes, dec) = Compressor::new(Compression::None, x.len()).encode(&x);
        assert_eq!(dec, x);
        assert_eq!(decode(&bytes, 1000), Ok(x));
        assert_eq!(bytes.len(), 5 + 4000);
    }

    #[test]
    fn int8_is_close_and_nearly_four_times_smaller() {
        let x = noise(100_000, 2);
        let mut c = Compressor::new(Compression::Int8 { block: 256 }, x.len());
        let (bytes, dec) = c.encode(&x);
        let ratio = (4 * x.len()) as f64 / bytes.len() as f64;
        assert!(ratio >= 3.9, "ratio {ratio}");
        for (chunk, dchunk) in x.chunks(256).zip(dec.chunks(256)) {
            let max = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in chunk.iter().zip(dchunk) {
                assert!((a - b).abs() <= max / 254.0 + 1e-9, "{a} vs {b}");
            }
        }
        assert_eq!(decode(&bytes, x.len()).as_deref(), Ok(&dec[..]));
    }

    #[test]
    fn topk_keeps_the_largest_and_feeds_the_rest_back() {
        let mut x = noise(10_000, 3);
        x[17] = 5.0;
        x[9_999] = -4.0;
        let mut c = Compressor::new(Compression::TopK { fraction: 0.01 }, x.len());
        let (bytes, dec) = c.encode(&x);
        assert!(bytes.len() * 50 <= 4 * x.len(), "{} bytes", bytes.len());
        assert_eq!(dec.iter().filter(|v| **v != 0.0).count(), 100);
        assert!((dec[17] - 5.0).abs() < 0.03 && (dec[9_999] + 4.0).abs() < 0.03);
        // A stretch of tiny values (a layer of biases, say) still gets its share: the
        // vector is cut into equal chunks of at most 1,024 (here ten of 1,000), and each
        // sends 1% of its own coordinates. A global pick would send none of these.
        let mut y = noise(10_000, 4);
        y[2_000..3_000].iter_mut().for_each(|v| *v *= 0.1);
        let (_, spread) = Compressor::new(Compression::TopK { fraction: 0.01 }, y.len()).encode(&y);
        let quiet = spread[2_000..3_000].iter().filter(|v| **v != 0.0).count();
        assert_eq!(quiet, 10, "of the quiet chunk sent");
        // Error feedback: what was left out this time is sent later, so the sum of what
        // goes out converges to the sum of what came in.
        let zeros = vec![0.0; x.len()];
        let mut sent = dec.clone();
        for _ in 0..200 {
            let (_, d) = c.encode(&zeros);
            for (s, v) in sent.iter_mut().zip(&d) {
                *s += v;
            }
        }
        let err: f32 = sent
            .iter()
            .zip(&x)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-3, "max error after feedback {err}");
    }

    /// One of each codec.
    const KINDS: [Compression; 4] = [
        Compression::None,
        Compression::Int8 { block: 64 },
        Compression::TopK { fraction: 0.1 },
        Compression::TopK2Bit { fraction: 0.1 },
    ];

    #[test]
    fn one_shot_encoding_is_what_a_fresh_compressor_sends() {
        let x = noise(600, 9);
        for kind in KINDS {
            let (bytes, decoded) = Compressor::new(kind, x.len()).encode(&x);
            let once = encode_once(kind, &x);
            assert_eq!(once, bytes, "{kind:?}");
            assert_eq!(
                decode(&once, x.len()).expect("decodes"),
                decoded,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn malformed_payloads_are_refused_not_trusted() {
        let x = noise(600, 4);
        for kind in KINDS {
            let (bytes, _) = Compressor::new(kind, x.len()).encode(&x);
            for cut in [0, 1, 5, bytes.len() / 2, bytes.len() - 1] {
                assert!(decode(&bytes[..cut], 600).is_err(), "{kind:?} cut at {cut}");
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(decode(&long, 600).is_err(), "{kind:?} trailing byte");
            assert_eq!(
                decode(&bytes, 601),
                Err(CodecError::WrongLength {
                    got: 600,
                    want: 601
                })
            );
        }
        assert_eq!(
            decode(&[9, 0, 0, 0, 0], 0),
            Err(CodecError::UnknownCodec(9))
        );
        // A NaN scale.
        let (mut bytes, _) = Compressor::new(Compression::Int8 { block: 64 }, 600).encode(&x);
        bytes[9..13].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(&bytes, 600), Err(CodecError::NonFinite));
        // An fp32 infinity.
        let (mut bytes, _) = Compressor::new(Compression::None, 600).encode(&x);
        bytes[5..9].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert_eq!(decode(&bytes, 600), Err(CodecError::NonFinite));
        // A top-k index past the end, and a block size of zero.
        let (mut bytes, _) =
            Compressor::new(Compression::TopK { fraction: 0.5 }, 2).encode(&[1.0, 2.0]);
        *bytes.last_mut().expect("has indices") = 0x7f;
        assert!(decode(&bytes, 2).is_err());
        let mut zero_block = vec![1, 4, 0, 0, 0];
        zero_block.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode(&zero_block, 4).is_err());
        // 2-bit codes: bits set past the last value (three values, one byte).
        let (mut bytes, _) =
            Compressor::new(Compression::TopK2Bit { fraction: 1.0 }, 3).encode(&[1.0, 2.0, 3.0]);
        assert!(decode(&bytes, 3).is_ok());
        let codes = 13 + 4;
        bytes[codes] |= 0b1100_0000;
        assert_eq!(
            decode(&bytes, 3),
            Err(CodecError::Malformed("holding bits past its last value"))
        );
        // Finite scales that make infinite values: the largest float times 1.5 (2-bit),
        // times -128 (int8).
        let (mut bytes, _) =
            Compressor::new(Compression::TopK2Bit { fraction: 1.0 }, 3).encode(&[1.0, 2.0, 3.0]);
        bytes[13..17].copy_from_slice(&f32::MAX.to_le_bytes());
        assert_eq!(decode(&bytes, 3), Err(CodecError::NonFinite));
        let (mut bytes, _) = Compressor::new(Compression::Int8 { block: 64 }, 600).encode(&x);
        bytes[9..13].copy_from_slice(&f32::MAX.to_le_bytes());
        let values = 9 + 4 * 600_usize.div_ceil(64);
        bytes[values] = 0x80;
        assert_eq!(decode(&bytes, 600), Err(CodecError::NonFinite));
    }

    #[test]
    fn two_bit_top_k_sends_signs_and_scale_and_feeds_the_rest_back() {
        let mut x = noise(10_000, 5);
        x[17] = 5.0;
        x[9_999] = -4.0;
        let mut c = Compressor::new(Compression::TopK2Bit { fraction: 0.01 }, x.len());
        let (bytes, dec) = c.encode(&x);
        let (int8, _) = Compressor::new(Compression::TopK { fraction: 0.01 }, x.len()).encode(&x);
        // 100 values: a quarter byte each instead of one.
        assert_eq!(
            int8.len() - bytes.len(),
            100 - 25,
            "{} vs {}",
            bytes.len(),
            int8.len()
        );
        assert_eq!(dec.iter().filter(|v| **v != 0.0).count(), 100);
        // The largest of its block is exact (the levels are +-1.5 and +-0.5 of a third
        // of it); the others keep their sign.
        assert!((dec[17] - 5.0).abs() < 1e-5, "{}", dec[17]);
        assert!(dec[9_999] < 0.0, "{}", dec[9_999]);
        for (a, b) in x.iter().zip(&dec) {
            assert!(*b == 0.0 || a.signum() == b.signum(), "{a} sent as {b}");
        }
        // However small next to its block's largest.
        let (_, tiny) =
            Compressor::new(Compression::TopK2Bit { fraction: 1.0 }, 2).encode(&[1.0, -1e-9]);
        assert!(tiny[1] < 0.0, "{tiny:?}");
        assert_eq!(decode(&bytes, x.len()).as_deref(), Ok(&dec[..]));
        // Error feedback: what 2 bits leave out goes out later.
        let zeros = vec![0.0; x.len()];
        let mut sent = dec.clone();
        for _ in 0..400 {
            let (_, d) = c.encode(&zeros);
            for (s, v) in sent.iter_mut().zip(&d) {
                *s += v;
            }
        }
        let err: f32 = sent
            .iter()
            .zip(&x)
            .map(|(s, v)| (s - v).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.01, "largest difference after feedback {err}");
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(Compression::Int8 { block: 0 }.validate().is_err());
        assert!(Compression::TopK { fraction: 0.0 }.validate().is_err());
        assert!(Compression::TopK { fraction: f32::NAN }.validate().is_err());
        assert!(Compression::TopK { fraction: 0.01 }.validate().is_ok());
        assert!(Compression::TopK2Bit { fraction: 1.5 }.validate().is_err());
        assert!(Compression::TopK2Bit { fraction: 0.01 }.validate().is_ok());
    }
}
