//! Types and pure logic shared by the kernel programs (`detector-ebpf`) and
//! the daemon (`detector`).
//!
//! Everything that crosses the kernel/user boundary is `#[repr(C)]`, made only
//! of integers and byte arrays (so every bit pattern is a valid value), and
//! has explicit padding so both sides agree on the layout.
#![no_std]

pub mod event;
pub mod maps;
pub mod verdict;

pub use event::*;
pub use maps::*;
pub use verdict::*;
