//! Local data: a task whose visitors train on files they choose (`[data] source =
//! "local"`), which never leave their device.
//!
//! The driver (the browser worker, `shoal-peer --local-data`) reads each chosen file and
//! hands it here: images already decoded to grey values at the model's input size (the
//! browser decodes PNG and JPEG with its own codecs), CSV rows, or UTF-8 text. Every file
//! is checked on its own; a bad one is skipped with a reason naming it, and the rest are
//! kept. [`LocalData::summary`] is what the page shows before training.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, MAX_TEXT_BYTES};
use crate::task::TaskSpec;

/// What visitors bring, and its limits (`[data.local]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// The kind of files: `images` (PNG/JPEG, labelled by folder name or a
    /// `labels.csv`), `csv` (rows of a label then the pixels) or `text` (UTF-8, for a
    /// language model).
    pub kind: LocalKind,
    /// Most files one visitor may add.
    #[serde(default = "default_max_files")]
    pub max_files: usize,
    /// Largest file, in bytes.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: usize,
    /// The classes' names, in class order: a folder or label of that name is that class.
    /// Without them, labels are the class numbers `0..classes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_names: Vec<String>,
}

/// The kind of local files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalKind {
    /// PNG or JPEG images.
    Images,
    /// CSV rows: a label, then the pixels 0..=255.
    Csv,
    /// UTF-8 text files.
    Text,
}

fn default_max_files() -> usize {
    10_000
}

fn default_max_file_bytes() -> usize {
    8 << 20
}

/// Most pixel (or text) bytes one visitor's files may add up to (a training set becomes
/// 4 bytes per value in memory: 256 MiB).
pub const MAX_LOCAL_BYTES: usize = 64 << 20;
/// What one row of a label table is counted as, toward [`MAX_LOCAL_BYTES`], besides its
/// bytes: held in two maps of two strings each, a row of 10 bytes took 150 to 290 in
/// memory (tables of short names within the limit held about 1.5 GB).
pub const TABLE_ROW_BYTES: usize = 256;

/// Most pixels an image may declare (4096 x 4096): decoders refuse larger ones before
/// decoding, so a small file cannot claim gigabytes.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 24;

/// Skipped files listed by name; beyond, they are only counted.
const MAX_LISTED: usize = 1000;

/// A label as shown in a message: at most 40 characters of it.
fn shown(label: &str) -> String {
    let short: String = label.chars().take(40).collect();
    if short.len() < label.len() {
        format!("{short:?}...")
    } else {
        format!("{short:?}")
    }
}

impl LocalSpec {
    /// Checks the table against the task's classes and model; the field and the problem.
    pub fn validate(&self, classes: usize, text_model: bool) -> Result<(), (String, String)> {
        let bad = |field: &str, why: String| Err((format!("data.local.{field}"), why));
        if (self.kind == LocalKind::Text) != text_model {
            return bad(
                "kind",
                if text_model {
                    "a language model trains on text: kind = \"text\"".into()
                } else {
                    "text needs a language model; images and csv need a classifier".into()
                },
            );
        }
        if !(1..=100_000).contains(&self.max_files) {
            return bad(
                "max_files",
                format!("{} outside 1..=100000", self.max_files),
            );
        }
        if !(1..=(64 << 20)).contains(&self.max_file_bytes) {
            return bad(
                "max_file_bytes",
                format!("{} outside 1..=67108864", self.max_file_bytes),
            );
        }
        if !self.label_names.is_empty() {
            if self.kind == LocalKind::Text {
                return bad("label_names", "text has no labels".into());
            }
            if self.label_names.len() != classes {
                return bad(
                    "label_names",
                    format!("{} names for {classes} classes", self.label_names.len()),
                );
            }
            for (i, n) in self.label_names.iter().enumerate() {
                if n.is_empty() || n.len() > 64 || n.contains(['/', '\\', ',', '\n']) {
                    return bad(
                        "label_names",
                        format!("{n:?} must be 1 to 64 characters without / \\ , or newlines"),
                    );
                }
                if self.label_names[..i].contains(n) {
                    return bad("label_names", format!("{n:?} appears twice"));
                }
            }
        }
        Ok(())
    }
}

