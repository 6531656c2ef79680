//! WebSocket conformance: the `ws_echo` example (built on `wsnic::ws`) against the Autobahn
//! TestSuite cases of sections 1–7, 9 and 10, driven by `kosoku` (PyPI), which `.ci/run`
//! installs. Traffic stays on loopback.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The example as `cargo test` builds it beside this test; when only this test was built
/// (`cargo test --test autobahn`), build it in a target directory of its own (the outer
/// cargo holds the lock on ours).
fn example_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples/ws_echo");
    if bin.exists() {
        return bin;
    }
    let target = profile_dir.parent().unwrap().join("autobahn");
    let ok = Command::new(env!("CARGO"))
        .args(["build", "--release", "--example", "ws_echo", "--target-dir"])
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(ok.success(), "building the ws_echo example failed");
    target.join("release/examples/ws_echo")
}

#[test]
fn autobahn_sections_1_to_7_9_10() {
    let bin = example_bin();
    let mut echo = Command::new(&bin).arg("127.0.0.1:0").stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(echo.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();

    let out = std::env::temp_dir().join(format!("wsnic-autobahn-{}", std::process::id()));
    let mut cmd = Command::new("kosoku");
    cmd.arg("-o").arg(&out);
    for s in ["1", "2", "3", "4", "5", "6", "7", "9", "10"] {
        cmd.args(["-i", &format!("{s}.*")]);
    }
    let status = cmd.arg(format!("ws://{addr}")).status();
    let _ = echo.kill();
    let _ = echo.wait();
    let status = status.expect("kosoku not found: install it with `pip install kosoku` (.ci/run does)");
    assert!(status.success(), "kosoku failed: {status}");

    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains("_case_") && name.ends_with(".json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let behavior =
                text.split("\"behavior\":").nth(1).and_then(|r| r.split('"').nth(1)).unwrap_or("?").to_string();
            *counts.entry(behavior).or_default() += 1;
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
    println!("Autobahn behaviours: {counts:?}");
    let total: usize = counts.values().sum();
    assert!(total >= 300, "only {total} cases ran: {counts:?}");
    assert_eq!(counts.get("FAILED"), None, "{counts:?}");
    assert_eq!(counts.get("?"), None, "{counts:?}");
}
