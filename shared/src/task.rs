//! A researcher's task: the model, the data, the training recipe and the swarm settings,
//! written as a TOML file (`tasks/digits.toml` is the demo) and validated field by field.
//!
//! The server reads and validates task files at start; peers receive the same
//! description as JSON from `/api/tasks/{name}`. Every error names the field and the
//! problem, e.g. `train.batch: 0 outside 1..=4096`.

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::engine::{MAX_TRAINING_BYTES, Model, ModelSpec, Optimizer, WEBGPU_MAX_BINDING};
use crate::idx::IdxLimits;
use crate::learn::LearnConfig;
pub use crate::privacy::PrivacySpec;

/// Largest CSV data file accepted, in bytes.
pub const MAX_CSV_BYTES: usize = 256 << 20;
/// The most bytes a task's data files (training and test, on the server) may have in
/// all: 64 MiB, as a visitor's own files ([`crate::local::MAX_LOCAL_BYTES`]). Every
/// visitor downloads them, and holds them several times over while loading them (the
/// downloads, the parsed set, 4 bytes a value).
pub const MAX_DATA_BYTES: usize = 64 << 20;

/// The bytes of the file at `path`, refused once past `limit`: read up to one byte more,
/// so that a file of many gigabytes (or a device that never ends) is never read whole.
pub fn read_at_most(path: &std::path::Path, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {} MiB", limit >> 20),
        ));
    }
    Ok(bytes)
}

/// Refuses a task's files past [`MAX_DATA_BYTES`] in all, before any is parsed.
fn within_data_limit(files: &[&[u8]]) -> Result<(), TaskError> {
    let total: usize = files.iter().map(|f| f.len()).sum();
    if total > MAX_DATA_BYTES {
        return Err(err(
            "data",
            format!(
                "the task's files are {} MiB in all, more than the {} MiB every visitor \
                 downloads and holds (several times over while loading them)",
                total >> 20,
                MAX_DATA_BYTES >> 20
            ),
        ));
    }
    Ok(())
}

/// A whole task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Short name: lowercase letters, digits and `-`, 1 to 32 characters. Peers sign
    /// their updates for it and connect to `/ws/{name}`.
    pub name: String,
    /// Human title shown on the pages.
    pub title: String,
    /// What contributors help with, in a sentence or two.
    #[serde(default)]
    pub description: String,
    /// The model (layers as data).
    pub model: ModelSpec,
    /// Where the data is and how it is split.
    pub data: DataSpec,
    /// The local training recipe.
    pub train: TrainSpec,
    /// The swarm's settings (rounds, aggregation, compression, deadlines).
    #[serde(default)]
    pub learn: LearnConfig,
    /// Differential privacy (empty: none); see [`crate::privacy`].
    #[serde(default)]
    pub privacy: PrivacySpec,
}

/// The task's data: grey-scale images with integer labels, or text for a language model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Number of classes; every label must be below it, and the model's last layer must
    /// have this many units. Text is bytes: 256, which may be left out.
    #[serde(default)]
    pub classes: usize,
    /// Where training data comes from: the server's files (`train`), or files each
    /// visitor chooses on their own device (`local`), which never leave it.
    #[serde(default, skip_serializing_if = "DataSource::is_server")]
    pub source: DataSource,
    /// The training split (server data).
    #[serde(default)]
    pub train: Files,
    /// What visitors bring (local data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<crate::local::LocalSpec>,
    /// The held-out split; without it, the last `holdout` fraction of `train` is held out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Files>,
    /// Fraction of `train` held out when `test` is absent (0 < holdout < 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<f32>,
}

/// Where a task's training data comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// The server's files, downloaded by every peer.
    #[default]
    Server,
    /// Files each visitor chooses, read on their device only (`[data.local]`).
    Local,
}

impl DataSource {
    fn is_server(&self) -> bool {
        *self == Self::Server
    }
}

/// One split's files, relative to the server's data folder (served under `/data/`):
/// an IDX pair (`images`, `labels`), one CSV file (`csv`: a label then the pixels
/// 0..=255 on each line; a header line is allowed), or one UTF-8 text file (`text`) for
/// a language model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    /// IDX images file (`[count, rows, cols]` of u8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// IDX labels file (`[count]` of u8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// CSV file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<String>,
    /// UTF-8 text file (at most [`MAX_TEXT_BYTES`](crate::dataset::MAX_TEXT_BYTES)), read as bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Files {
    /// The paths to fetch, in order: `[images, labels]`, `[csv]` or `[text]`.
    pub fn paths(&self) -> Vec<&str> {
        match (&self.images, &self.labels, &self.csv, &self.text) {
            (Some(i), Some(l), None, None) => vec![i, l],
            (None, None, Some(c), None) => vec![c],
            (None, None, None, Some(t)) => vec![t],
            _ => Vec::new(),
        }
    }

    /// The field names of [`paths`](Self::paths), in the same order.
    fn fields(&self) -> &'static [&'static str] {
        if self.text.is_some() {
            &["text"]
        } else if self.csv.is_some() {
            &["csv"]
        } else {
            &["images", "labels"]
        }
    }
}

/// The local training recipe every peer follows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Seed of the initial weights: every peer starts from the same model.
    pub seed: u64,
    /// Samples per inner step.
    pub batch: usize,
    /// The inner optimizer (default Adam).
    #[serde(default)]
    pub optimizer: InnerOptimizer,
    /// Momentum of SGD (0: plain SGD); Adam uses its usual betas and refuses any other.
    #[serde(default)]
    pub momentum: f32,
    /// Inner learning rate.
    pub lr: f32,
    /// Random shift augmentation in pixels (0: none).
    #[serde(default)]
    pub shift: usize,
    /// The inner learning rate follows a half-cosine from `lr` down to 10% of it over
    /// this many rounds of the model, then stays there (0: constant). Every peer derives
    /// it from the model version, so the swarm settles together.
    #[serde(default)]
    pub lr_decay_rounds: u64,
    /// Held-out accuracy the researcher aims for (shown on the dashboard); image tasks.
    #[serde(default)]
    pub target_accuracy: f32,
    /// Held-out loss in bits per byte the researcher aims for; text tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_bits_per_byte: Option<f32>,
    /// Decoupled weight decay of `adamw` (matrices and embeddings only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f32>,
    /// Global gradient-norm clipping of `adamw` (0 or absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f32>,
}