/// A file that was not used, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The file's name as the visitor chose it.
    pub file: String,
    /// What was wrong with it.
    pub reason: String,
}

/// What the visitor's files amount to, shown before training.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocalSummary {
    /// Files used.
    pub files: usize,
    /// Samples (images, rows, or windows of text).
    pub samples: usize,
    /// Samples per class, by class name (images and CSV).
    pub per_class: Vec<(String, usize)>,
    /// Files not used, with the reason (the first 1,000).
    pub skipped: Vec<Skipped>,
    /// Files not used beyond those listed.
    pub more_skipped: usize,
    /// The fewest samples training takes (one batch; two windows of text).
    pub min_samples: usize,
}

/// The visitor's files, checked one by one into a data set.
pub struct LocalData {
    spec: LocalSpec,
    rows: usize,
    cols: usize,
    classes: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    text: Vec<u8>,
    /// Path as written in a `labels.csv` among the files -> label.
    table: HashMap<String, String>,
    /// File name (the path's last part) -> label, for names the tables hold once.
    by_name: HashMap<String, String>,
    /// File names the tables hold more than once (they match by path only).
    ambiguous: std::collections::HashSet<String>,
    files: usize,
    offered: usize,
    skipped: Vec<Skipped>,
    more_skipped: usize,
    batch: usize,
    /// Bytes of label tables held.
    text_bytes_of_tables: usize,
}

impl LocalData {
    /// An empty set for a local task.
    pub fn new(task: &TaskSpec) -> Result<Self, String> {
        let spec = task
            .data
            .local
            .clone()
            .ok_or("the task does not train on local data")?;
        let [rows, cols, _] = task.model.input;
        Ok(Self {
            spec,
            rows,
            cols,
            classes: task.data.classes,
            pixels: Vec::new(),
            labels: Vec::new(),
            text: Vec::new(),
            table: HashMap::new(),
            by_name: HashMap::new(),
            ambiguous: std::collections::HashSet::new(),
            files: 0,
            offered: 0,
            skipped: Vec::new(),
            more_skipped: 0,
            batch: task.train.batch.max(1),
            text_bytes_of_tables: 0,
        })
    }

    fn note_skip(&mut self, file: &str, reason: String) {
        if self.skipped.len() < MAX_LISTED {
            self.skipped.push(Skipped {
                file: file.to_string(),
                reason,
            });
        } else {
            self.more_skipped += 1;
        }
    }

    /// The kind of files the task takes.
    pub fn kind(&self) -> LocalKind {
        self.spec.kind
    }

    /// The image size files are decoded to: `(width, height)`.
    pub fn image_size(&self) -> (usize, usize) {
        (self.cols, self.rows)
    }

    /// Records an entry of a folder that is no file to offer (a link, a folder too deep
    /// or unreadable), with the reason: listed among the skipped, and not counted toward
    /// the task's file limit (a folder of links used it up before any file was read).
    pub fn pass_over(&mut self, entry: &str, reason: impl Into<String>) {
        self.note_skip(entry, reason.into());
    }

    /// Records that `file` was not used (the driver could not read or decode it).
    pub fn skip(&mut self, file: &str, reason: impl Into<String>) {
        self.offered += 1;
        self.note_skip(file, reason.into());
    }

    /// Whether the task's file limit is reached (drivers stop reading there).
    pub fn full(&self) -> bool {
        self.offered >= self.spec.max_files
    }

    /// Counts `n` files that were not read because the limit was reached.
    pub fn not_read(&mut self, n: usize) {
        if n > 0 {
            self.note_skip(
                &format!("{n} more files"),
                format!(
                    "not read: the task takes at most {} files",
                    self.spec.max_files
                ),
            );
        }
    }

