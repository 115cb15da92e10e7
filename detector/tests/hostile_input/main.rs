//! Hostile input: property tests ("fuzz targets" on the stable compiler) of
//! the three parsers that read what an attacker or a mistaken operator
//! controls — intent files, the daemon's config file, and kernel event
//! records — each for a bounded time (`DETECTOR_FUZZ_SECS`, see
//! [`harness`]).
//!
//! Each target generates structured inputs (valid documents from a small
//! grammar, then mutations of them), not only random bytes, and checks:
//! no panic; bounded memory and time per input; every error carries its
//! file and line (YAML) or names its field (records); valid inputs are
//! accepted and give back the values they were built from.

mod config;
mod events;
mod harness;
mod intent;
mod yamlgen;

#[global_allocator]
static ALLOC: harness::CountingAlloc = harness::CountingAlloc;
