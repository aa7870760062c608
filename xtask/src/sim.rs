//! `cargo xtask sim SCENARIO`: runs a swarm scenario (a TOML file; a bare name means
//! `scenarios/NAME.toml`) in the in-process simulator on the demo digits, prints accuracy
//! and bytes per peer over rounds, and writes `target/sim/NAME.json`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use shoal_shared::engine::train::Samples;
use shoal_shared::learn::sim::{self, Scenario};
use shoal_shared::task::TaskSpec;

use crate::{data, root};

/// The demo digits' training and test splits.
pub(crate) fn digits(root: &Path) -> Result<(Samples, Samples)> {
    let dir = data::prepare(root)?;
    let data = dir.parent().context("the data directory")?;
    let load = |split| Samples::read_split(data, "digits", split).map_err(anyhow::Error::msg);
    Ok((load("train")?, load("test")?))
}

/// A task of `tasks/`: its training and held-out data; its model becomes the scenario's
/// unless the scenario gives one.
fn task_data(root: &Path, name: &str, sc: &mut Scenario) -> Result<(Samples, Samples)> {
    let file = root.join("tasks").join(format!("{name}.toml"));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let task =
        TaskSpec::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if task.is_text() {
        crate::text::prepare(root)?;
    } else {
        data::prepare(root)?;
    }
    let (train, test) = task
        .load_datasets(&root.join("data"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    sc.model.get_or_insert(task.model);
    sc.validate()
        .map_err(|e| anyhow::anyhow!("scenario {} with task {name}: {e}", sc.name))?;
    Ok((Samples::from_dataset(&train), Samples::from_dataset(&test)))
}

/// Resolves a scenario argument to a file.
fn scenario_path(root: &Path, arg: &str) -> PathBuf {
    let p = PathBuf::from(arg);
    if p.exists() {
        p
    } else {
        root.join("scenarios").join(format!("{arg}.toml"))
    }
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let Some(arg) = args.first() else {
        let names: Vec<String> = std::fs::read_dir(root().join("scenarios"))?
            .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(String::from))
            .collect();
        bail!(
            "usage: cargo xtask sim SCENARIO (one of: {})",
            names.join(", ")
        );
    };
    let root = root();
    if arg == "privacy" {
        return privacy(&root);
    }
    let path = scenario_path(&root, arg);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut sc =
        Scenario::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let (train, test) = match sc.task.clone() {
        Some(name) => task_data(&root, &name, &mut sc)?,
        None => digits(&root)?,
    };
    println!(
        "scenario {}: {} peers, {} rounds, H = {}, {:?}, {:?}",
        sc.name,
        sc.peers,
        sc.rounds,
        sc.learn.local_steps,
        sc.learn.aggregation,
        sc.learn.compression
    );
    let t = std::time::Instant::now();
    let report = sim::run(&sc, &train, &test).map_err(anyhow::Error::msg)?;
    print_rows(&sc, &report);
    println!(
        "rejected: {:?}; models adopted {} (poisoned {}); model versions spread {} rounds; {:.1} s",
        report.rejected,
        report.adopted,
        report.poisoned_adoptions,
        report.version_spread,
        t.elapsed().as_secs_f64()
    );
    // A scenario with attackers is measured against itself with the attackers honest,
    // in the same invocation.
    let clean = if sc.attack.fraction > 0.0 {
        let c = sim::run(&sc.clean(), &train, &test).map_err(anyhow::Error::msg)?;
        println!(
            "with the attackers honest: final {:.2}%; under attack {:.2}% ({:+.2} points)",
            c.final_accuracy() * 100.0,
            report.final_accuracy() * 100.0,
            (report.final_accuracy() - c.final_accuracy()) * 100.0
        );
        Some(c)
    } else {
        None
    };
    // The run's ledger, written with the server's code, and its credits against what
    // each key really trained.
    let out = root.join("target/sim");
    std::fs::create_dir_all(&out)?;
    let entries = report.ledger(&out).with_context(|| {
        format!(
            "writing {}",
            out.join(format!("{}.ledger", sc.name)).display()
        )
    })?;
    let credits = report.credit_study(&entries);
    println!(
        "ledger: {} receipts ({:.1} per peer-round); honest credit / samples trained {:.2} (per key {:.2}-{:.2}); attackers' share of credit {:.3} ({:.2} of their samples); wrote {}",
        credits.receipts,
        credits.receipts as f64
            / (sc.peers as f64 * report.rows.last().map_or(1, |r| r.round.max(1)) as f64),
        credits.honest_ratio,
        credits.honest_range.0,
        credits.honest_range.1,
        credits.attacker_share,
        credits.attacker_ratio,
        out.join(format!("{}.ledger", sc.name)).display()
    );
    let summary = serde_json::json!({
        "credits": credits,
        "name": sc.name,
        "final_accuracy": report.final_accuracy(),
        "final_bits_per_byte": report.rows.last().and_then(|r| r.bits_per_byte),
        "rounds": report.rows.last().map_or(0, |r| r.round),
        "samples_to_target": report.samples_to_target,
        "time_to_target_s": report.time_to_target_s,
        "utilization": report.utilization,
        "utilization_by_peer": report.utilization_by_peer,
        "bytes_per_peer": report.final_bytes_per_peer(),
        "rejected_by_reason": report.rejected,
        "models_adopted": report.adopted,
        "poisoned_adoptions": report.poisoned_adoptions,
        "version_spread": report.version_spread,
        "clean_final_accuracy": clean.as_ref().map(|c| c.final_accuracy()),
        "clean_samples_to_target": clean.as_ref().map(|c| c.samples_to_target),
        "rows": report.rows,
    });
    let file = out.join(format!("{}.json", sc.name));
    std::fs::write(&file, serde_json::to_string_pretty(&summary)?)?;
    println!("wrote {}", file.display());
    Ok(())
}

/// `cargo xtask sim privacy`: `scenarios/privacy-8.toml` at epsilon 1, 4, 8, 64, 1,024 and
/// 10,000 (the
/// noise each needs over the scenario's rounds) and without privacy; prints accuracy
/// against epsilon and writes `target/sim/privacy.json`.
fn privacy(root: &Path) -> Result<()> {
    let path = root.join("scenarios/privacy-8.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let sc = Scenario::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let (train, test) = digits(root)?;
    let epsilons = [1.0, 4.0, 8.0, 64.0, 1024.0, 10_000.0];
    println!(
        "{}: {} peers, {} rounds, clip {}, delta {:e}; epsilon per peer over all its rounds",
        sc.name,
        sc.peers,
        sc.rounds,
        sc.privacy.clip.unwrap_or(0.0),
        sc.privacy.delta.unwrap_or(0.0)
    );
    let points = sim::privacy_sweep(&sc, &train, &test, &epsilons).map_err(anyhow::Error::msg)?;
    println!("  epsilon  noise multiplier  final accuracy  best accuracy");
    for p in &points {
        println!(
            "  {:>7}  {:>16}  {:>13.2}%  {:>12.2}%",
            p.epsilon.map_or("inf".into(), |e| format!("{e}")),
            p.noise_multiplier.map_or("-".into(), |z| format!("{z:.3}")),
            p.final_accuracy * 100.0,
            p.best_accuracy * 100.0
        );
    }
    let out = root.join("target/sim");
    std::fs::create_dir_all(&out)?;
    let file = out.join("privacy.json");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&serde_json::json!({
            "scenario": sc.name,
            "clip": sc.privacy.clip,
            "delta": sc.privacy.delta,
            "rounds": sc.rounds,
            "points": points,
        }))?,
    )?;
    println!("wrote {}", file.display());
    Ok(())
}