    /// Whether one more file of `size` bytes may be added; the driver asks before it
    /// reads or decodes (the reason is recorded when not).
    pub fn admit(&mut self, file: &str, size: usize) -> bool {
        let why = if self.offered >= self.spec.max_files {
            Some(format!("more than {} files", self.spec.max_files))
        } else if size > self.spec.max_file_bytes {
            Some(format!(
                "{size} bytes, more than the task's limit of {}",
                self.spec.max_file_bytes
            ))
        } else if size == 0 {
            Some("empty".into())
        } else if self.spec.kind == LocalKind::Text
            && self.text.len().saturating_add(size).saturating_add(1) > MAX_TEXT_BYTES
        {
            // Known from its size: the driver need not read it (a folder of large text
            // files was read whole, file after file, once the total was reached).
            Some(format!("more than {MAX_TEXT_BYTES} bytes of text in all"))
        } else {
            None
        };
        match why {
            Some(reason) => {
                self.skip(file, reason);
                false
            }
            None => true,
        }
    }

    /// Takes a `labels.csv`: lines of `file name,label` (a header line is allowed); images
    /// named there get that label, whatever folder they are in. A name is matched as the
    /// path written (from the folder chosen) or, where it is the only entry with that
    /// file name, by file name. Returns how many names it holds.
    pub fn label_table(&mut self, file: &str, bytes: &[u8]) -> Result<usize, String> {
        let result = (|| {
            if self.spec.kind != LocalKind::Images {
                return Err("a label table is for images".to_string());
            }
            if self.bytes_held() + bytes.len() > MAX_LOCAL_BYTES {
                return Err(format!("more than {MAX_LOCAL_BYTES} bytes of data in all"));
            }
            let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
            // The whole table is read before any of it is taken: a table refused for a
            // bad line labels nothing.
            let mut rows = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let Some((name, label)) = line.rsplit_once(',') else {
                    return Err(format!("line {}: expected `file name,label`", i + 1));
                };
                let (name, label) = (name.trim().trim_start_matches("./"), label.trim());
                if i == 0 && self.class_of(label).is_err() {
                    continue; // a header
                }
                // Refused as soon as the rows so far pass the limit: the rows read are
                // held (16-32 bytes each), and a 64 MiB table of empty names is 33
                // million of them.
                if self.bytes_held() + bytes.len() + (rows.len() + 1) * TABLE_ROW_BYTES
                    > MAX_LOCAL_BYTES
                {
                    return Err(format!(
                        "more than {MAX_LOCAL_BYTES} bytes of data in all (a label table's row counts {TABLE_ROW_BYTES} bytes besides its text)"
                    ));
                }
                rows.push((name, label));
            }
            let n = rows.len();
            let cost = bytes.len() + n * TABLE_ROW_BYTES;
            for (name, label) in rows {
                let base = name.rsplit(['/', '\\']).next().unwrap_or(name).to_string();
                match self.by_name.entry(base) {
                    std::collections::hash_map::Entry::Occupied(e) => {
                        self.ambiguous.insert(e.key().clone());
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(label.to_string());
                    }
                }
                self.table.insert(name.to_string(), label.to_string());
            }
            self.text_bytes_of_tables += cost;
            Ok(n)
        })();
        let n = result.as_ref().map_or(0, |n| *n);
        self.outcome(file, result.map(|_| ()))?;
        Ok(n)
    }

    /// The class a label names.
    fn class_of(&self, label: &str) -> Result<u8, String> {
        if !self.spec.label_names.is_empty() {
            return self
                .spec
                .label_names
                .iter()
                .position(|n| n == label)
                .map(|i| i as u8)
                .ok_or_else(|| {
                    format!(
                        "label {} is not one of the task's classes ({})",
                        shown(label),
                        self.spec.label_names.join(", ")
                    )
                });
        }
        match label.parse::<usize>() {
            Ok(c) if c < self.classes && c <= usize::from(u8::MAX) => Ok(c as u8),
            _ => Err(format!(
                "label {} is not a class of this task (0 to {})",
                shown(label),
                self.classes.saturating_sub(1)
            )),
        }
    }

    fn bytes_held(&self) -> usize {
        self.pixels.len() + self.text.len() + self.text_bytes_of_tables
    }

    fn outcome(&mut self, file: &str, result: Result<(), String>) -> Result<(), String> {
        self.offered += 1;
        match &result {
            Ok(()) => self.files += 1,
            Err(e) => self.note_skip(file, e.clone()),
        }
        result
    }

    /// Adds an image decoded to grey values (`width x height`, row-major). Its label is
    /// the one `labels.csv` gives its name, else the name of its `folder`.
    pub fn add_image(
        &mut self,
        file: &str,
        folder: Option<&str>,
        grey: &[u8],
        width: usize,
        height: usize,
    ) -> Result<(), String> {
        let result = (|| {
            if self.spec.kind != LocalKind::Images {
                return Err("this task takes no images".to_string());
            }
            if (width, height) != (self.cols, self.rows) || grey.len() != width * height {
                return Err(format!(
                    "decoded to {width}x{height} ({} values), the model takes {}x{}",
                    grey.len(),
                    self.cols,
                    self.rows
                ));
            }
            let path = file.trim_start_matches("./");
            let base = path.rsplit(['/', '\\']).next().unwrap_or(path);
            // The table by the path as chosen (or below the folder chosen), else by file
            // name where that is unique in it.
            let listed = self
                .table
                .get(path)
                .or_else(|| {
                    path.split_once('/')
                        .and_then(|(_, below)| self.table.get(below))
                })
                .or_else(|| {
                    (!self.ambiguous.contains(base))
                        .then(|| self.by_name.get(base))
                        .flatten()
                });
            let label = match (listed, folder) {
                (Some(l), _) => l.clone(),
                (None, Some(f)) if !f.is_empty() => f.to_string(),
                _ => {
                    return Err(
                        "no label: put it in a folder named after its class, or list it in \
                         labels.csv"
                            .into(),
                    );
                }
            };
            let class = self.class_of(&label)?;
            if self.bytes_held() + grey.len() > MAX_LOCAL_BYTES {
                return Err(format!("more than {MAX_LOCAL_BYTES} bytes of data in all"));
            }
            self.pixels.extend_from_slice(grey);
            self.labels.push(class);
            Ok(())
        })();
        self.outcome(file, result)
    }

    /// Adds a CSV file of rows (a label, then the pixels 0..=255; a header line is
    /// allowed); the labels are class numbers, or names when the task names its classes.
    pub fn add_csv(&mut self, file: &str, bytes: &[u8]) -> Result<(), String> {
        let result = (|| {
            if self.spec.kind != LocalKind::Csv {
                return Err("this task takes no CSV files".to_string());
            }
            let named = self.with_class_numbers(bytes)?;
            let set = Dataset::from_csv(
                &named,
                self.rows,
                self.cols,
                self.classes,
                self.spec.max_file_bytes.max(named.len()),
            )?;
            if set.is_empty() {
                return Err("holds no rows".into());
            }
            if self.bytes_held() + set.pixels.len() > MAX_LOCAL_BYTES {
                return Err(format!("more than {MAX_LOCAL_BYTES} bytes of data in all"));
            }
            self.pixels.extend_from_slice(&set.pixels);
            self.labels.extend_from_slice(&set.labels);
            Ok(())
        })();
        self.outcome(file, result)
    }

    /// CSV text with class names (when the task names its classes) turned into numbers.
    fn with_class_numbers(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        if self.spec.label_names.is_empty() {
            return Ok(bytes.to_vec());
        }
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut out = String::with_capacity(text.len());
        for (i, line) in text.lines().enumerate() {
            let Some((label, rest)) = line.split_once(',') else {
                out.push_str(line);
                out.push('\n');
                continue;
            };
            // A first line with a field that is not a number is a header.
            let header = i == 0 && rest.split(',').any(|f| f.trim().parse::<u8>().is_err());
            match self.class_of(label.trim()) {
                Ok(c) => out.push_str(&format!("{c},{rest}\n")),
                Err(_) if header => {}
                Err(e) => return Err(format!("line {}: {e}", i + 1)),
            }
        }
        Ok(out.into_bytes())
    }

    /// Adds a UTF-8 text file (files are joined with a newline between them).
    pub fn add_text(&mut self, file: &str, bytes: &[u8]) -> Result<(), String> {
        let result = (|| {
            if self.spec.kind != LocalKind::Text {
                return Err("this task takes no text files".to_string());
            }
            if let Err(e) = std::str::from_utf8(bytes) {
                return Err(format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.valid_up_to()
                ));
            }
            if self.text.len() + bytes.len() + 1 > MAX_TEXT_BYTES {
                return Err(format!("more than {MAX_TEXT_BYTES} bytes of text in all"));
            }
            if !self.text.is_empty() {
                self.text.push(b'\n');
            }
            self.text.extend_from_slice(bytes);
            Ok(())
        })();
        self.outcome(file, result)
    }

    /// What the files amount to.
    pub fn summary(&self) -> LocalSummary {
        let names: Vec<String> = if self.spec.label_names.is_empty() {
            (0..self.classes).map(|c| c.to_string()).collect()
        } else {
            self.spec.label_names.clone()
        };
        let mut counts = vec![0usize; self.classes];
        for l in &self.labels {
            counts[usize::from(*l)] += 1;
        }
        let samples = match self.spec.kind {
            LocalKind::Text => self.text.len().saturating_sub(1) / self.cols.max(1),
            _ => self.labels.len(),
        };
        LocalSummary {
            files: self.files,
            samples,
            per_class: if self.spec.kind == LocalKind::Text {
                Vec::new()
            } else {
                names.into_iter().zip(counts).collect()
            },
            skipped: self.skipped.clone(),
            more_skipped: self.more_skipped,
            min_samples: self.min_samples(),
        }
    }

    /// One batch: of samples, or of windows of text (two at least). With fewer, training
    /// cannot start, and the page must not take a consent it would fail after.
    fn min_samples(&self) -> usize {
        if self.spec.kind == LocalKind::Text {
            self.batch.max(2)
        } else {
            self.batch
        }
    }

    /// The training set the files make (at least [`LocalSummary::min_samples`]).
    pub fn into_dataset(self) -> Result<Dataset, String> {
        let min = self.min_samples();
        if self.spec.kind == LocalKind::Text {
            let set =
                Dataset::from_text(&self.text, self.cols).map_err(|e| format!("your text {e}"))?;
            if set.len() < min {
                return Err(format!(
                    "your text makes {} windows of {} bytes; training takes at least {min} \
                     (one batch)",
                    set.len(),
                    self.cols
                ));
            }
            return Ok(set);
        }
        if self.labels.len() < min {
            return Err(format!(
                "{} usable samples; training takes at least {min} (one batch)",
                self.labels.len()
            ));
        }
        Ok(Dataset {
            rows: self.rows,
            cols: self.cols,
            classes: self.classes,
            pixels: self.pixels,
            labels: self.labels,
            text: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(kind: LocalKind, names: &[&str], max_files: usize) -> TaskSpec {
        let mut t = TaskSpec::digits();
        t.data.source = crate::task::DataSource::Local;
        t.data.train = crate::task::Files::default();
        t.train.batch = 2;
        t.data.local = Some(LocalSpec {
            kind,
            max_files,
            max_file_bytes: 4000,
            label_names: names.iter().map(|s| s.to_string()).collect(),
        });
        t
    }

    #[test]
    fn a_label_table_of_many_short_rows_counts_what_it_holds() {
        // 400,000 rows of 10 bytes: 4 MB of text, well within the 64 MiB, but about
        // 100 MB held in the two maps. Counted at its rows' cost it is refused; a table
        // of 1,000 rows is taken.
        let t = task(LocalKind::Images, &[], 20);
        let mut d = LocalData::new(&t).expect("local");
        let big: String = (0..400_000).map(|i| format!("{i:06}.png,3\n")).collect();
        let e = d
            .label_table("labels.csv", big.as_bytes())
            .expect_err("too much held");
        assert!(e.contains("bytes of data in all"), "{e}");
        let small: String = (0..1_000).map(|i| format!("{i:06}.png,3\n")).collect();
        assert_eq!(d.label_table("labels.csv", small.as_bytes()), Ok(1_000));
        // Refused as the rows pass the limit, not once all are held: a table whose last
        // line is bad is refused for its rows (read to its end, it would be for the line).
        let mut long = "a.png,3\n".repeat(300_000);
        long.push_str("stray line\n");
        let e = d
            .label_table("labels.csv", long.as_bytes())
            .expect_err("too much held");
        assert!(e.contains("bytes of data in all"), "{e}");
    }

    #[test]
    fn a_label_table_refused_for_a_bad_line_labels_nothing() {
        let t = task(LocalKind::Images, &[], 20);
        let mut d = LocalData::new(&t).expect("local");
        let e = d
            .label_table("labels.csv", b"a.png,3\nstray line\n")
            .expect_err("line 2");
        assert!(e.contains("line 2"), "{e}");
        let e = d
            .add_image("a.png", None, &[0; 784], 28, 28)
            .expect_err("no label");
        assert!(e.contains("no label"), "{e}");
    }

    #[test]
    fn images_are_labelled_by_folder_or_table_and_bad_ones_are_skipped_by_name() {
        let t = task(LocalKind::Images, &[], 20);
        t.validate().expect("a valid local task");
        let mut d = LocalData::new(&t).expect("local");
        let img = vec![7u8; 28 * 28];
        d.add_image("3/a.png", Some("3"), &img, 28, 28)
            .expect("folder 3");
        d.label_table(
            "labels.csv",
            b"file,label\nb.png,5\nc.png,12\nx/1.png,1\ny/1.png,2\n",
        )
        .expect("table");
        d.add_image("b.png", None, &img, 28, 28)
            .expect("from the table");
        // The table wins over the folder; a file name it holds twice matches by path.
        d.add_image("9/b.png", Some("9"), &img, 28, 28)
            .expect("table");
        d.add_image("x/1.png", Some("x"), &img, 28, 28)
            .expect("by path");
        d.add_image("pick/y/1.png", Some("y"), &img, 28, 28)
            .expect("below the folder chosen");
        let e = d
            .add_image("z/1.png", Some("z"), &img, 28, 28)
            .expect_err("ambiguous");
        assert!(e.contains("\"z\" is not a class"), "{e}");
        let e = d.add_image("c.png", None, &img, 28, 28).expect_err("12");
        assert!(e.contains("\"12\""), "{e}");
        let e = d
            .add_image("d.png", None, &img, 28, 28)
            .expect_err("unlabelled");
        assert!(e.contains("no label"), "{e}");
        let e = d
            .add_image("cats/e.png", Some("cats"), &img, 28, 28)
            .expect_err("name");
        assert!(e.contains("not a class"), "{e}");
        let long = "w".repeat(500);
        let e = d
            .add_image("f.png", Some(&long), &img, 28, 28)
            .expect_err("long label");
        assert!(e.len() < 120, "labels are shortened in messages: {e}");
        let e = d
            .add_image("7/g.png", Some("7"), &img[..100], 10, 10)
            .expect_err("size");
        assert!(e.contains("28x28"), "{e}");
        assert!(!d.admit("huge.png", 5000), "over max_file_bytes");
        assert!(d.admit("ok.png", 10));
        let s = d.summary();
        assert_eq!((s.files, s.samples), (6, 5), "{s:?}");
        assert_eq!(s.per_class[3], ("3".to_string(), 1));
        assert_eq!(s.per_class[5], ("5".to_string(), 2));
        assert_eq!((s.per_class[1].1, s.per_class[2].1), (1, 1));
        let skipped: Vec<&str> = s.skipped.iter().map(|k| k.file.as_str()).collect();
        assert_eq!(
            skipped,
            [
                "z/1.png",
                "c.png",
                "d.png",
                "cats/e.png",
                "f.png",
                "7/g.png",
                "huge.png"
            ]
        );
        assert!(
            s.skipped[6].reason.contains("limit of 4000"),
            "{:?}",
            s.skipped[6]
        );
        let set = d.into_dataset().expect("five images");
        assert_eq!(set.labels, vec![3, 5, 5, 1, 2]);
    }

    #[test]
    fn the_file_limit_counts_every_file_offered_and_training_needs_a_batch() {
        let t = task(LocalKind::Images, &[], 3);
        let mut d = LocalData::new(&t).expect("local");
        let img = vec![7u8; 28 * 28];
        d.add_image("3/a.png", Some("3"), &img, 28, 28)
            .expect("one");
        d.skip("bad.png", "unreadable");
        assert!(!d.full());
        assert!(d.admit("3/b.png", 10));
        d.add_image("3/b.png", Some("3"), &img, 28, 28)
            .expect("two");
        assert!(d.full());
        assert!(!d.admit("3/c.png", 10), "over max_files");
        d.not_read(7);
        let s = d.summary();
        assert_eq!(s.min_samples, 2);
        assert_eq!(s.skipped.last().expect("counted").file, "7 more files");
        let mut one = LocalData::new(&t).expect("local");
        one.add_image("3/a.png", Some("3"), &img, 28, 28)
            .expect("one");
        let e = one.into_dataset().expect_err("below a batch");
        assert!(e.contains("at least 2"), "{e}");
    }

    #[test]
    fn named_classes_csv_rows_and_text() {
        let names = [
            "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        ];
        let t = task(LocalKind::Csv, &names, 20);
        t.validate().expect("valid");
        let mut d = LocalData::new(&t).expect("local");
        let row = |label: &str| format!("{label},{}\n", vec!["9"; 784].join(","));
        let good = format!("label,pixels\n{}{}", row("two"), row("nine"));
        d.add_csv("a.csv", good.as_bytes()).expect("two rows");
        let e = d
            .add_csv("b.csv", row("eleven").as_bytes())
            .expect_err("unknown name");
        assert!(e.contains("eleven"), "{e}");
        let e = d.add_csv("c.csv", b"two,1,2,3\n").expect_err("short row");
        assert!(e.contains("pixels"), "{e}");
        let e = d
            .label_table("labels.csv", b"a.png,two\n")
            .expect_err("not images");
        assert!(e.contains("for images"), "{e}");
        assert_eq!(d.into_dataset().expect("rows").labels, vec![2, 9]);

        let mut lm = TaskSpec::from_toml(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tasks/fortunes.toml"
            ))
            .expect("text task"),
        )
        .expect("valid");
        lm.data.source = crate::task::DataSource::Local;
        lm.data.train = crate::task::Files::default();
        lm.data.holdout = None;
        lm.data.test = Some(crate::task::Files {
            text: Some("text/fortunes.txt".into()),
            ..Default::default()
        });
        lm.data.local = Some(LocalSpec {
            kind: LocalKind::Text,
            max_files: 10,
            max_file_bytes: 1 << 20,
            label_names: Vec::new(),
        });
        lm.validate().expect("a local text task");
        assert!(lm.is_text() && lm.is_local());
        let mut d = LocalData::new(&lm).expect("local");
        d.add_text("a.txt", "hello world. ".repeat(100).as_bytes())
            .expect("text");
        let e = d.add_text("b.txt", &[0xff, 0xfe]).expect_err("not utf-8");
        assert!(e.contains("UTF-8"), "{e}");
        assert!(d.into_dataset().expect("windows").len() >= 2);
        // Text for fewer windows than a batch: the page says so before consent, and no
        // dataset is made (before, consent was taken and the worker failed at its start).
        let batch = lm.train.batch;
        let mut short = LocalData::new(&lm).expect("local");
        let cols = short.image_size().0;
        short
            .add_text("a.txt", "x".repeat((batch - 1) * cols + 1).as_bytes())
            .expect("text");
        let s = short.summary();
        assert_eq!((s.samples, s.min_samples), (batch - 1, batch.max(2)));
        let e = short.into_dataset().expect_err("under a batch");
        assert!(e.contains("one batch"), "{e}");
        // A file that would take the text past its total is refused by its size, before
        // the driver reads it.
        let mut full = LocalData::new(&lm).expect("local");
        full.text = vec![b'x'; MAX_TEXT_BYTES - 50];
        assert!(full.admit("small.txt", 40));
        assert!(!full.admit("big.txt", 100));
        let skipped = format!("{:?}", full.summary());
        assert!(skipped.contains("bytes of text in all"), "{skipped}");
    }
}
