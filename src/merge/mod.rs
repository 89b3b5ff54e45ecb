//! Merges as variants: mergekit 0.1.5's configuration and methods, computed in Rust.
//!
//! `config` parses mergekit's YAML (and the CLI's short form) strictly into a [`MergeConfig`];
//! `params` resolves per-tensor parameters (scalars, layer gradients, filters) as mergekit does;
//! `plan` turns a config and the parents' tensor lists into one [`TensorRecipe`] per output
//! tensor — its inputs, and a `compute::mergekit::TensorMerge` holding only numbers. The kernels
//! (`compute::mergekit`) split each method into whole-tensor statistics, computed once, and an
//! elementwise `apply` over any element range, so a merged tensor is served chunk by chunk;
//! `stats_file` is the stored form of those statistics (`llmfs merge` computes them once and
//! stores them with the entry).

pub mod config;
pub mod params;
pub mod plan;
pub mod stats_file;

pub use crate::compute::mergekit::{Kernel, Stats, TensorMerge};
pub use config::{MergeConfig, Method};
pub use plan::{plan, plan_with_threads, MergePlan, ModelTensors, TensorInput, TensorRecipe};

/// A merge that cannot be planned: one line naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("merge config: {0}")]
    Config(String),
    #[error(transparent)]
    Kernel(#[from] crate::compute::mergekit::KernelError),
}
