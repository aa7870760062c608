//! The IDX file format (the format of the MNIST files): a reader that never trusts its
//! input and a writer.
//!
//! Layout: two zero bytes, a type byte, a dimension count, then one big-endian `u32`
//! per dimension, then the elements in row-major order. Shoal stores pixels and labels
//! as unsigned bytes (type `0x08`), the only element type the reader accepts.

use thiserror::Error;

/// The IDX type byte for unsigned 8-bit elements.
pub const TYPE_U8: u8 = 0x08;

/// Bounds the reader enforces before it allocates anything.
#[derive(Clone, Copy, Debug)]
pub struct IdxLimits {
    /// Most dimensions a file may declare.
    pub max_dims: usize,
    /// Most elements a file may declare (the product of its dimensions).
    pub max_elements: usize,
}

impl Default for IdxLimits {
    /// Room for a few hundred thousand 28x28 images; far below anything that would
    /// strain a browser tab.
    fn default() -> Self {
        Self {
            max_dims: 4,
            max_elements: 256 * 1024 * 1024,
        }
    }
}

/// Why an IDX file was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdxError {
    /// The file ends before its header does.
    #[error("IDX header truncated: need {needed} bytes, file has {actual}")]
    TruncatedHeader {
        /// Bytes the header needs.
        needed: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The first two bytes are not zero.
    #[error("not an IDX file: magic bytes {0:02x} {1:02x}, expected 00 00")]
    BadMagic(u8, u8),
    /// The element type is not unsigned bytes.
    #[error("unsupported IDX element type 0x{0:02x} (only 0x08, unsigned byte, is accepted)")]
    UnsupportedType(u8),
    /// Zero or too many dimensions.
    #[error("IDX file declares {dims} dimensions; 1 to {max} are accepted")]
    BadDimensionCount {
        /// Declared dimensions.
        dims: usize,
        /// Most accepted.
        max: usize,
    },
    /// The declared shape holds more elements than the limit (or overflows).
    #[error("IDX shape {shape:?} is larger than the limit of {max} elements")]
    TooLarge {
        /// Declared shape.
        shape: Vec<u32>,
        /// Most elements accepted.
        max: usize,
    },
    /// The body is shorter or longer than the shape says.
    #[error("IDX body has {actual} bytes but shape {shape:?} needs {expected}")]
    LengthMismatch {
        /// Declared shape.
        shape: Vec<u32>,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
}

/// A decoded IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements in row-major order; `data.len()` is the product of `shape`.
    pub data: Vec<u8>,
}

/// Parses an IDX file of unsigned bytes, checking every header field against `limits`
/// and the body length against the shape before copying anything.
pub fn parse_u8(bytes: &[u8], limits: &IdxLimits) -> Result<IdxArray, IdxError> {
    if bytes.len() < 4 {
        return Err(IdxError::TruncatedHeader {
            needed: 4,
            actual: bytes.len(),
        });
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(IdxError::BadMagic(bytes[0], bytes[1]));
    }
    if bytes[2] != TYPE_U8 {
        return Err(IdxError::UnsupportedType(bytes[2]));
    }
    let dims = usize::from(bytes[3]);
    if dims == 0 || dims > limits.max_dims {
        return Err(IdxError::BadDimensionCount {
            dims,
            max: limits.max_dims,
        });
    }
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(IdxError::TruncatedHeader {
            needed: header,
            actual: bytes.len(),
        });
    }
    let shape: Vec<u32> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .filter(|&n| n <= limits.max_elements)
        .ok_or_else(|| IdxError::TooLarge {
            shape: shape.clone(),
            max: limits.max_elements,
        })?;
    let body = &bytes[header..];
    if body.len() != elements {
        return Err(IdxError::LengthMismatch {
            shape,
            expected: elements,
            actual: body.len(),
        });
    }
    Ok(IdxArray {
        shape: shape.iter().map(|&d| d as usize).collect(),
        data: body.to_vec(),
    })
}

