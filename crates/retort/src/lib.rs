//! The reasoning-distillation pipeline as a library.
