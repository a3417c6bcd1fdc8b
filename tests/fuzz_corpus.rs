//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same checks the
//! libFuzzer targets run, on stable, in every `cargo test`: each interesting input a fuzzing
//! run found stays a regression test. New inputs come from `cargo +nightly fuzz run TARGET`
//! (see `fuzz/README.md`).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

#[test]
fn every_corpus_input_passes_its_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in checks::TARGETS {
        let dir = root.join(target);
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}; every target keeps a corpus", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        assert!(!inputs.is_empty(), "{} is empty", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
                std::panic::resume_unwind(Box::new(format!(
                    "{}: {:?}",
                    input.display(),
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or(panic.downcast_ref::<&str>().copied())
                )));
            }
        }
    }
}