fn print_rows(sc: &Scenario, report: &sim::Report) {
    let text = sc.target_bits_per_byte.is_some();
    println!(
        "{:>6} {:>9} {:>10} {:>9} {:>8} {:>14} {:>5} {:>8} {:>6}",
        "round",
        "time s",
        "samples",
        if text { "bits/B" } else { "accuracy" },
        "loss",
        "bytes/peer",
        "live",
        "apart",
        "busy"
    );
    // `apart`: how far honest peers' models are from their mean, relative to its norm.
    for r in &report.rows {
        let quality = match r.bits_per_byte {
            Some(b) => format!("{b:.3}"),
            None => format!("{:.2}%", r.accuracy * 100.0),
        };
        println!(
            "{:>6} {:>9.1} {:>10} {:>9} {:>8.4} {:>14.0} {:>5} {:>7.3}% {:>5.1}%",
            r.round,
            r.time_s,
            r.samples,
            quality,
            r.loss,
            r.bytes_per_peer,
            r.live,
            r.disagreement * 100.0,
            r.utilization * 100.0
        );
    }
    let target = match sc.target_bits_per_byte {
        Some(b) => format!("{b:.2} bits/byte"),
        None => format!("{:.1}%", sc.target * 100.0),
    };
    match (
        report.samples_to_target,
        report.bytes_to_target,
        report.time_to_target_s,
    ) {
        (Some(s), Some(b), Some(t)) => {
            println!("target {target} reached after {s} samples, {b:.0} bytes per peer, {t:.1} s")
        }
        _ => println!("target {target} not reached"),
    }
    // `busy`: the honest peers' time training over their time online (utilization).
    let by_peer = &report.utilization_by_peer;
    let (slow, fast) = (
        by_peer.iter().min_by(|a, b| a.0.total_cmp(&b.0)),
        by_peer.iter().max_by(|a, b| a.0.total_cmp(&b.0)),
    );
    if let (Some(slow), Some(fast)) = (slow, fast) {
        println!(
            "utilization {:.1}% (slowest peer, {:.0} samples/s: {:.1}%; fastest, {:.0} samples/s: {:.1}%)",
            report.utilization * 100.0,
            slow.0,
            slow.1 * 100.0,
            fast.0,
            fast.1 * 100.0
        );
    }
}

