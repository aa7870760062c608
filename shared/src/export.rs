//! Model export as [safetensors](https://huggingface.co/docs/safetensors): an 8-byte
//! little-endian header length, a JSON header (each tensor's dtype, shape and byte range,
//! plus a `__metadata__` map of strings), then the raw little-endian data.
//!
//! Tensors are named as in the model's layout (`layer1.weight`, `layer1.bias`, ...) and
//! stored as f32: dense weights are `[inputs, outputs]`, convolution weights
//! `[kernel, kernel, in_channels, filters]` (NHWC activations). The metadata carries the
//! task, the model description (JSON) and how inputs are scaled, so that someone can run
//! the model without Shoal.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::engine::Model;
use crate::task::TaskSpec;

/// Serializes `params` (the model's flat parameter buffer) as safetensors with
/// `metadata` added to the header. Fails when `params` does not match the model.
pub fn safetensors(
    model: &Model,
    params: &[f32],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    if params.len() != model.param_len() {
        return Err(format!(
            "{} parameters for a model of {}",
            params.len(),
            model.param_len()
        ));
    }
    let mut header = Map::new();
    let mut meta: Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    meta.insert(
        "model".into(),
        Value::String(serde_json::to_string(&model.spec).unwrap_or_default()),
    );
    meta.insert("format".into(), Value::String("shoal".into()));
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut at = 0usize;
    for t in &model.tensors {
        let bytes = t.len() * 4;
        header.insert(
            t.name.clone(),
            json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [at, at + bytes] }),
        );
        at += bytes;
    }
    let mut head = Value::Object(header).to_string().into_bytes();
    // The data starts 8-byte aligned; the format pads the header with spaces.
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + at);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for t in &model.tensors {
        for v in &params[t.range()] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// A task's model as safetensors, with what someone needs to run it without Shoal in
/// the metadata: the task, the model version, the input scaling, the class count and,
/// when known, the held-out `(loss, accuracy)` Shoal measured for exactly these weights.
/// A language model's metadata also states its tokenization, its held-out split and the
/// constants of its math (the README's "Language models" gives the rest).
pub fn task_model(
    task: &TaskSpec,
    weights: &[f32],
    version: u64,
    evaluation: Option<(f32, f32)>,
    ledger_head: Option<&str>,
) -> Result<Vec<u8>, String> {
    let model = Model::new(task.model.clone()).map_err(|e| e.to_string())?;
    let mut meta = BTreeMap::from([
        ("task".to_string(), task.name.clone()),
        ("version".to_string(), version.to_string()),
    ]);
    let text = model.is_language_model();
    // A text task with a test file holds out every window of that file; one without, the
    // last windows of its text (a `holdout` of 0 for the first stated none at all).
    const WINDOWS: &str = "window i holds bytes i*context .. (i+1)*context, its labels the \
                           same positions shifted by one byte";
    let (held_out, holdout) = match task.data.test.as_ref().and_then(|f| f.text.as_deref()) {
        Some(file) => (
            format!("every window of the task's test file {file}; {WINDOWS}"),
            None,
        ),
        None => (
            format!("the last round(holdout * windows) windows of the text; {WINDOWS}"),
            Some(task.data.holdout.unwrap_or(0.0).to_string()),
        ),
    };
    let mut entries: Vec<(&str, String)> = if text {
        vec![
            (
                "input_scale",
                "token ids: the UTF-8 bytes of the text".into(),
            ),
            ("classes", "256".into()),
            ("context", model.positions().to_string()),
            ("held_out", held_out),
            (
                "layer_norm_eps",
                crate::engine::transformer::LN_EPS.to_string(),
            ),
            ("gelu", "tanh approximation".into()),
            (
                "attention",
                "pre-norm blocks; causal; scores q·k / sqrt(dim / heads); heads side by side"
                    .into(),
            ),
            (
                "layout",
                "row-major; y = x · W + b with W [inputs, outputs]".into(),
            ),
        ]
    } else {
        vec![
            ("input_scale", "pixels / 255, NHWC".into()),
            ("classes", task.data.classes.to_string()),
        ]
    };
    if let (true, Some(h)) = (text, holdout) {
        entries.push(("holdout", h));
    }
    // The classes' names where the task gives them (a local image task's), in class order.
    if let Some(names) = task
        .data
        .local
        .as_ref()
        .map(|l| &l.label_names)
        .filter(|n| !n.is_empty())
    {
        entries.push((
            "label_names",
            serde_json::to_string(names).map_err(|e| e.to_string())?,
        ));
    }
    meta.extend(entries.into_iter().map(|(k, v)| (k.to_string(), v)));
    if let Some((loss, accuracy)) = evaluation {
        meta.insert("test_accuracy".to_string(), accuracy.to_string());
        meta.insert("test_loss".to_string(), loss.to_string());
        if text {
            let bits = loss / std::f32::consts::LN_2;
            meta.insert("test_bits_per_byte".to_string(), bits.to_string());
        }
    }
    // What protected the contributors' data (differential privacy, or none).
    match task
        .privacy
        .resolve()
        .map_err(|(f, e)| format!("{f}: {e}"))?
    {
        Some(dp) => meta.extend([
            (
                "privacy".to_string(),
                "differential privacy per contributor: each update clipped and noised on the \
                 contributor's device before it left (Gaussian mechanism, RDP accountant)"
                    .to_string(),
            ),
            ("dp_epsilon".to_string(), dp.epsilon.to_string()),
            ("dp_delta".to_string(), dp.delta.to_string()),
            ("dp_clip".to_string(), dp.clip.to_string()),
            (
                "dp_noise_multiplier".to_string(),
                dp.noise_multiplier.to_string(),
            ),
            (
                "dp_rounds_per_contributor".to_string(),
                dp.rounds.to_string(),
            ),
            (
                "dp_on_budget".to_string(),
                match dp.on_budget {
                    crate::privacy::OnBudget::Stop => {
                        "stop: no contributor key sent more rounds; dp_epsilon bounds each key's \
                         updates"
                            .into()
                    }
                    crate::privacy::OnBudget::Warn => {
                        "warn: contributors may have sent more rounds and passed dp_epsilon"
                            .to_string()
                    }
                },
            ),
        ]),
        None => {
            meta.insert(
                "privacy".to_string(),
                "none: updates were sent as trained".to_string(),
            );
        }
    }
    if let Some(head) = ledger_head {
        // Provenance: the task's ledger (receipts of the contributions) as it stood.
        if head.len() != 64 || !head.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("ledger head: 64 hex digits".into());
        }
        meta.insert("ledger_head".to_string(), head.to_ascii_lowercase());
    }
    safetensors(&model, weights, &meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ModelSpec;

    #[test]
    fn header_names_every_tensor_and_ranges_tile_the_data() {
        let model = Model::new(ModelSpec::mlp_digits()).expect("model");
        let params = model.init_params(3);
        let meta = BTreeMap::from([("task".to_string(), "digits".to_string())]);
        let out = safetensors(&model, &params, &meta).expect("export");
        let n = u64::from_le_bytes(out[..8].try_into().expect("8 bytes")) as usize;
        assert!(n.is_multiple_of(8), "data aligned");
        let header: Value = serde_json::from_slice(&out[8..8 + n]).expect("json header");
        assert_eq!(header["__metadata__"]["task"], "digits");
        let data = &out[8 + n..];
        let mut end = 0;
        for t in &model.tensors {
            let h = &header[&t.name];
            assert_eq!(h["dtype"], "F32");
            let shape: Vec<usize> = serde_json::from_value(h["shape"].clone()).expect("shape");
            assert_eq!(shape, t.shape);
            let [a, b]: [usize; 2] =
                serde_json::from_value(h["data_offsets"].clone()).expect("offsets");
            assert_eq!((a, b - a), (end, t.len() * 4), "{}", t.name);
            end = b;
            let first = f32::from_le_bytes(data[a..a + 4].try_into().expect("4"));
            assert_eq!(first, params[t.offset], "{}", t.name);
        }
        assert_eq!(end, data.len(), "no gaps, nothing after");
        assert!(safetensors(&model, &params[1..], &meta).is_err());
    }

    /// The first `__metadata__` of an export of `task`'s initial weights.
    fn metadata(task: &crate::task::TaskSpec) -> Value {
        let weights = Model::new(task.model.clone())
            .expect("model")
            .init_params(1);
        let out = task_model(task, &weights, 3, None, None).expect("export");
        let n = u64::from_le_bytes(out[..8].try_into().expect("8 bytes")) as usize;
        let header: Value = serde_json::from_slice(&out[8..8 + n]).expect("json header");
        header["__metadata__"].clone()
    }

    /// What was held out, as the task holds it out: the last windows of the text, or a
    /// test file whole (an export said `holdout = 0`, none at all, for the second); and
    /// the classes' names where the task names them.
    #[test]
    fn the_export_states_the_held_out_split_and_the_class_names() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../tasks/fortunes.toml");
        let mut lm =
            crate::task::TaskSpec::from_toml(&std::fs::read_to_string(file).expect("read"))
                .expect("the demo language model");
        let m = metadata(&lm);
        assert_eq!(m["holdout"], "0.05", "{m}");
        assert!(
            m["held_out"]
                .as_str()
                .expect("stated")
                .starts_with("the last")
        );
        lm.data.holdout = None;
        lm.data.test = Some(crate::task::Files {
            text: Some("text/held-out.txt".into()),
            ..Default::default()
        });
        let m = metadata(&lm);
        assert!(m.get("holdout").is_none(), "{m}");
        assert!(
            m["held_out"]
                .as_str()
                .expect("stated")
                .contains("test file text/held-out.txt"),
            "{m}"
        );
        let mut local = crate::task::TaskSpec::digits();
        let names: Vec<String> = (0..10).map(|i| format!("class {i}")).collect();
        local.data.local = Some(crate::local::LocalSpec {
            kind: crate::local::LocalKind::Images,
            max_files: 10,
            max_file_bytes: 1 << 20,
            label_names: names.clone(),
        });
        let m = metadata(&local);
        let back: Vec<String> =
            serde_json::from_str(m["label_names"].as_str().expect("stated")).expect("json");
        assert_eq!(back, names);
        assert!(
            metadata(&crate::task::TaskSpec::digits())
                .get("label_names")
                .is_none()
        );
    }

    #[test]
    fn the_export_states_the_privacy_it_was_trained_under() {
        let mut task = crate::task::TaskSpec::digits();
        let meta = metadata;
        assert!(
            meta(&task)["privacy"]
                .as_str()
                .expect("stated")
                .starts_with("none")
        );
        task.privacy = crate::privacy::PrivacySpec {
            clip: Some(0.5),
            epsilon: Some(8.0),
            delta: Some(1e-5),
            rounds: Some(300),
            ..Default::default()
        };
        let m = meta(&task);
        let eps: f64 = m["dp_epsilon"]
            .as_str()
            .expect("epsilon")
            .parse()
            .expect("number");
        assert!(eps <= 8.0 && eps > 7.9, "{m}");
        assert_eq!(m["dp_delta"], "0.00001");
        assert_eq!(m["dp_rounds_per_contributor"], "300");
        assert!(
            m["dp_on_budget"]
                .as_str()
                .expect("stated")
                .starts_with("stop")
        );
    }
}
