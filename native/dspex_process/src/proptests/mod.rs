//! Property tests (proptest) of the pure logic: the `/proc/PID/stat` parser, the marker
//! parser and the registry core against a model.
//!
//! Every property runs a fixed number of cases from a seed that it prints (`cargo test`
//! shows it when the property fails, with the shrunk input) and that
//! `DSPEX_PROPTEST_SEED=N` replays. Nothing is written to the source tree.

mod markers;
mod registry;
mod stat;

use proptest::prelude::{any, Strategy};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseResult, TestRng, TestRunner};
use std::hash::{BuildHasher, Hasher};

/// Runs `test` on `cases` values of `strategy`; panics with the seed and the shrunk input.
pub(crate) fn check<S>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> TestCaseResult,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let seed = match std::env::var("DSPEX_PROPTEST_SEED") {
        Ok(text) => text
            .parse::<u64>()
            .expect("DSPEX_PROPTEST_SEED must be a u64"),
        Err(_) => std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish(),
    };
    println!("proptest {name}: {cases} cases, seed {seed} (rerun with DSPEX_PROPTEST_SEED={seed})");

    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut config = Config::with_cases(cases);
    config.failure_persistence = None;
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
    if let Err(failure) = TestRunner::new_with_rng(config, rng).run(&strategy, test) {
        panic!("proptest {name}, seed {seed} (rerun with DSPEX_PROPTEST_SEED={seed}): {failure}");
    }
}

/// Bytes of which about half are drawn from `special` (the bytes that matter to a parser),
/// the rest from anything but `excluded`. One vector of `u8`, cheap to generate and shrink.
pub(crate) fn bytes_with(
    special: &'static [u8],
    excluded: &'static [u8],
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<(bool, u8)>(), len).prop_map(move |picks| {
        picks
            .into_iter()
            .map(|(pick_special, b)| {
                if pick_special {
                    special[usize::from(b) % special.len()]
                } else if excluded.contains(&b) {
                    special[0]
                } else {
                    b
                }
            })
            .collect()
    })
}
