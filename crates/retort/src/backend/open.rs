//! Opening a [`Backend`] from a model spec (DESIGN.md §2 "Model specs").

use std::time::Duration;

use serde_json::{Map, Value};

use super::Backend;
use super::local::LocalBackend;
use super::openai::{ApiKey, OpenAiBackend, OpenAiOptions};
use crate::compute::Compute;
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
    /// Stop a server run once every attempt has failed for this long (see
    /// [`super::openai::OpenAiOptions::dead_after`]); `None` never stops early.
    pub dead_after: Option<Duration>,
    /// Variables for the chat template (`{"enable_thinking": true}`): sent to a server as
    /// `chat_template_kwargs`, passed to a local model's template when it renders a prompt.
    pub chat_template_kwargs: Map<String, Value>,
    /// Extra top-level fields of every server request body (they override retort's own).
    pub extra_body: Map<String, Value>,
    /// Device and dtype of a local model.
    pub compute: Compute,
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
            dead_after: OpenAiOptions::default().dead_after,
            chat_template_kwargs: Map::new(),
            extra_body: Map::new(),
            compute: Compute::default(),
        }
    }
}

/// `extra_body` with `chat_template_kwargs` merged into its own `chat_template_kwargs` object
/// (the flag's keys win).
fn request_extras(options: &BackendOptions) -> Map<String, Value> {
    let mut extra = options.extra_body.clone();
    if !options.chat_template_kwargs.is_empty() {
        let slot = extra
            .entry("chat_template_kwargs")
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        if let Value::Object(kwargs) = slot {
            kwargs.extend(options.chat_template_kwargs.clone());
        }
    }
    extra
}

/// Opens `spec`: a server for `openai:URL#MODEL` (checked with one request first, so a server
/// that is down fails here, in seconds, with its address: [`OpenAiBackend::preflight`]),
/// otherwise the local model.
pub fn open_backend(spec: &ModelSpec, options: &BackendOptions) -> Result<Box<dyn Backend>> {
    match spec {
        ModelSpec::Server(server) => {
            let openai = OpenAiOptions {
                concurrency: options.concurrency,
                timeout: options.timeout,
                max_retries: options.max_retries,
                backoff_base: options.backoff_base,
                backoff_max: options.backoff_max,
                dead_after: options.dead_after,
                extra_body: request_extras(options),
                ..OpenAiOptions::default()
            };
            let openai = OpenAiOptions {
                api_key: options.api_key.clone().or(openai.api_key),
                ..openai
            };
            let backend = OpenAiBackend::connect(server, openai)?;
            backend.preflight()?;
            Ok(Box::new(backend))
        }
        local => {
            let mut backend = open_local(local, options.batch_size, options.compute)?;
            backend.set_chat_template_kwargs(options.chat_template_kwargs.clone());
            Ok(Box::new(backend))
        }
    }
}

/// Opens a local model spec (a folder, `hf:`, `world:` or a PEFT adapter folder); a server spec
/// is an error. It runs on the device and in the dtype of `compute`.
pub fn open_local(spec: &ModelSpec, batch_size: usize, compute: Compute) -> Result<LocalBackend> {
    let mut backend = LocalBackend::load_on(spec.local_dir()?, batch_size, compute)?;
    backend.set_name(&spec.to_string());
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_kwargs_merge_into_the_request_extras() {
        let options = BackendOptions {
            extra_body: serde_json::from_str(
                r#"{"min_p": 0.1, "chat_template_kwargs": {"a": 1, "enable_thinking": false}}"#,
            )
            .expect("json"),
            chat_template_kwargs: serde_json::from_str(r#"{"enable_thinking": true}"#)
                .expect("json"),
            ..BackendOptions::default()
        };
        assert_eq!(
            Value::Object(request_extras(&options)),
            serde_json::json!({"min_p": 0.1,
                "chat_template_kwargs": {"a": 1, "enable_thinking": true}})
        );
    }
}
