//! The fuzz targets' inputs, replayed on stable Rust as ordinary tests:
//! the seed corpus (`fuzz/corpus/TARGET/seed-N`, written from
//! `fuzzing::seeds` with `UPDATE_SEEDS=1`) and every input a fuzzing run
//! found that crashed (`fuzz/regressions/TARGET/`).

use std::path::{Path, PathBuf};

use outpost_coordinator::fuzzing::{TARGETS, seeds};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

#[test]
fn the_seed_corpus_matches_the_seeds() {
    let update = std::env::var_os("UPDATE_SEEDS").is_some();
    for (target, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "{target} has no seeds");
        for (i, seed) in seeds.iter().enumerate() {
            let path = dir.join(format!("seed-{i}"));
            if update {
                std::fs::create_dir_all(&dir).expect("mkdir");
                std::fs::write(&path, seed).expect("write a seed");
            } else {
                let stored = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_SEEDS=1", path.display()));
                assert_eq!(
                    &stored,
                    seed,
                    "{} is stale; run with UPDATE_SEEDS=1",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn every_corpus_and_regression_input_replays() {
    let mut replayed = 0;
    for (target, run) in TARGETS {
        for kind in ["corpus", "regressions"] {
            let dir = fuzz_dir().join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let data = std::fs::read(&path).expect("read an input");
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(outcome.is_ok(), "{target} fails on {}", path.display());
                replayed += 1;
            }
        }
    }
    assert!(replayed >= TARGETS.len(), "only {replayed} inputs replayed");
}
