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
        for command in ["run", "test", "peer", "bench", "sim", "ledger"] {
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
        ("ledger", "--credits"),
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

#[test]
fn ledger_verify_exits_0_for_a_valid_ledger_and_1_naming_the_first_bad_entry() {
    use shoal_shared::learn::identity::Identity;
    use shoal_shared::trust::ledger::LedgerFile;
    use shoal_shared::trust::receipt::{Receipt, sha256};

    let dir = std::env::temp_dir().join(format!("shoal-cli-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut l, _) = LedgerFile::open(&dir, "digits", 1).expect("open");
    let key = |seed: u8| Identity::from_seed([seed; 32]);
    for receiver in [1, 3] {
        let r = Receipt::sign(
            &key(receiver),
            "digits",
            5,
            key(2).public(),
            64,
            sha256(b"u"),
            0,
        );
        l.append(100, 2, "", &r.encode()).expect("append");
    }
    let path = l.path().to_path_buf();
    drop(l);
    let file = path.to_str().expect("a UTF-8 path");

    let o = xtask(&["ledger", "verify", file, "--credits"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("2 entries, head "), "{}", text(&o));
    assert!(text(&o).contains("(none)"), "{}", text(&o));

    let mut bytes = std::fs::read(&path).expect("file");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    let o = xtask(&["ledger", "verify", file]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("entry 1 at byte"), "{}", text(&o));

    for (args, says) in [
        (&["ledger"][..], "usage"),
        (&["ledger", "check", file], "no ledger command"),
        (&["ledger", "verify"], "usage"),
        (
            &["ledger", "verify", file, "--credit"],
            "unknown option --credit",
        ),
        (
            &["ledger", "verify", "/nonexistent/x.ledger"],
            "could not read",
        ),
    ] {
        let o = xtask(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(says), "{args:?}: {}", text(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
