//! Benchmarks: the workloads, GPU timing and statistics shared by `wattn bench`,
//! `wattn peak` and the criterion benches (`benches/attention.rs`).
//!
//! - [`workload`]: the problems timed, their FLOP and memory accounting, the grids.
//! - [`timing`]: GPU timestamps (or the wall clock) around recorded work; [`stats`]: median, min, max.
//! - [`peak`]: the adapter's FMA and copy-bandwidth ceilings.
//! - [`runner`]: validate each point, then time the flash and naive paths within a time budget.
//! - [`decode`]: split-KV decode against the unsplit kernel over cache lengths (`wattn bench --decode`).
//! - [`report`], [`plot`], [`progress`]: tables, JSON, CSV, SVG and the progress bar.

pub mod decode;
pub mod peak;
pub mod plot;
pub mod progress;
pub mod report;
pub mod runner;
pub mod stats;
pub mod stream;
pub mod timing;
pub mod workload;

pub use stats::Stats;
pub use timing::{Clock, Timer};
pub use workload::{Grid, Path, Problem, Workload};
