//! A visitor's own files for a task on local data (`[data] source = "local"`), checked
//! in the worker one by one: the worker decodes images with the browser's codecs and
//! hands over grey values, CSV bytes or text bytes; nothing here leaves the worker.

use shoal_shared::local::{LocalData, LocalKind};
use shoal_shared::task::TaskSpec;
use wasm_bindgen::prelude::*;

/// The files a visitor chose, as they are checked.
#[wasm_bindgen]
pub struct LocalFiles {
    pub(super) inner: LocalData,
}

#[wasm_bindgen]
impl LocalFiles {
    /// An empty set for `task` (its JSON from `/api/tasks/{name}`), which must train on
    /// local data.
    #[wasm_bindgen(constructor)]
    pub fn new(task: String) -> Result<LocalFiles, JsError> {
        let task = TaskSpec::from_json(&task).map_err(|e| JsError::new(&e.to_string()))?;
        let inner = LocalData::new(&task).map_err(|e| JsError::new(&e))?;
        Ok(Self { inner })
    }

    /// The kind of files the task takes: "images", "csv" or "text".
    pub fn kind(&self) -> String {
        match self.inner.kind() {
            LocalKind::Images => "images",
            LocalKind::Csv => "csv",
            LocalKind::Text => "text",
        }
        .to_string()
    }

    /// `[width, height]` images are decoded to.
    #[wasm_bindgen(js_name = imageSize)]
    pub fn image_size(&self) -> Vec<u32> {
        let (w, h) = self.inner.image_size();
        vec![w as u32, h as u32]
    }

    /// Whether a file of `size` bytes may be added (ask before reading it); when not, the
    /// reason is recorded against `file`.
    pub fn admit(&mut self, file: &str, size: f64) -> bool {
        let size = if size.is_finite() && size >= 0.0 {
            size as usize
        } else {
            usize::MAX
        };
        self.inner.admit(file, size)
    }

    /// Whether the task's file limit is reached (read no more).
    pub fn full(&self) -> bool {
        self.inner.full()
    }

    /// Counts `n` files left unread at the limit.
    #[wasm_bindgen(js_name = notRead)]
    pub fn not_read(&mut self, n: u32) {
        self.inner.not_read(n as usize);
    }

    /// Records that `file` could not be read or decoded, and why.
    pub fn skip(&mut self, file: &str, reason: &str) {
        self.inner.skip(file, reason);
    }

    /// A `labels.csv` (`file name,label` lines); returns the error, if any.
    #[wasm_bindgen(js_name = labelTable)]
    pub fn label_table(&mut self, file: &str, bytes: &[u8]) -> Option<String> {
        self.inner.label_table(file, bytes).err()
    }

    /// An image decoded to grey values `width x height`; `folder` is the name of the folder
    /// it was in (its label unless `labels.csv` names it). Returns the error, if any.
    #[wasm_bindgen(js_name = addImage)]
    pub fn add_image(
        &mut self,
        file: &str,
        folder: Option<String>,
        grey: &[u8],
        width: u32,
        height: u32,
    ) -> Option<String> {
        self.inner
            .add_image(
                file,
                folder.as_deref(),
                grey,
                width as usize,
                height as usize,
            )
            .err()
    }

    /// A CSV file of rows; returns the error, if any.
    #[wasm_bindgen(js_name = addCsv)]
    pub fn add_csv(&mut self, file: &str, bytes: &[u8]) -> Option<String> {
        self.inner.add_csv(file, bytes).err()
    }

    /// A UTF-8 text file; returns the error, if any.
    #[wasm_bindgen(js_name = addText)]
    pub fn add_text(&mut self, file: &str, bytes: &[u8]) -> Option<String> {
        self.inner.add_text(file, bytes).err()
    }

    /// What the files amount to, as JSON: `{files, samples, per_class: [[name, count]],
    /// skipped: [{file, reason}], more_skipped, min_samples}`.
    pub fn summary(&self) -> String {
        serde_json::to_string(&self.inner.summary()).unwrap_or_default()
    }
}
