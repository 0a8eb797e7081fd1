//! Distillation: the run's options and plan, objectives, divergences and the trainer.
//!
//! [`DistillOptions`] (flags and TOML) → [`DistillOptions::resolve`] → [`plan::DistillPlan`] →
//! [`trainer::distill`] (a prepared [`trainer::Run`] and a loop of steps).

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod divergence;
pub mod held_out;
pub mod lora;
pub mod objective;
pub mod plan;
pub mod resume;
pub mod teacher;
pub mod trainer;

pub use config::{DistillOptions, Objective, OnPolicyLoss};
pub use divergence::DivergenceKind;
pub use plan::DistillPlan;
pub use trainer::{DistillSummary, TrainedStudent, distill, distill_trained};
