//! Benchmarks: one engine for `wattn bench` (prefill), `wattn bench --backward`, `wattn bench --decode`, `wattn stream`
//! and `wattn peak`, shared with the criterion benches (`benches/attention.rs`).
//!
//! - [`engine`]: the run loop (check, warm up, repeat, median), the time budget and its
//!   estimator, the validation rule.
//! - [`workload`]: the prefill problems, their FLOP and memory accounting, the grids.
//! - [`prefill`]: the flash kernel against the naive baseline, block-sparse against dense.
//! - [`backward`]: the flash backward against the forward of the same problem.
//! - [`decode`]: split-KV decode against the unsplit kernel over cache lengths.
//! - [`serve`]: a server's batch of mixed-length requests, paged against padded and per request.
//! - [`varlen`]: a server's batch of mixed-length prompts, one varlen launch against padded
//!   and per prompt.
//! - [`stream`]: a token stream through the KV cache, per-token time against position.
//! - [`Timer`] and [`Stats`] (from the library's [`crate::timing`]): GPU timestamps (or the wall
//!   clock) around recorded work; median, min, max.
//! - [`peak`]: the adapter's FMA and copy-bandwidth ceilings.
//! - `report`: provenance and the rows written to JSON and CSV; `plot`: SVG; `progress`: the
//!   progress bar (crate-private: only the `wattn` command uses them).

pub mod backward;
pub mod decode;
pub mod engine;
pub mod peak;
pub(crate) mod plot;
pub mod prefill;
pub(crate) mod progress;
pub(crate) mod report;
pub mod serve;
pub mod stream;
pub mod varlen;
pub mod workload;

pub use crate::timing::{Clock, Stats, Timer};
pub use workload::{Path, Problem, Workload};
