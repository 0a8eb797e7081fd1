//! Causal language models from Hugging Face folders on candle.
//!
//! [`load`] reads a folder (or `hf:ORG/NAME[@REV]` from the local hub cache) into a
//! [`LoadedModel`]: the network ([`CausalLm`], one file per architecture under [`models`]), its
//! [`ModelConfig`], [`Tokenizer`] with [`ChatTemplate`], and [`GenerationConfig`]. On top sit
//! [`score_batch`] (per-token log-probs, left-padded batches) and [`generate`] (decoding on the
//! continuous-batching [`engine`] over a block key/value cache, batch-invariant). The forward is built from differentiable ops only, so the
//! same model trains.

pub mod autocast;
pub mod chat_template;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod hub;
pub mod kernels;
pub mod kv_cache;
pub mod load;
pub mod lora;
pub mod models;
pub mod sampling;
pub mod save;
pub mod score;
pub mod tokenizer;
pub mod train;

pub use chat_template::ChatTemplate;
pub use config::{Architecture, GenerationConfig, ModelConfig, RopeScaling};
pub use engine::{EngineOptions, EngineStats, Request};
pub use error::{Error, Result};
pub use generate::{FinishReason, Generated, GenerationParams, generate, generate_all};
pub use kv_cache::KvCache;
pub use load::{LoadOptions, LoadedModel, load, load_trainable, load_trainable_with};
pub use models::CausalLm;
pub use sampling::SamplingParams;
pub use score::{PaddedBatch, score_batch, token_logprobs_from_logits};
pub use tokenizer::Tokenizer;
