//! Replays the fuzz corpus on stable, in the normal test suite: every committed seed
//! and regression input in `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`
//! goes through the same target body as under libFuzzer (`fuzz/src/lib.rs`), then a
//! bounded number of deterministic mutations of them. A crash the fuzzer found is
//! kept by adding its input to `fuzz/regressions/<target>/`.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).expect("read corpus file");
            (p, b)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn committed_seeds_and_regressions_pass() {
    let mut n = 0;
    for t in targets::TARGETS {
        let seeds = inputs("corpus", t);
        assert!(!seeds.is_empty(), "no seed corpus for {t}");
        for (path, bytes) in seeds.iter().chain(&inputs("regressions", t)) {
            eprintln!("{t}: {}", path.display());
            targets::run(t, bytes);
            n += 1;
        }
    }
    eprintln!("{n} inputs replayed");
}

#[test]
fn generated_seeds_match_every_target() {
    for (t, bytes) in targets::seeds() {
        assert!(targets::TARGETS.contains(&t), "{t}");
        targets::run(t, &bytes);
    }
}

/// A few thousand mutations of the seeds per run: byte flips, inserts, deletes,
/// truncation and splices, from a fixed seed so a failure reproduces.
#[test]
fn mutated_seeds_do_not_panic() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let seeds = targets::seeds();
    for t in targets::TARGETS {
        let mine: Vec<&Vec<u8>> = seeds
            .iter()
            .filter(|(n, _)| n == t)
            .map(|(_, b)| b)
            .collect();
        for _ in 0..400 {
            let mut b = mine[(next() as usize) % mine.len()].clone();
            for _ in 0..1 + next() % 4 {
                let at = if b.is_empty() {
                    0
                } else {
                    (next() as usize) % b.len()
                };
                match next() % 5 {
                    0 if !b.is_empty() => b[at] ^= 1 << (next() % 8),
                    1 => b.insert(at, next() as u8),
                    2 if !b.is_empty() => {
                        b.remove(at);
                    }
                    3 => b.truncate(at),
                    _ => {
                        let other = mine[(next() as usize) % mine.len()];
                        let from = (next() as usize) % (other.len() + 1);
                        b.splice(at..at, other[from..].iter().copied().take(64));
                    }
                }
            }
            targets::run(t, &b);
        }
    }
}
