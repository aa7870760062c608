//! Labelled data sets: grey-scale images with a class each (from a pair of IDX files or
//! a CSV file), or byte-level text cut into windows for a language model.

use thiserror::Error;

use crate::idx::{self, IdxError, IdxLimits};

/// Why an images/labels pair was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DatasetError {
    /// One of the two files is not valid IDX.
    #[error("{file}: {source}")]
    Idx {
        /// Which file ("images" or "labels").
        file: &'static str,
        /// What was wrong with it.
        source: IdxError,
    },
    /// The images file is not `[count, rows, cols]`.
    #[error("images must have 3 dimensions [count, rows, cols], found {0:?}")]
    ImageShape(Vec<usize>),
    /// The labels file is not `[count]`.
    #[error("labels must have 1 dimension [count], found {0:?}")]
    LabelShape(Vec<usize>),
    /// The two files disagree on how many samples there are.
    #[error("{images} images but {labels} labels")]
    CountMismatch {
        /// Number of images.
        images: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A label names a class outside `0..classes`.
    #[error("label {label} at sample {index} is outside 0..{classes}")]
    LabelOutOfRange {
        /// Index of the offending sample.
        index: usize,
        /// Its label.
        label: u8,
        /// Number of classes the task declares.
        classes: usize,
    },
}

/// Grey-scale images with one class label each, or text: windows of `cols` bytes, each
/// with the `cols` bytes that follow its positions as labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Pixel rows per image.
    pub rows: usize,
    /// Pixel columns per image.
    pub cols: usize,
    /// Number of classes; every label is below this.
    pub classes: usize,
    /// `len() * rows * cols` pixels, image after image.
    pub pixels: Vec<u8>,
    /// One label per image; `cols` per window of text.
    pub labels: Vec<u8>,
    /// Whether this is text: `pixels` are byte tokens, not grey values.
    pub text: bool,
}

/// Largest text file a task may train on (the browser downloads it whole).
pub const MAX_TEXT_BYTES: usize = 64 << 20;

/// Why a text file was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TextError {
    /// Not valid UTF-8.
    #[error("is not UTF-8 text (invalid byte at offset {0})")]
    NotUtf8(usize),
    /// No bytes at all.
    #[error("is empty")]
    Empty,
    /// Larger than [`MAX_TEXT_BYTES`].
    #[error("is {0} bytes, more than the limit of {MAX_TEXT_BYTES}")]
    TooLarge(usize),
    /// Too short for two windows of the model's context.
    #[error("holds {bytes} bytes, too few for two windows of context {context} (needs at least {})", 2 * context + 1)]
    TooShort {
        /// Bytes in the file.
        bytes: usize,
        /// The model's context.
        context: usize,
    },
}

impl Dataset {
    /// Reads and validates an images/labels pair of IDX files from disk.
    pub fn read_idx_files(
        images: &std::path::Path,
        labels: &std::path::Path,
        classes: usize,
    ) -> Result<Self, String> {
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        Self::from_idx(
            &read(images)?,
            &read(labels)?,
            classes,
            &IdxLimits::default(),
        )
        .map_err(|e| format!("{}: {e}", images.display()))
    }

    /// Builds a data set from the bytes of an IDX images file and an IDX labels file,
    /// validating both and their agreement.
    pub fn from_idx(
        images: &[u8],
        labels: &[u8],
        classes: usize,
        limits: &IdxLimits,
    ) -> Result<Self, DatasetError> {
        let images = idx::parse_u8(images, limits).map_err(|source| DatasetError::Idx {
            file: "images",
            source,
        })?;
        let labels = idx::parse_u8(labels, limits).map_err(|source| DatasetError::Idx {
            file: "labels",
            source,
        })?;
        let [count, rows, cols] = images.shape[..] else {
            return Err(DatasetError::ImageShape(images.shape));
        };
        let [label_count] = labels.shape[..] else {
            return Err(DatasetError::LabelShape(labels.shape));
        };
        if count != label_count {
            return Err(DatasetError::CountMismatch {
                images: count,
                labels: label_count,
            });
        }
        if let Some((index, &label)) = labels
            .data
            .iter()
            .enumerate()
            .find(|&(_, &l)| usize::from(l) >= classes)
        {
            return Err(DatasetError::LabelOutOfRange {
                index,
                label,
                classes,
            });
        }
        Ok(Self {
            rows,
            cols,
            classes,
            pixels: images.data,
            labels: labels.data,
            text: false,
        })
    }

