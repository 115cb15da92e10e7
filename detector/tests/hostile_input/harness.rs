//! A time-bounded property-test loop with a per-input memory and time
//! guard.
//!
//! proptest's own runner stops after a number of cases; here each target
//! runs for a time budget instead, so `cargo xtask test` stays bounded
//! whatever the machine: `DETECTOR_FUZZ_SECS` seconds per target (default
//! [`DEFAULT_SECS`]). Each run draws a fresh seed (printed);
//! `DETECTOR_FUZZ_SEED=N` replays one. A failure is shrunk by proptest to a
//! small input, which is printed for a regression test.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    fmt::Debug,
    time::{Duration, Instant},
};

use proptest::{
    strategy::Strategy,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner},
};

pub const DEFAULT_SECS: f64 = 10.0;

/// Memory one input may make a parser hold at once. Generated inputs are at
/// most a few hundred KiB; an alias bomb that expanded would need gigabytes.
pub const MAX_CASE_BYTES: isize = 64 << 20;

/// Time one input may take: far beyond what any input needs (milliseconds),
/// only there to turn a hang or a blow-up into a failure with its input.
pub const MAX_CASE_TIME: Duration = Duration::from_secs(10);

/// Counts the bytes each thread holds, for the memory guard.
pub struct CountingAlloc;

thread_local! {
    // const-initialized and without Drop: touching them never allocates.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now)
            }
        });
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; only
// thread-local counters are updated besides.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Run `f`; return its result and the most bytes it held at once beyond
/// what the thread held before.
pub fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    (out, PEAK.with(Cell::get) - start)
}

pub fn budget() -> Duration {
    let secs = std::env::var("DETECTOR_FUZZ_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_SECS);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    if let Some(s) = std::env::var("DETECTOR_FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return s;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

/// Check `test` on inputs drawn from `strategy` for [`budget`] (at least
/// one input), each under the memory and time guard. Panics with the
/// shrunk failing input.
pub fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed();
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    // Targets started with the same seed still draw different inputs.
    for (i, b) in name.bytes().enumerate() {
        key[8 + i % 24] ^= b;
    }
    let config = Config {
        failure_persistence: None,
        // Shrinking is bounded too (ms).
        max_shrink_time: 120_000,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let guarded = |input: S::Value| -> Result<(), TestCaseError> {
        let t0 = Instant::now();
        let (result, peak) = peak_bytes(|| test(input));
        let took = t0.elapsed();
        result?;
        if peak > MAX_CASE_BYTES {
            return Err(TestCaseError::fail(format!(
                "held {peak} bytes at once (limit {MAX_CASE_BYTES})"
            )));
        }
        if took > MAX_CASE_TIME {
            return Err(TestCaseError::fail(format!(
                "took {took:?} (limit {MAX_CASE_TIME:?})"
            )));
        }
        Ok(())
    };
    let t0 = Instant::now();
    let deadline = t0 + budget();
    let mut cases = 0u64;
    while cases == 0 || Instant::now() < deadline {
        let tree = strategy
            .new_tree(&mut runner)
            .unwrap_or_else(|e| panic!("{name}: cannot generate an input: {e}"));
        match runner.run_one(tree, guarded) {
            Ok(_) => cases += 1,
            Err(TestError::Fail(why, input)) => panic!(
                "{name}: {why}\n(seed {seed}: replay with DETECTOR_FUZZ_SEED={seed})\nminimal input: {input:#?}"
            ),
            Err(TestError::Abort(why)) => panic!("{name}: aborted: {why} (seed {seed})"),
        }
    }
    eprintln!(
        "hostile_input {name}: {cases} inputs in {:.1} s, seed {seed}",
        t0.elapsed().as_secs_f64()
    );
}

/// `Err(TestCaseError)` unless `cond`.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(proptest::test_runner::TestCaseError::fail(format!($($fmt)+)));
        }
    };
}
