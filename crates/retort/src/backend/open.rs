//! Opening a [`Backend`] from a model spec (DESIGN.md §2 "Model specs").

use std::time::Duration;

use super::Backend;
use super::local::LocalBackend;
use super::openai::{ApiKey, OpenAiBackend, OpenAiOptions};
use crate::error::Result;
use crate::model_spec::ModelSpec;

/// How to reach a model.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Sequences in flight for a local model (0: the engine's default).
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
    /// A server's API key (default: from `RETORT_API_KEY` or `OPENAI_API_KEY`).
    pub api_key: Option<ApiKey>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            batch_size: 0,
            concurrency: 64,
            timeout: Duration::from_secs(600),
            max_retries: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            api_key: None,
        }
    }
}

/// Opens `spec`: a server for `openai:URL#MODEL`, otherwise the local model.
pub fn open_backend(spec: &ModelSpec, options: &BackendOptions) -> Result<Box<dyn Backend>> {
    match spec {
        ModelSpec::Server(server) => {
            let openai = OpenAiOptions {
                concurrency: options.concurrency,
                timeout: options.timeout,
                max_retries: options.max_retries,
                backoff_base: options.backoff_base,
                backoff_max: options.backoff_max,
                ..OpenAiOptions::default()
            };
            let openai = OpenAiOptions {
                api_key: options.api_key.clone().or(openai.api_key),
                ..openai
            };
            Ok(Box::new(OpenAiBackend::connect(server, openai)?))
        }
        local => Ok(Box::new(open_local(local, options.batch_size)?)),
    }
}

/// Opens a local model spec (a folder, `hf:`, `world:` or a PEFT adapter folder); a server spec
/// is an error.
pub fn open_local(spec: &ModelSpec, batch_size: usize) -> Result<LocalBackend> {
    let mut backend = LocalBackend::load(&spec.local_dir()?, batch_size)?;
    backend.set_name(&spec.to_string());
    Ok(backend)
}
