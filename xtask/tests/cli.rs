//! The task runner's command line, as a user meets it: help exits 0, every command has
//! its own help, and unknown commands, flags and parts are errors (exit 2 or 1 with a
//! message), all before anything is built.

use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("xtask runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_is_an_answer_not_an_error() {
    for args in [&["--help"][..], &["-h"], &["help"]] {
        let o = xtask(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        for command in ["run", "test", "peer", "bench", "sim"] {
            assert!(out.contains(command), "{args:?} lists {command}: {out}");
        }
    }
    // Without a command: the usage, as an error.
    let o = xtask(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("usage"), "{}", text(&o));
}

#[test]
fn every_command_has_its_own_help() {
    for (command, says) in [
        ("run", "--port"),
        ("test", "e2e"),
        ("bench", "NAME"),
        ("sim", "SCENARIO"),
        ("data", "digits"),
        ("build-web", "wasm"),
    ] {
        for args in [vec![command, "--help"], vec!["help", command]] {
            let o = xtask(&args);
            assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(out.contains(says), "{args:?} says {says}: {out}");
        }
    }
}

#[test]
fn unknown_commands_flags_and_parts_are_errors() {
    let o = xtask(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("no command \"frobnicate\""),
        "{}",
        text(&o)
    );
    let o = xtask(&["run", "--prot", "9000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("unknown option --prot"), "{}", text(&o));
    let o = xtask(&["test", "everything"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("unknown part \"everything\""),
        "{}",
        text(&o)
    );
    let o = xtask(&["data", "--force"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("takes no arguments"), "{}", text(&o));
}