/// The optimizer of a peer's local steps. Adam converges fastest where every peer sees
/// the whole data; plain SGD is the one to choose under label skew (each peer holds few
/// classes), where Adam's per-coordinate normalisation turns the small, consistent
/// gradients that push a peer's absent classes down into full-size steps
/// (`scenarios/skew-8.toml`: SGD reaches the target, Adam stalls near 93.5%).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InnerOptimizer {
    /// Adam (beta1 0.9, beta2 0.999).
    #[default]
    Adam,
    /// SGD with optional heavy-ball momentum.
    Sgd,
    /// AdamW (beta1 0.9, beta2 0.95) with `weight_decay` and global-norm `clip`: the
    /// recipe for transformers.
    Adamw,
}

impl InnerOptimizer {
    /// The engine's optimizer at learning rate `lr` with `momentum` (sgd only), or what
    /// is wrong; AdamW without decay or clipping.
    pub fn build(self, lr: f32, momentum: f32) -> Result<Optimizer, String> {
        self.build_with(lr, momentum, None, None)
            .map_err(|(_, problem)| problem)
    }

    /// The engine's optimizer at learning rate `lr` with the recipe's settings, or the
    /// field that is wrong and why.
    pub fn build_with(
        self,
        lr: f32,
        momentum: f32,
        weight_decay: Option<f32>,
        clip: Option<f32>,
    ) -> Result<Optimizer, (&'static str, String)> {
        if self != Self::Adamw && (weight_decay.is_some() || clip.is_some()) {
            return Err((
                "train.weight_decay",
                "weight_decay and clip are settings of optimizer = \"adamw\"".into(),
            ));
        }
        match self {
            Self::Adam | Self::Adamw if momentum != 0.0 => Err((
                "train.momentum",
                format!("{momentum} given, but only sgd takes a momentum"),
            )),
            Self::Adam => Ok(Optimizer::adam(lr)),
            Self::Sgd if !(0.0..1.0).contains(&momentum) => {
                Err(("train.momentum", format!("{momentum} outside [0, 1)")))
            }
            Self::Sgd => Ok(Optimizer::Sgd { lr, momentum }),
            Self::Adamw => {
                let wd = weight_decay.unwrap_or(0.0);
                let clip = clip.unwrap_or(0.0);
                if !(0.0..1.0).contains(&wd) {
                    return Err(("train.weight_decay", format!("{wd} outside [0, 1)")));
                }
                if !(0.0..=1e6).contains(&clip) {
                    return Err(("train.clip", format!("{clip} outside [0, 1e6]")));
                }
                Ok(Optimizer::adamw(lr, wd, clip))
            }
        }
    }
}

/// Why a task was refused: the field and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct TaskError {
    /// Dotted path of the field, e.g. `train.batch`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn err(field: &str, problem: impl Into<String>) -> TaskError {
    TaskError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The dotted field of a task file at byte `start`, e.g. `train.learning_rate`: the
/// table whose header is on its line or comes last before it (toml puts a missing key
/// on its table's header), and the key of its line (empty if neither).
fn toml_field(text: &str, start: usize) -> String {
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let before = &text[..start];
    let dotted = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let table = text[..line_end].lines().rev().find_map(|l| {
        let l = l.split('#').next().unwrap_or("").trim();
        let name = l.strip_prefix('[')?.strip_suffix(']')?;
        let name = name.trim_start_matches('[').trim_end_matches(']').trim();
        dotted(name).then(|| name.to_string())
    });
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && dotted(k));
    [table.as_deref(), key]
        .into_iter()
        .flatten()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether `p` is a safe relative path inside the data folder.
fn check_path(field: &str, p: &str) -> Result<(), TaskError> {
    let ok_chars = p
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if p.is_empty() || p.len() > 200 || !ok_chars {
        return Err(err(
            field,
            format!("{p:?} must be 1 to 200 characters of letters, digits, '.', '_', '-', '/'"),
        ));
    }
    // Without `.` parts too: a browser removes them from the URL it fetches, so the
    // server would be asked for another path than the one the task names.
    if p.starts_with('/')
        || p.split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(err(
            field,
            format!("{p:?} must be relative to the data folder, without '.', '..' or empty parts"),
        ));
    }
    Ok(())
}

impl Files {
    fn validate(&self, field: &str) -> Result<(), TaskError> {
        match (&self.images, &self.labels, &self.csv, &self.text) {
            (Some(i), Some(l), None, None) => {
                check_path(&format!("{field}.images"), i)?;
                check_path(&format!("{field}.labels"), l)
            }
            (None, None, Some(c), None) => check_path(&format!("{field}.csv"), c),
            (None, None, None, Some(t)) => check_path(&format!("{field}.text"), t),
            _ => Err(err(
                field,
                "give one of: `images` and `labels` (IDX), `csv`, or `text`",
            )),
        }
    }
}

