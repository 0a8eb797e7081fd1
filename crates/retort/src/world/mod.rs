//! The synthetic reasoning world behind `retort demo` (DESIGN.md §6): multi-step arithmetic word
//! problems with difficulty levels ([`problems`]), a teacher solution style with every
//! intermediate result and a terser base-student style ([`styles`]).

pub mod eval;
pub mod problems;
pub mod styles;
pub mod tokenizer;
pub mod train;

pub use eval::accuracy;
pub use problems::{Op, WorldProblem, generate_problems};
pub use styles::{student_corpus, teacher_solution, terse_solution};

/// The end-of-text token that ends every solution.
pub const EOS: &str = "<|endoftext|>";
