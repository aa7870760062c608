//! The accountant against an established implementation: Google's `dp-accounting` from
//! PyPI (installed by `cargo xtask test` into `target/py`) must give the same epsilon,
//! within 1%, over a grid of noise multipliers, sampling rates, round counts and deltas.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use shoal_shared::privacy;

fn python() -> PathBuf {
    let p = std::env::var("SHOAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py/bin/python").into());
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask test` (it installs dp-accounting from PyPI)",
        p.display()
    );
    p
}

#[test]
fn epsilon_agrees_with_dp_accounting_within_one_percent() {
    let mut cases = Vec::new();
    for z in [0.6, 0.8, 1.0, 1.5, 3.0, 10.0] {
        for q in [0.001, 0.01, 0.1, 0.5, 1.0] {
            for rounds in [1u64, 10, 100, 1_000, 10_000] {
                for delta in [1e-5, 1e-7] {
                    cases.push((z, q, rounds, delta));
                }
            }
        }
    }
    let input: Vec<(f64, f64, u64, f64)> = cases.clone();
    let mut child = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/epsilon_reference.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&input).expect("json").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python ends");
    assert!(
        out.status.success(),
        "epsilon_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<Option<f64>> = serde_json::from_slice(&out.stdout).expect("their json");
    assert_eq!(theirs.len(), cases.len());
    let mut worst = (0.0f64, cases[0]);
    let mut compared = 0;
    for (&(z, q, rounds, delta), their) in cases.iter().zip(&theirs) {
        let ours = privacy::epsilon(z, q, rounds, delta);
        let Some(their) = *their else {
            assert!(
                ours.is_infinite(),
                "{z} {q} {rounds} {delta}: ours {ours}, theirs inf"
            );
            continue;
        };
        let gap = if their < 1e-3 {
            (ours - their).abs()
        } else {
            (ours / their - 1.0).abs()
        };
        assert!(
            gap <= 0.01,
            "z {z}, q {q}, {rounds} rounds, delta {delta}: ours {ours}, dp-accounting {their}"
        );
        compared += 1;
        if gap > worst.0 {
            worst = (gap, (z, q, rounds, delta));
        }
    }
    assert!(
        compared >= cases.len() * 9 / 10,
        "only {compared} finite cases"
    );
    println!(
        "{compared} cases agree with dp-accounting; largest relative gap {:.2e} at {:?}",
        worst.0, worst.1
    );
}
