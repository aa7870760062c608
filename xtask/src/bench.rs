//! `cargo xtask bench NAME`: benchmarks that print a table and write
//! `target/bench/NAME.json` with a top-level `ratios` object (Shoal relative to the named
//! competitor, higher is better) beside the raw medians.

use anyhow::{Result, bail};

/// Every benchmark this runner knows.
pub(crate) const NAMES: [&str; 0] = [];

pub(crate) fn run(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        bail!(
            "usage: cargo xtask bench NAME (one of: {})",
            NAMES.join(", ")
        );
    };
    bail!("unknown benchmark {name:?}; known: {}", NAMES.join(", "))
}
