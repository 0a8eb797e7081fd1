//! Opening a [`Backend`] from a model spec (DESIGN.md §2 "Model specs").

use std::time::Duration;

use super::Backend;
use super::local::LocalBackend;
use super::openai::{OpenAiBackend, OpenAiOptions};
use crate::error::Result;

/// How to reach a model.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Rows decoded together by a local model.
    pub batch_size: usize,
    /// Requests in flight at once to a server.
    pub concurrency: usize,
    /// Per-attempt timeout for a server.
    pub timeout: Duration,
    /// Retries of a failed server request.
    pub max_retries: usize,
    /// First retry delay (doubles per retry).
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            concurrency: 64,
            timeout: Duration::from_secs(600),
            max_retries: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Opens `spec`: `openai:URL#MODEL` for a server, otherwise a local model (a folder,
/// `hf:ORG/NAME[@REV]`, or `world:teacher` / `world:student`).
pub fn open_backend(spec: &str, options: &BackendOptions) -> Result<Box<dyn Backend>> {
    if spec.starts_with("openai:") {
        let openai = OpenAiOptions {
            concurrency: options.concurrency,
            timeout: options.timeout,
            max_retries: options.max_retries,
            backoff_base: options.backoff_base,
            backoff_max: options.backoff_max,
            ..OpenAiOptions::default()
        };
        Ok(Box::new(OpenAiBackend::new(spec, openai)?))
    } else {
        Ok(Box::new(open_local(spec, options.batch_size)?))
    }
}

/// Opens a local model spec, resolving `world:NAME` to the bundled demo models.
pub fn open_local(spec: &str, batch_size: usize) -> Result<LocalBackend> {
    let path = resolve_local_spec(spec);
    let mut backend = LocalBackend::load(&path, batch_size)?;
    backend.set_name(spec);
    Ok(backend)
}

/// `world:NAME` → the bundled `assets/world/NAME` folder (beside the executable's workspace, or
/// `RETORT_WORLD_DIR`); anything else unchanged.
pub fn resolve_local_spec(spec: &str) -> String {
    match spec.strip_prefix("world:") {
        Some(name) => {
            let base = std::env::var("RETORT_WORLD_DIR").unwrap_or_else(|_| {
                concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/world").to_string()
            });
            format!("{base}/{name}")
        }
        None => spec.to_string(),
    }
}