impl TaskSpec {
    /// The demo task (the same as `tasks/digits.toml`): the MLP on the MNIST digits,
    /// batch 8, Adam 1e-3 with a half-cosine over 150 rounds, shift augmentation, and the
    /// swarm settings the simulator validated.
    pub fn digits() -> Self {
        let files = |split: &str| Files {
            images: Some(format!("digits/{split}-images.idx")),
            labels: Some(format!("digits/{split}-labels.idx")),
            csv: None,
            text: None,
        };
        Self {
            name: "digits".into(),
            title: "Handwritten digits (MNIST)".into(),
            description: "Teach a small neural network to read handwritten digits.".into(),
            model: ModelSpec::mlp_digits(),
            data: DataSpec {
                classes: 10,
                source: DataSource::Server,
                local: None,
                train: files("train"),
                test: Some(files("test")),
                holdout: None,
            },
            train: TrainSpec {
                seed: 42,
                batch: 8,
                optimizer: InnerOptimizer::Adam,
                momentum: 0.0,
                lr: 1e-3,
                shift: 2,
                lr_decay_rounds: 30,
                target_accuracy: 0.95,
                target_bits_per_byte: None,
                weight_decay: None,
                clip: None,
            },
            learn: LearnConfig {
                round_ms: 1_000,
                compression: crate::learn::Compression::TopK2Bit { fraction: 0.1 },
                upload_mb_per_hour: 80,
                ..LearnConfig::default()
            },
            privacy: PrivacySpec::default(),
        }
    }

