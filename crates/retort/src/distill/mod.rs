//! Distillation: objectives, divergences and the trainer.

pub mod divergence;
pub mod teacher;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod objective;
pub mod trainer;

pub use config::{DistillOptions, Objective};
pub use trainer::{DistillSummary, TrainedStudent, distill, distill_trained};
