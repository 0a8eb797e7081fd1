//! Distillation: objectives, divergences and the trainer.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod divergence;
pub mod lora;
pub mod objective;
pub mod teacher;
pub mod trainer;

pub use config::{DistillOptions, Objective, OnPolicyLoss};
pub use trainer::{DistillSummary, TrainedStudent, distill, distill_trained};