    /// Parses and validates a task file's text.
    pub fn from_toml(text: &str) -> Result<Self, TaskError> {
        let spec: Self = toml::from_str(text).map_err(|e| {
            // toml gives the problem and where it is; keep its message on one line, and
            // name the field as the checks below do.
            let msg = e.message().to_string();
            match e.span() {
                Some(s) => {
                    let start = s.start.min(text.len());
                    let line = text[..start].matches('\n').count() + 1;
                    let field = toml_field(text, start);
                    err(
                        if field.is_empty() {
                            "task file"
                        } else {
                            &field
                        },
                        format!("{msg} (line {line})"),
                    )
                }
                None => err("task file", msg),
            }
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and validates a task received as JSON (from `/api/tasks/{name}`).
    pub fn from_json(text: &str) -> Result<Self, TaskError> {
        let spec: Self =
            serde_json::from_str(text).map_err(|e| err("task description", e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field that can be checked without the data files.
    pub fn validate(&self) -> Result<(), TaskError> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 32
            || !n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(err(
                "name",
                format!("{n:?} must be 1 to 32 of a-z, 0-9 and '-'"),
            ));
        }
        if self.title.trim().is_empty() || self.title.len() > 100 {
            return Err(err("title", "must be 1 to 100 characters"));
        }
        if self.description.len() > 2000 {
            return Err(err("description", "longer than 2000 characters"));
        }
        let model = Model::new(self.model.clone()).map_err(|e| err("model", e.to_string()))?;
        // A model in fp32 with its momentum must fit one message (keepers' models, and
        // fp32 updates, mixes and observers' answers at half that).
        let n = model.param_len();
        let most = (crate::framing::MAX_MESSAGE - crate::framing::MESSAGE_SLACK) / 8;
        if n > most {
            return Err(err(
                "model",
                format!(
                    "{n} parameters: a model in fp32 with its momentum ({} bytes) must fit \
                     one message of at most {} bytes (at most {most} parameters)",
                    n.saturating_mul(8).saturating_add(49),
                    crate::framing::MAX_MESSAGE,
                ),
            ));
        }
        let d = &self.data;
        let text = self.is_text();
        if d.source == DataSource::Local {
            self.validate_local(&model)?;
        } else if d.local.is_some() {
            return Err(err(
                "data.local",
                "only with source = \"local\" (visitors' own files)",
            ));
        }
        if text != model.is_language_model() {
            return Err(err(
                "data.train",
                if text {
                    "text data needs a language model (an embedding layer first, lm_head last)"
                } else {
                    "a language model needs text data (`text = \"file.txt\"`)"
                },
            ));
        }
        if let Some(t) = &d.test
            && t.text.is_some() != text
        {
            return Err(err(
                "data.test",
                "must be the same kind of data as data.train",
            ));
        }
        if text {
            self.validate_text(&model)?;
        } else if !(2..=256).contains(&d.classes) {
            return Err(err(
                "data.classes",
                format!("{} outside 2..=256", d.classes),
            ));
        }
        if !text && model.classes() != d.classes {
            return Err(err(
                "model.layers",
                format!(
                    "the last layer has {} units but data.classes is {}",
                    model.classes(),
                    d.classes
                ),
            ));
        }
        if self.model.input[2] != 1 {
            return Err(err(
                "model.input",
                "the data are grey-scale images: the input must have 1 channel",
            ));
        }
        if d.source == DataSource::Server {
            d.train.validate("data.train")?;
        }
        match (&d.test, d.holdout) {
            (Some(t), None) => t.validate("data.test")?,
            (None, Some(h)) if h > 0.0 && h < 1.0 => {}
            (None, Some(h)) => return Err(err("data.holdout", format!("{h} outside (0, 1)"))),
            (Some(_), Some(_)) => {
                return Err(err(
                    "data.holdout",
                    "give `test` files or `holdout`, not both",
                ));
            }
            (None, None) => {
                return Err(err(
                    "data.test",
                    "missing: give `test` files, or `holdout` (a fraction of train)",
                ));
            }
        }
        let t = &self.train;
        if !(1..=4096).contains(&t.batch) {
            return Err(err("train.batch", format!("{} outside 1..=4096", t.batch)));
        }
        if !(t.lr > 0.0 && t.lr <= 1.0) {
            return Err(err("train.lr", format!("{} outside (0, 1]", t.lr)));
        }
        t.optimizer
            .build_with(t.lr, t.momentum, t.weight_decay, t.clip)
            .map_err(|(field, problem)| err(field, problem))?;
        if t.shift > 8 {
            return Err(err("train.shift", format!("{} above 8 pixels", t.shift)));
        }
        let binding = model.largest_binding(t.batch);
        if binding > WEBGPU_MAX_BINDING {
            return Err(err(
                "train.batch",
                format!(
                    "a batch of {} needs a {} MiB buffer (parameters, an activation, a \
                     convolution's unfolded input or a block's attention), more than WebGPU's \
                     default maxStorageBufferBindingSize of 128 MiB",
                    t.batch,
                    binding >> 20
                ),
            ));
        }
        let held = model.training_bytes(t.batch);
        if held > MAX_TRAINING_BYTES {
            return Err(err(
                "train.batch",
                format!(
                    "training this model at a batch of {} holds about {} MiB (parameters, \
                     their gradient and optimizer moments, what every layer keeps for its \
                     backward pass, and as much again for evaluating the model), more than \
                     {} MiB: fewer or smaller layers, or a smaller batch",
                    t.batch,
                    held >> 20,
                    MAX_TRAINING_BYTES >> 20
                ),
            ));
        }
        if t.lr_decay_rounds > 1_000_000 {
            return Err(err(
                "train.lr_decay_rounds",
                format!("{} above 1000000", t.lr_decay_rounds),
            ));
        }
        let accuracy_ok = t.target_accuracy > 0.0 && t.target_accuracy <= 1.0;
        if !text && !accuracy_ok {
            return Err(err(
                "train.target_accuracy",
                format!("{} outside (0, 1]", t.target_accuracy),
            ));
        }
        self.learn.validate().map_err(|e| {
            let (field, problem) = e.split_once(": ").unwrap_or(("", &e));
            err(&format!("learn.{field}"), problem)
        })?;
        self.privacy
            .validate()
            .map_err(|(field, problem)| err(&field, problem))
    }

    /// The checks of a text task: bytes as tokens (vocabulary 256), no image settings, a
    /// target in bits per byte.
    fn validate_text(&self, model: &Model) -> Result<(), TaskError> {
        let (d, t) = (&self.data, &self.train);
        if model.vocab() != Some(256) {
            return Err(err(
                "model.layers",
                "text is read as bytes: the embedding's vocab must be 256",
            ));
        }
        if d.classes != 0 && d.classes != 256 {
            return Err(err(
                "data.classes",
                format!("{}: text has 256 classes (bytes); leave it out", d.classes),
            ));
        }
        if t.shift != 0 {
            return Err(err("train.shift", "shift augmentation is for images"));
        }
        if t.target_accuracy != 0.0 {
            return Err(err(
                "train.target_accuracy",
                "a text task states its target as target_bits_per_byte",
            ));
        }
        match t.target_bits_per_byte {
            Some(b) if b > 0.0 && b <= 8.0 => Ok(()),
            Some(b) => Err(err(
                "train.target_bits_per_byte",
                format!("{b} outside (0, 8]"),
            )),
            None => Err(err(
                "train.target_bits_per_byte",
                "missing: the held-out loss (bits per byte) the task aims for",
            )),
        }
    }

    /// Whether this is a text task (a language model on bytes).
    pub fn is_text(&self) -> bool {
        match &self.data.local {
            Some(l) if self.data.source == DataSource::Local => {
                l.kind == crate::local::LocalKind::Text
            }
            _ => self.data.train.text.is_some(),
        }
    }

    /// The data files the task reads from the server's data folder, relative to it: the
    /// training split's (none for a task on visitors' own files), then the held-out
    /// split's, in the order [`datasets`](Self::datasets) takes their bytes.
    pub fn data_paths(&self) -> Vec<&str> {
        std::iter::once(&self.data.train)
            .chain(self.data.test.as_ref())
            .flat_map(|f| f.paths())
            .collect()
    }

    /// Whether visitors train on their own files (`source = "local"`).
    pub fn is_local(&self) -> bool {
        self.data.source == DataSource::Local
    }

    /// The checks of a task on visitors' own files: a `[data.local]` table that fits the
    /// model, no server training files, and a server-side test split to measure on.
    fn validate_local(&self, model: &Model) -> Result<(), TaskError> {
        let d = &self.data;
        let Some(local) = &d.local else {
            return Err(err(
                "data.local",
                "missing: source = \"local\" needs [data.local] (kind = \"images\", \"csv\" or \"text\")",
            ));
        };
        if d.train != Files::default() {
            return Err(err(
                "data.train",
                "a task on visitors' own files has no server training files",
            ));
        }
        if d.test.is_none() {
            return Err(err(
                "data.test",
                "missing: a task on visitors' own files measures on a test split of the server's",
            ));
        }
        if d.holdout.is_some() {
            return Err(err(
                "data.holdout",
                "a task on visitors' own files holds out nothing of theirs: give test files",
            ));
        }
        local
            .validate(d.classes, model.is_language_model())
            .map_err(|(field, problem)| err(&field, problem))
    }

    /// The held-out set of a task on visitors' own files, from the bytes of its test
    /// files (in the order of [`Files::paths`]).
    pub fn test_dataset(&self, files: &[&[u8]]) -> Result<Dataset, TaskError> {
        let test = self
            .data
            .test
            .as_ref()
            .ok_or_else(|| err("data.test", "missing"))?;
        within_data_limit(files)?;
        self.split("data.test", test, files)
    }

    /// Loads a local task's held-out set from the server's data folder `dir`.
    pub fn load_test_dataset(&self, dir: &std::path::Path) -> Result<Dataset, TaskError> {
        let test = self
            .data
            .test
            .as_ref()
            .ok_or_else(|| err("data.test", "missing"))?;
        let bytes = Self::read_split(dir, "data.test", test)?;
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        self.test_dataset(&refs)
    }

    /// The inner optimizer at the learning rate of `round`.
    pub fn optimizer_at(&self, round: u64) -> Result<Optimizer, String> {
        let t = &self.train;
        t.optimizer
            .build_with(self.lr_at(round), t.momentum, t.weight_decay, t.clip)
            .map_err(|(field, problem)| format!("{field}: {problem}"))
    }

    /// The inner learning rate for a round of the model.
    pub fn lr_at(&self, round: u64) -> f32 {
        crate::engine::train::swarm_lr(self.train.lr, round, self.train.lr_decay_rounds)
    }

    /// One split's data set from the bytes of its files (`f`'s paths, in order).
    fn split(&self, field: &str, f: &Files, bytes: &[&[u8]]) -> Result<Dataset, TaskError> {
        let [h, w, _] = self.model.input;
        let classes = self.data.classes;
        if let (Some(path), [text]) = (&f.text, bytes) {
            return Dataset::from_text(text, w)
                .map_err(|e| err(&format!("{field}.text"), format!("{path} {e}")));
        }
        let set = match (f.csv.is_some(), bytes) {
            (false, [images, labels]) => {
                Dataset::from_idx(images, labels, classes, &IdxLimits::default())
                    .map_err(|e| err(field, e.to_string()))?
            }
            (true, [csv]) => Dataset::from_csv(csv, h, w, classes, MAX_CSV_BYTES)
                .map_err(|e| err(&format!("{field}.csv"), e))?,
            _ => return Err(err(field, "wrong number of files")),
        };
        if (set.rows, set.cols) != (h, w) {
            return Err(err(
                field,
                format!(
                    "images are {}x{} but model.input is {h}x{w}",
                    set.rows, set.cols
                ),
            ));
        }
        if set.is_empty() {
            return Err(err(field, "holds no samples"));
        }
        Ok(set)
    }

    /// Reads `f`'s files from `dir` (the server's data folder), naming the field
    /// (`{split}.{field}`) of one that cannot be read.
    fn read_split(
        dir: &std::path::Path,
        split: &str,
        f: &Files,
    ) -> Result<Vec<Vec<u8>>, TaskError> {
        f.fields()
            .iter()
            .zip(f.paths())
            .map(|(field, path)| {
                let full = dir.join(path);
                read_at_most(&full, MAX_DATA_BYTES).map_err(|e| {
                    err(
                        &format!("{split}.{field}"),
                        format!("{}: {e}", full.display()),
                    )
                })
            })
            .collect()
    }

    /// Builds the train and held-out data sets from the bytes of the files, in the order
    /// of [`Files::paths`] for `data.train` and then `data.test` (when present).
    pub fn datasets(&self, files: &[&[u8]]) -> Result<(Dataset, Dataset), TaskError> {
        if self.is_local() {
            return Err(err(
                "data.source",
                "the training data are each visitor's own files (see test_dataset)",
            ));
        }
        within_data_limit(files)?;
        let d = &self.data;
        let train_n = d.train.paths().len();
        let one = |field: &str, f: &Files, bytes: &[&[u8]]| self.split(field, f, bytes);
        if files.len() < train_n {
            return Err(err("data.train", "wrong number of files"));
        }
        let train = one("data.train", &d.train, &files[..train_n])?;
        match (&d.test, d.holdout) {
            (Some(t), _) => Ok((train, one("data.test", t, &files[train_n..])?)),
            (None, Some(frac)) => {
                let held = ((train.len() as f64) * f64::from(frac)).round() as usize;
                if held == 0 || held >= train.len() {
                    return Err(err(
                        "data.holdout",
                        format!("{frac} of {} samples leaves a split empty", train.len()),
                    ));
                }
                Ok(train.split_off_tail(held))
            }
            (None, None) => Err(err("data.test", "missing")),
        }
    }

    /// Reads, validates and loads the task's data from `dir` (the server's data folder).
    pub fn load_datasets(&self, dir: &std::path::Path) -> Result<(Dataset, Dataset), TaskError> {
        if self.is_local() {
            return Err(err(
                "data.source",
                "the training data are each visitor's own files (see load_test_dataset)",
            ));
        }
        let mut bytes = Self::read_split(dir, "data.train", &self.data.train)?;
        if let Some(t) = &self.data.test {
            bytes.extend(Self::read_split(dir, "data.test", t)?);
        }
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        self.datasets(&refs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_file() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tasks/digits.toml"))
            .expect("tasks/digits.toml")
    }

    #[test]
    fn the_demo_task_file_is_the_built_in_demo() {
        assert_eq!(TaskSpec::from_toml(&demo_file()), Ok(TaskSpec::digits()));
    }

    #[test]
    fn json_round_trips() {
        let t = TaskSpec::digits();
        let json = serde_json::to_string(&t).expect("json");
        assert_eq!(TaskSpec::from_json(&json), Ok(t));
    }

    fn with(find: &str, replace: &str) -> Result<TaskSpec, TaskError> {
        let text = demo_file();
        assert!(text.contains(find), "{find:?} not in the demo file");
        TaskSpec::from_toml(&text.replacen(find, replace, 1))
    }

    /// A model whose fp32 weights and momentum could not cross the wire in one message is
    /// refused when the task is loaded, not when its first keeper or observer fails.
    #[test]
    fn a_model_too_large_for_one_message_is_refused() {
        // 784 x 11,000 + 11,000 x 64 + ...: about 9.3 million parameters.
        let e = with("units = 128", "units = 11000").expect_err("refused");
        assert_eq!(e.field, "model");
        assert!(e.problem.contains("at most 8380416 parameters"), "{e}");
        let fits = with("units = 128", "units = 9000");
        assert!(fits.is_ok(), "7.6M parameters fit: {fits:?}");
    }

    /// A convolution's unfolded input (im2col) and a block's queries, keys and values
    /// count for the binding limit like any other buffer of a training batch.
    #[test]
    fn a_convolutions_unfolded_input_counts_for_the_binding_limit() {
        use crate::engine::LayerSpec;
        let conv = LayerSpec::Conv2d {
            filters: 64,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let mut t = TaskSpec::digits();
        t.model = ModelSpec {
            input: [28, 28, 1],
            layers: vec![
                conv,
                LayerSpec::Relu,
                conv,
                LayerSpec::Relu,
                LayerSpec::Flatten,
                LayerSpec::Dense { units: 10 },
            ],
        };
        // The second convolution unfolds 28 x 28 x 9 x 64 values a sample: 882 MiB at a
        // batch of 512, where its output is 98 MiB.
        t.train.batch = 512;
        let e = t.validate().expect_err("882 MiB im2col");
        assert_eq!(e.field, "train.batch", "{e}");
        t.train.batch = 32;
        assert!(t.validate().is_ok(), "55 MiB fits");
    }

    /// A data file is read up to the limit and a byte, never whole: a file of gigabytes
    /// (or a link to a device that never ends) was read into memory before the limit
    /// was checked.
    #[cfg(unix)]
    #[test]
    fn a_data_file_is_never_read_past_the_limit() {
        let e = read_at_most(std::path::Path::new("/dev/zero"), 1 << 20).expect_err("endless");
        assert!(e.to_string().contains("more than 1 MiB"), "{e}");
        let dir = std::env::temp_dir().join(format!("shoal-read-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("digits")).expect("dir");
        std::os::unix::fs::symlink("/dev/zero", dir.join("digits/train-images.idx")).expect("link");
        let e = TaskSpec::digits().load_datasets(&dir).expect_err("refused");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(e.field, "data.train.images", "{e}");
        assert!(e.to_string().contains("more than 64 MiB"), "{e}");
    }

    /// The server's data are bounded in all as a visitor's own are: two IDX files of up
    /// to 256 Mi values each passed, and every visitor's tab held about six times their
    /// bytes while loading them (the downloads, the parsed set, 4 bytes a value).
    #[test]
    fn a_tasks_files_past_the_data_limit_are_refused_before_parsing() {
        let t = TaskSpec::digits();
        let big = vec![0u8; MAX_DATA_BYTES - 100];
        let e = t
            .datasets(&[&big, &[0u8; 101], &[], &[]])
            .expect_err("past the limit");
        assert_eq!(e.field, "data", "{e}");
        // Within it, the files are parsed (and these, all zeros, refused as IDX).
        let e = t
            .datasets(&[&big, &[0u8; 100], &[], &[]])
            .expect_err("not IDX");
        assert_eq!(e.field, "data.train", "{e}");
    }

    /// Each buffer within WebGPU's binding limit is not enough: 200 rectifiers after a
    /// wide layer are 200 activations of 64 MiB at a batch of 2,048 (13 GiB for every
    /// visitor; 400 were accepted before a model's layers were bounded).
    #[test]
    fn a_model_that_holds_too_much_in_all_is_refused() {
        use crate::engine::LayerSpec;
        let mut t = TaskSpec::digits();
        let mut layers = vec![LayerSpec::Flatten, LayerSpec::Dense { units: 8192 }];
        layers.extend(std::iter::repeat_n(LayerSpec::Relu, 200));
        layers.push(LayerSpec::Dense { units: 10 });
        t.model = ModelSpec {
            input: [28, 28, 1],
            layers,
        };
        t.train.batch = 2048;
        let model = Model::new(t.model.clone()).expect("a valid model");
        assert!(model.largest_binding(2048) <= WEBGPU_MAX_BINDING);
        let e = t.validate().expect_err("13 GiB in all");
        assert_eq!(e.field, "train.batch", "{e}");
        assert!(e.to_string().contains("MiB"), "{e}");
        t.train.batch = 2;
        assert!(t.validate().is_ok(), "{:?}", t.validate());
    }

    /// A mistake toml finds (a misspelt key, a missing one, a wrong type) names the field
    /// as the checks do, not only a line.
    #[test]
    fn a_malformed_task_file_names_the_field() {
        let field = |find: &str, replace: &str| with(find, replace).map_err(|e| e.field);
        assert_eq!(
            field("lr = 0.001", "learning_rate = 0.001"),
            Err("train.learning_rate".into())
        );
        assert_eq!(
            field("lr = 0.001", "lr = \"0.001\""),
            Err("train.lr".into())
        );
        assert_eq!(field("trim = 0.2 }", "}"), Err("learn.aggregation".into()));
        assert_eq!(
            field("optimizer = \"adam\"", "optimizer = \"Adam\""),
            Err("train.optimizer".into())
        );
        // A key missing from a table: toml points at the table's header.
        assert_eq!(field("batch = 8\n", ""), Err("train".into()));
        let e = with("lr = 0.001", "learning_rate = 0.001").expect_err("refused");
        let line = demo_file()
            .lines()
            .position(|l| l.starts_with("lr = 0.001"))
            .expect("the demo's lr")
            + 1;
        assert!(
            e.problem.contains("unknown field `learning_rate`")
                && e.problem.ends_with(&format!("(line {line})")),
            "{e} (line {line})"
        );
    }

    #[test]
    fn an_sgd_task_trains_with_sgd_on_its_schedule() {
        let t = with(
            "optimizer = \"adam\"",
            "optimizer = \"sgd\"\nmomentum = 0.5",
        )
        .expect("a valid sgd task");
        assert_eq!(
            t.optimizer_at(0).expect("valid"),
            Optimizer::Sgd {
                lr: 0.001,
                momentum: 0.5
            }
        );
        let Optimizer::Sgd { lr, momentum } =
            t.optimizer_at(t.train.lr_decay_rounds).expect("valid")
        else {
            panic!("still sgd at the end of the schedule");
        };
        assert!(
            (lr - 1e-4).abs() < 1e-7 && momentum == 0.5,
            "{lr} {momentum}"
        );
        assert!(matches!(
            TaskSpec::digits().optimizer_at(0).expect("valid"),
            Optimizer::Adam { .. }
        ));
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let cases = [
            ("batch = 8", "batch = 0", "train.batch", "0 outside"),
            ("lr = 0.001", "lr = -1.0", "train.lr", "outside (0, 1]"),
            (
                "optimizer = \"adam\"",
                "optimizer = \"adam\"\nmomentum = 0.9",
                "train.momentum",
                "only sgd",
            ),
            (
                "optimizer = \"adam\"",
                "optimizer = \"sgd\"\nmomentum = 1.0",
                "train.momentum",
                "outside [0, 1)",
            ),
            ("name = \"digits\"", "name = \"Digits!\"", "name", "a-z"),
            (
                "units = 10",
                "units = 7",
                "model.layers",
                "data.classes is 10",
            ),
            (
                "target_accuracy = 0.95",
                "target_accuracy = 2.0",
                "train.target_accuracy",
                "outside",
            ),
            (
                "images = \"digits/train-images.idx\"",
                "images = \"../etc/passwd\"",
                "data.train.images",
                "'..'",
            ),
            // A browser drops `.` parts from the URL it fetches: the server, serving only
            // the paths tasks name, would not find it.
            (
                "images = \"digits/train-images.idx\"",
                "images = \"./digits/train-images.idx\"",
                "data.train.images",
                "without '.'",
            ),
            (
                "local_steps = 20",
                "local_steps = 0",
                "learn.local_steps",
                "outside 1..=100000",
            ),
            ("trim = 0.2", "trim = 0.7", "learn.aggregation", ""),
        ];
        for (find, replace, field, problem) in cases {
            let e = with(find, replace).expect_err(replace);
            assert_eq!(e.field, field, "{replace}: {e}");
            assert!(e.problem.contains(problem), "{replace}: {e}");
        }
        // Unknown and mistyped keys: toml names the key and the line.
        let e = with("shift = 2", "shfit = 2").expect_err("typo");
        assert!(
            e.problem.contains("shfit") && e.problem.contains("line"),
            "{e}"
        );
        let e = with("batch = 8", "batch = \"eight\"").expect_err("type");
        assert!(e.problem.contains("line"), "{e}");
        let e = with("[privacy]", "[privacy]\nepsilom = 1.0").expect_err("typo");
        assert!(e.problem.contains("epsilom"), "{e}");
    }

    #[test]
    fn impossible_privacy_settings_are_refused_naming_the_field() {
        use crate::privacy::{OnBudget, PrivacySpec};
        let good = PrivacySpec {
            clip: Some(1.0),
            noise_multiplier: Some(1.1),
            delta: Some(1e-5),
            rounds: Some(100),
            ..PrivacySpec::default()
        };
        let check = |p: PrivacySpec| {
            let mut t = TaskSpec::digits();
            t.privacy = p;
            t.validate()
        };
        assert!(check(PrivacySpec::default()).is_ok());
        assert!(check(good.clone()).is_ok());
        let cases: Vec<(PrivacySpec, &str, &str)> = vec![
            (
                PrivacySpec {
                    clip: None,
                    ..good.clone()
                },
                "privacy.clip",
                "missing",
            ),
            (
                PrivacySpec {
                    clip: Some(-1.0),
                    ..good.clone()
                },
                "privacy.clip",
                "outside",
            ),
            (
                PrivacySpec {
                    clip: Some(f32::NAN),
                    ..good.clone()
                },
                "privacy.clip",
                "outside",
            ),
            (
                PrivacySpec {
                    delta: Some(0.0),
                    ..good.clone()
                },
                "privacy.delta",
                "outside",
            ),
            (
                PrivacySpec {
                    delta: Some(0.5),
                    ..good.clone()
                },
                "privacy.delta",
                "promises",
            ),
            (
                PrivacySpec {
                    delta: None,
                    ..good.clone()
                },
                "privacy.delta",
                "missing",
            ),
            (
                PrivacySpec {
                    rounds: Some(0),
                    ..good.clone()
                },
                "privacy.rounds",
                "outside",
            ),
            (
                PrivacySpec {
                    noise_multiplier: Some(0.0),
                    ..good.clone()
                },
                "privacy.noise_multiplier",
                "outside",
            ),
            (
                PrivacySpec {
                    noise_multiplier: Some(1e-200),
                    ..good.clone()
                },
                "privacy.noise_multiplier",
                "outside",
            ),
            (
                PrivacySpec {
                    noise_multiplier: None,
                    ..good.clone()
                },
                "privacy.noise_multiplier",
                "missing",
            ),
            (
                PrivacySpec {
                    epsilon: Some(4.0),
                    ..good.clone()
                },
                "privacy.epsilon",
                "not both",
            ),
            (
                PrivacySpec {
                    noise_multiplier: None,
                    epsilon: Some(-2.0),
                    ..good.clone()
                },
                "privacy.epsilon",
                "outside",
            ),
            (
                PrivacySpec {
                    noise_multiplier: None,
                    epsilon: Some(1e-6),
                    rounds: Some(1_000_000),
                    ..good.clone()
                },
                "privacy.epsilon",
                "cannot be met",
            ),
        ];
        for (p, field, problem) in cases {
            let e = check(p.clone()).expect_err(&format!("{p:?}"));
            assert_eq!(e.field, field, "{p:?}: {e}");
            assert!(e.problem.contains(problem), "{p:?}: {e}");
        }
        // A target epsilon is met with the smallest noise that meets it.
        let dp = PrivacySpec {
            noise_multiplier: None,
            epsilon: Some(8.0),
            ..good.clone()
        }
        .resolve()
        .expect("valid")
        .expect("on");
        assert!(dp.epsilon <= 8.0 && dp.epsilon > 7.9, "{dp:?}");
        assert_eq!(dp.on_budget, OnBudget::Stop);
        // From TOML, with the field names the README gives.
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tasks/digits.toml"))
            .expect("demo task")
            .replace(
                "[privacy]",
                "[privacy]\nclip = 0.5\nepsilon = 8.0\ndelta = 1e-5\nrounds = 300\non_budget = \"warn\"",
            );
        let t = TaskSpec::from_toml(&text).expect("valid privacy table");
        let dp = t.privacy.resolve().expect("valid").expect("on");
        assert_eq!(
            (dp.clip, dp.rounds, dp.on_budget),
            (0.5, 300, OnBudget::Warn)
        );
        let e =
            TaskSpec::from_toml(&text.replace("delta = 1e-5", "delta = 2.0")).expect_err("delta 2");
        assert_eq!(e.field, "privacy.delta", "{e}");
    }

    #[test]
    fn test_files_or_a_holdout_fraction() {
        let mut t = TaskSpec::digits();
        t.data.test = None;
        assert_eq!(t.validate().expect_err("neither").field, "data.test");
        t.data.holdout = Some(1.5);
        assert_eq!(t.validate().expect_err("bad").field, "data.holdout");
        t.data.holdout = Some(0.25);
        t.validate().expect("holdout");
        // 8 CSV samples of 28x28: the last quarter is held out.
        t.data.train = Files {
            csv: Some("digits/train.csv".into()),
            ..Files::default()
        };
        let mut csv = String::from("label,pixels...\n");
        for i in 0..8u8 {
            csv.push_str(&i.to_string());
            for p in 0..784 {
                csv.push_str(&format!(",{}", (p + usize::from(i)) % 256));
            }
            csv.push('\n');
        }
        let (train, test) = t.datasets(&[csv.as_bytes()]).expect("csv task");
        assert_eq!((train.len(), test.len()), (6, 2));
        assert_eq!(test.labels, vec![6, 7]);
        assert_eq!(test.image(1)[..3], [7, 8, 9]);
        // A wrong pixel count is refused, naming the field.
        let e = t.datasets(&[b"3,1,2,3\n"]).expect_err("short row");
        assert_eq!(e.field, "data.train.csv");
    }

    fn text_task() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tasks/fortunes.toml"
        ))
        .expect("tasks/fortunes.toml")
    }

    fn text_with(find: &str, replace: &str) -> Result<TaskSpec, TaskError> {
        let text = text_task();
        assert!(text.contains(find), "{find:?} not in the text task file");
        TaskSpec::from_toml(&text.replacen(find, replace, 1))
    }

    #[test]
    fn the_demo_text_task_is_a_language_model_on_bytes_with_adamw() {
        let t = TaskSpec::from_toml(&text_task()).expect("valid");
        assert!(t.is_text());
        assert_eq!(t.data.train.paths(), ["text/fortunes.txt"]);
        assert!(matches!(
            t.optimizer_at(0).expect("valid"),
            Optimizer::AdamW {
                weight_decay: 0.1,
                clip: 1.0,
                ..
            }
        ));
        let json = serde_json::to_string(&t).expect("json");
        assert_eq!(TaskSpec::from_json(&json), Ok(t));
    }

    #[test]
    fn text_tasks_refuse_what_does_not_fit_naming_the_field() {
        let cases = [
            (
                "vocab = 256",
                "vocab = 128",
                "model.layers",
                "vocab must be 256",
            ),
            ("heads = 4, mlp", "heads = 5, mlp", "model", "divide"),
            (
                "holdout = 0.05",
                "holdout = 0.05\nclasses = 10",
                "data.classes",
                "256",
            ),
            (
                "batch = 16",
                "batch = 16\nshift = 2",
                "train.shift",
                "images",
            ),
            (
                "target_bits_per_byte = 3.2",
                "target_bits_per_byte = 9.0",
                "train.target_bits_per_byte",
                "outside",
            ),
            (
                "target_bits_per_byte = 3.2",
                "target_accuracy = 0.5",
                "train.target_accuracy",
                "bits_per_byte",
            ),
            ("clip = 1.0", "clip = -1.0", "train.clip", "outside"),
            (
                "optimizer = \"adamw\"",
                "optimizer = \"adam\"",
                "train.weight_decay",
                "adamw",
            ),
            (
                "text = \"text/fortunes.txt\"",
                "images = \"a.idx\"\nlabels = \"b.idx\"",
                "data.train",
                "needs text data",
            ),
            // One block's attention for a batch of 4096 at context 64 and 4 heads is
            // 4096 * 4 * 64 * 64 floats = 256 MiB: over WebGPU's binding limit.
            (
                "batch = 16",
                "batch = 4096",
                "train.batch",
                "maxStorageBufferBindingSize",
            ),
        ];
        for (find, replace, field, problem) in cases {
            let e = text_with(find, replace).expect_err(replace);
            assert_eq!(e.field, field, "{replace}: {e}");
            assert!(e.problem.contains(problem), "{replace}: {e}");
        }
        // An image task pointed at text.
        let e = with(
            "images = \"digits/train-images.idx\"\nlabels = \"digits/train-labels.idx\"",
            "text = \"t.txt\"",
        )
        .expect_err("text for an MLP");
        assert_eq!(e.field, "data.train", "{e}");
    }

    #[test]
    fn bad_text_files_are_refused_naming_the_file() {
        let t = TaskSpec::from_toml(&text_task()).expect("valid");
        for (bytes, problem) in [
            (&b"caf\xc3"[..], "not UTF-8"),
            (&b""[..], "empty"),
            (&b"far too short for a context of 64"[..], "context 64"),
        ] {
            let e = t.datasets(&[bytes]).expect_err(problem);
            assert_eq!(e.field, "data.train.text", "{e}");
            assert!(
                e.problem.contains("text/fortunes.txt") && e.problem.contains(problem),
                "{e}"
            );
        }
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(100);
        let (train, test) = t.datasets(&[text.as_bytes()]).expect("text");
        assert_eq!(train.len() + test.len(), (text.len() - 1) / 64);
        assert_eq!(test.len(), 4, "5% of 70 windows held out, rounded");
    }
}