/// Encodes an array of unsigned bytes as an IDX file.
///
/// # Panics
/// Never for valid input; returns an error if `data` does not match `shape` or a
/// dimension does not fit the format's `u32`.
pub fn encode_u8(shape: &[usize], data: &[u8]) -> Result<Vec<u8>, IdxError> {
    let dims_u32: Vec<u32> = shape
        .iter()
        .map(|&d| u32::try_from(d).unwrap_or(u32::MAX))
        .collect();
    let too_large = || IdxError::TooLarge {
        shape: dims_u32.clone(),
        max: u32::MAX as usize,
    };
    if shape.is_empty() || shape.len() > usize::from(u8::MAX) {
        return Err(IdxError::BadDimensionCount {
            dims: shape.len(),
            max: usize::from(u8::MAX),
        });
    }
    if shape.iter().any(|&d| u32::try_from(d).is_err()) {
        return Err(too_large());
    }
    let expected = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(too_large)?;
    if expected != data.len() {
        return Err(IdxError::LengthMismatch {
            shape: dims_u32,
            expected,
            actual: data.len(),
        });
    }
    let mut out = Vec::with_capacity(4 + 4 * shape.len() + data.len());
    out.extend_from_slice(&[0, 0, TYPE_U8, shape.len() as u8]);
    for d in &dims_u32 {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode_u8(&[2, 3], &[1, 2, 3, 4, 5, 6]).expect("valid shape")
    }

    #[test]
    fn round_trips_a_two_dimensional_array() {
        let parsed = parse_u8(&sample(), &IdxLimits::default()).expect("valid file");
        assert_eq!(parsed.shape, vec![2, 3]);
        assert_eq!(parsed.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_bad_magic() {
        let mut bytes = sample();
        bytes[1] = 7;
        assert_eq!(
            parse_u8(&bytes, &IdxLimits::default()),
            Err(IdxError::BadMagic(0, 7))
        );
    }

    #[test]
    fn rejects_other_element_types() {
        let mut bytes = sample();
        bytes[2] = 0x0D;
        assert_eq!(
            parse_u8(&bytes, &IdxLimits::default()),
            Err(IdxError::UnsupportedType(0x0D))
        );
    }

    #[test]
    fn rejects_truncated_header_and_body() {
        let bytes = sample();
        assert!(matches!(
            parse_u8(&bytes[..6], &IdxLimits::default()),
            Err(IdxError::TruncatedHeader {
                needed: 12,
                actual: 6
            })
        ));
        assert!(matches!(
            parse_u8(&bytes[..2], &IdxLimits::default()),
            Err(IdxError::TruncatedHeader {
                needed: 4,
                actual: 2
            })
        ));
        assert!(matches!(
            parse_u8(&bytes[..bytes.len() - 1], &IdxLimits::default()),
            Err(IdxError::LengthMismatch {
                expected: 6,
                actual: 5,
                ..
            })
        ));
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = sample();
        bytes.push(9);
        assert!(matches!(
            parse_u8(&bytes, &IdxLimits::default()),
            Err(IdxError::LengthMismatch {
                expected: 6,
                actual: 7,
                ..
            })
        ));
    }

    #[test]
    fn rejects_absurd_sizes_without_allocating() {
        // 4 dimensions of 2^32-1 each: the product overflows usize; must be refused from
        // the header alone (the body is empty).
        let mut bytes = vec![0, 0, TYPE_U8, 4];
        for _ in 0..4 {
            bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        assert!(matches!(
            parse_u8(&bytes, &IdxLimits::default()),
            Err(IdxError::TooLarge { .. })
        ));
        // A shape that fits usize but exceeds the configured limit.
        let mut bytes = vec![0, 0, TYPE_U8, 1];
        bytes.extend_from_slice(&1_000_000u32.to_be_bytes());
        let limits = IdxLimits {
            max_elements: 1000,
            ..IdxLimits::default()
        };
        assert!(matches!(
            parse_u8(&bytes, &limits),
            Err(IdxError::TooLarge { max: 1000, .. })
        ));
    }

    #[test]
    fn rejects_zero_or_too_many_dimensions() {
        assert!(matches!(
            parse_u8(&[0, 0, TYPE_U8, 0], &IdxLimits::default()),
            Err(IdxError::BadDimensionCount { dims: 0, .. })
        ));
        let mut bytes = vec![0, 0, TYPE_U8, 9];
        bytes.extend(std::iter::repeat_n(0u8, 36));
        assert!(matches!(
            parse_u8(&bytes, &IdxLimits::default()),
            Err(IdxError::BadDimensionCount { dims: 9, max: 4 })
        ));
    }

    #[test]
    fn encoder_refuses_data_that_disagrees_with_shape() {
        assert!(matches!(
            encode_u8(&[2, 2], &[1, 2, 3]),
            Err(IdxError::LengthMismatch {
                expected: 4,
                actual: 3,
                ..
            })
        ));
    }
}