    /// Builds a data set from CSV text: on each line a label, then `rows * cols` pixel
    /// values in 0..=255. A first line that does not start with a number is a header.
    /// Refuses files over `max_bytes`, and names the line of any bad value.
    pub fn from_csv(
        bytes: &[u8],
        rows: usize,
        cols: usize,
        classes: usize,
        max_bytes: usize,
    ) -> Result<Self, String> {
        if bytes.len() > max_bytes {
            return Err(format!(
                "{} bytes, more than the limit {max_bytes}",
                bytes.len()
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        let n = rows * cols;
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split(',').map(str::trim);
            let first = fields.next().unwrap_or_default();
            let Ok(label) = first.parse::<u8>() else {
                if i == 0 {
                    continue; // header
                }
                return Err(format!("line {}: label {first:?} is not 0..=255", i + 1));
            };
            if usize::from(label) >= classes {
                return Err(format!(
                    "line {}: label {label} outside 0..{classes}",
                    i + 1
                ));
            }
            let start = pixels.len();
            for f in fields {
                let v = f
                    .parse::<u8>()
                    .map_err(|_| format!("line {}: pixel {f:?} is not 0..=255", i + 1))?;
                pixels.push(v);
            }
            if pixels.len() - start != n {
                return Err(format!(
                    "line {}: {} pixels, expected {rows}x{cols} = {n}",
                    i + 1,
                    pixels.len() - start
                ));
            }
            labels.push(label);
        }
        Ok(Self {
            rows,
            cols,
            classes,
            pixels,
            labels,
            text: false,
        })
    }

    /// Byte-level text for a model of context `context`: UTF-8, not empty, at most
    /// [`MAX_TEXT_BYTES`], cut into consecutive windows of `context` bytes (the last
    /// partial window is dropped); window `i` reads bytes `i*context ..` and its labels
    /// are the same positions shifted by one byte (the next byte at each position).
    pub fn from_text(bytes: &[u8], context: usize) -> Result<Self, TextError> {
        if bytes.is_empty() {
            return Err(TextError::Empty);
        }
        if bytes.len() > MAX_TEXT_BYTES {
            return Err(TextError::TooLarge(bytes.len()));
        }
        if let Err(e) = std::str::from_utf8(bytes) {
            return Err(TextError::NotUtf8(e.valid_up_to()));
        }
        let context = context.max(1);
        let windows = (bytes.len() - 1) / context;
        if windows < 2 {
            return Err(TextError::TooShort {
                bytes: bytes.len(),
                context,
            });
        }
        let len = windows * context;
        Ok(Self {
            rows: 1,
            cols: context,
            classes: 256,
            pixels: bytes[..len].to_vec(),
            labels: bytes[1..=len].to_vec(),
            text: true,
        })
    }

    /// Labels per sample: the window's length for text, 1 for images.
    pub fn positions(&self) -> usize {
        if self.text { self.cols } else { 1 }
    }

    /// Splits off the last `n` samples as a second set (for a held-out split).
    pub fn split_off_tail(mut self, n: usize) -> (Self, Self) {
        let keep = self.len().saturating_sub(n);
        let per = self.positions();
        let tail = Self {
            rows: self.rows,
            cols: self.cols,
            classes: self.classes,
            pixels: self.pixels.split_off(keep * self.rows * self.cols),
            labels: self.labels.split_off(keep * per),
            text: self.text,
        };
        (self, tail)
    }

    /// Number of samples (images, or windows of text).
    pub fn len(&self) -> usize {
        self.labels.len() / self.positions()
    }

    /// Whether the data set holds no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of sample `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idx::encode_u8;

    fn files(count: usize, labels: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let images = encode_u8(&[count, 2, 2], &vec![7; count * 4]).expect("valid");
        let labels = encode_u8(&[labels.len()], labels).expect("valid");
        (images, labels)
    }

    #[test]
    fn assembles_matching_files() {
        let (i, l) = files(3, &[0, 1, 2]);
        let d = Dataset::from_idx(&i, &l, 10, &IdxLimits::default()).expect("valid pair");
        assert_eq!((d.len(), d.rows, d.cols), (3, 2, 2));
        assert_eq!(d.image(2), &[7, 7, 7, 7]);
    }

    #[test]
    fn rejects_counts_that_disagree() {
        let (i, l) = files(3, &[0, 1]);
        assert_eq!(
            Dataset::from_idx(&i, &l, 10, &IdxLimits::default()).err(),
            Some(DatasetError::CountMismatch {
                images: 3,
                labels: 2
            })
        );
    }

    #[test]
    fn rejects_labels_outside_the_classes() {
        let (i, l) = files(2, &[0, 10]);
        assert_eq!(
            Dataset::from_idx(&i, &l, 10, &IdxLimits::default()).err(),
            Some(DatasetError::LabelOutOfRange {
                index: 1,
                label: 10,
                classes: 10
            })
        );
    }

    #[test]
    fn rejects_wrong_dimensions_and_names_the_file() {
        let (_, l) = files(2, &[0, 1]);
        assert_eq!(
            Dataset::from_idx(&l, &l, 10, &IdxLimits::default()).err(),
            Some(DatasetError::ImageShape(vec![2]))
        );
        let err = Dataset::from_idx(&[1, 2, 3], &l, 10, &IdxLimits::default()).err();
        assert!(matches!(
            err,
            Some(DatasetError::Idx { file: "images", .. })
        ));
    }

    #[test]
    fn text_becomes_windows_whose_labels_are_the_next_bytes() {
        let d = Dataset::from_text("hello, world".as_bytes(), 4).expect("text");
        assert_eq!((d.len(), d.positions(), d.cols), (2, 4, 4));
        assert_eq!(d.image(0), b"hell");
        assert_eq!(&d.labels[..4], b"ello");
        assert_eq!(d.image(1), b"o, w");
        assert_eq!(&d.labels[4..], b", wo");
        let (train, test) = d.split_off_tail(1);
        assert_eq!((train.len(), test.len()), (1, 1));
        assert_eq!(test.labels, b", wo");
    }

    #[test]
    fn refuses_text_that_is_not_utf8_empty_or_too_short() {
        assert_eq!(
            Dataset::from_text(b"ok \xff\xfe", 1).expect_err("not UTF-8"),
            TextError::NotUtf8(3)
        );
        assert_eq!(
            Dataset::from_text(b"", 4).expect_err("empty"),
            TextError::Empty
        );
        let e = Dataset::from_text(b"short text", 8).expect_err("short");
        assert_eq!(
            e,
            TextError::TooShort {
                bytes: 10,
                context: 8
            }
        );
        assert!(e.to_string().contains("context 8"), "{e}");
        let big = vec![b'a'; MAX_TEXT_BYTES + 1];
        assert!(matches!(
            Dataset::from_text(&big, 8),
            Err(TextError::TooLarge(_))
        ));
    }
}
