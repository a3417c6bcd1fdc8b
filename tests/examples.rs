//! Every config file in `examples/` passes `amb check` once its certificate directory holds a
//! real PKI: the deployment examples match the CLI exactly.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn tomls(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            tomls(&path, found);
        } else if path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
}

#[test]
fn every_example_config_passes_amb_check() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut found = Vec::new();
    tomls(&examples, &mut found);
    assert!(found.len() >= 5, "example configs: {found:?}");
    let pki = Pki::new();
    for example in found {
        let text = std::fs::read_to_string(&example).unwrap();
        assert!(
            text.contains("/etc/amb/certs"),
            "{}: certs-dir",
            example.display()
        );
        let text = text.replace("/etc/amb/certs", &pki.path("").display().to_string());
        let copy = pki.path("example.toml");
        std::fs::write(&copy, text).unwrap();
        let out = Command::new(AMB)
            .args(["check", "--config"])
            .arg(&copy)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            example.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