/// `cargo xtask bench communication`: bytes each peer sends until the swarm reaches the
/// target accuracy (the `iid-8` scenario), Shoal's DiLoCo rounds with int8 and with
/// top-k 1% updates (int8 values; 2-bit values, as SparseLoCo sends them, at 1% and at
/// 2%: about the bytes of top-k 1% with int8) against exchanging full fp32 weights after
/// every step, as DISCO does (the same swarm with one local step per round and plain
/// averaging); and the same swarm in rounds sized in time (1 s) with the demo task's
/// exchange (weights changes, top-k 10% in 2 bits, an upload budget of 80 MB an hour)
/// and with the one before it (int8 weights).
pub(crate) fn communication(root: &Path) -> Result<serde_json::Value> {
    use serde_json::json;
    use shoal_shared::learn::{Aggregation, Compression, Exchange};

    let text = std::fs::read_to_string(root.join("scenarios/iid-8.toml"))?;
    let mut base = Scenario::from_toml(&text).map_err(anyhow::Error::msg)?;
    // Room for top-k, which needs more rounds than int8 to reach the target.
    base.rounds = 150;
    let (train, test) = digits(root)?;
    let mut disco = base.clone();
    disco.name = "disco-fp32-every-step".into();
    disco.learn.local_steps = 1;
    disco.learn.outer_lr = 1.0;
    disco.learn.outer_momentum = 0.0;
    disco.learn.aggregation = Aggregation::Mean;
    disco.learn.compression = Compression::None;
    // Shoal's samples again: one step per exchange learns slower, but not that much.
    disco.rounds = base.rounds * u64::from(base.learn.local_steps);
    disco.eval_every = u64::from(base.learn.local_steps);
    let mut int8 = base.clone();
    int8.name = "shoal-diloco-int8".into();
    int8.learn.compression = Compression::Int8 { block: 256 };
    let mut topk = base.clone();
    topk.name = "shoal-diloco-topk1%".into();
    topk.learn.compression = Compression::TopK { fraction: 0.01 };
    let two_bit = |fraction: f32, name: &str| {
        let mut sc = base.clone();
        sc.name = name.into();
        sc.learn.compression = Compression::TopK2Bit { fraction };
        sc
    };
    let (sparse1, sparse2) = (
        two_bit(0.01, "shoal-diloco-topk1%-2bit"),
        two_bit(0.02, "shoal-diloco-topk2%-2bit"),
    );
    let mut timed = base.clone();
    timed.name = "shoal-time-int8-weights".into();
    timed.learn.compression = Compression::Int8 { block: 256 };
    timed.learn.exchange = Exchange::Weights;
    timed.learn.round_ms = 1_000;
    timed.rounds = 30;
    let demo = shoal_shared::task::TaskSpec::digits().learn;
    let mut changes = timed.clone();
    changes.name = "shoal-time-demo-changes".into();
    changes.learn.compression = demo.compression;
    changes.learn.exchange = demo.exchange;
    changes.learn.round_ms = demo.round_ms;
    changes.learn.upload_mb_per_hour = demo.upload_mb_per_hour;

    let mut out = serde_json::Map::new();
    let mut bytes = Vec::new();
    println!(
        "{:<24} {:>12} {:>16} {:>10}",
        "", "samples", "bytes/peer", "accuracy"
    );
    for sc in [&disco, &int8, &topk, &sparse1, &sparse2, &timed, &changes] {
        let r = sim::run(sc, &train, &test).map_err(anyhow::Error::msg)?;
        let b = r.bytes_to_target;
        println!(
            "{:<24} {:>12} {:>16} {:>9.2}%",
            sc.name,
            r.samples_to_target.map_or("-".into(), |s| s.to_string()),
            b.map_or("not reached".into(), |b| format!("{b:.0}")),
            r.final_accuracy() * 100.0
        );
        bytes.push(b);
        out.insert(
            sc.name.clone(),
            json!({
                "samples_to_target": r.samples_to_target,
                "bytes_per_peer_to_target": b,
                "final_accuracy": r.final_accuracy(),
                "target": sc.target,
            }),
        );
    }
    // The fewest bytes of `runs` that reached the target, and `reference`'s over those.
    let fewest =
        |runs: &[Option<f64>]| runs.iter().flatten().copied().fold(f64::INFINITY, f64::min);
    let ratio_to_best = |reference: Option<f64>, runs: &[Option<f64>]| {
        let best = fewest(runs);
        match reference {
            Some(r) if best.is_finite() => json!(r / best),
            _ => serde_json::Value::Null,
        }
    };
    if let Some(d) = bytes[0] {
        let best = fewest(&bytes[1..5]);
        println!(
            "DISCO-style exchange sends {d:.0} bytes per peer to the target; Shoal's best {best:.0}"
        );
    }
    Ok(json!({
        "ratios": {
            "bytes-to-target-best": ratio_to_best(bytes[0], &bytes[1..5]),
            // Rounds in time as the demo runs them, and with int8 weights.
            "bytes-to-target-time": ratio_to_best(bytes[0], &bytes[6..7]),
            "bytes-to-target-time-int8": ratio_to_best(bytes[0], &bytes[5..6]),
            // Top-k with int8 values against the better of the 2-bit forms.
            "topk-2bit-vs-int8": ratio_to_best(bytes[2], &bytes[3..5]),
        },
        "runs": out,
    }))
}
