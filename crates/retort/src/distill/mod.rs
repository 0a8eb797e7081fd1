//! Distillation: objectives, divergences and the trainer.

pub mod divergence;
pub mod teacher;
