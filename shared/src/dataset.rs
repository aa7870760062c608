//! Labelled image data sets assembled from a pair of IDX files (images and labels).

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

/// Grey-scale images with one class label each.
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
    /// One label per image.
    pub labels: Vec<u8>,
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
        })
    }

    /// Splits off the last `n` samples as a second set (for a held-out split).
    pub fn split_off_tail(mut self, n: usize) -> (Self, Self) {
        let keep = self.len().saturating_sub(n);
        let tail = Self {
            rows: self.rows,
            cols: self.cols,
            classes: self.classes,
            pixels: self.pixels.split_off(keep * self.rows * self.cols),
            labels: self.labels.split_off(keep),
        };
        (self, tail)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
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
}
