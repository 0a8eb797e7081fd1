//! The local backend: a [`retort_model`] model on this machine (CPU, or CUDA with the `cuda`
//! feature). Requests are generated in batches of similar prompt length; each request samples from
//! its own random stream derived from (seed, request key, sample), so its output does not depend
//! on batching, order or resumption.

use retort_model::generate::{GenerationParams, generate_with_seeds};
use retort_model::load::{LoadOptions, LoadedModel, load};
use retort_model::score::score_batch;
use serde_json::json;

use super::{
    Backend, Completion, FinishReason, GenerateRequest, Prompt, RequestOutcome, SamplingParams,
    Scored,
};
use crate::error::{Error, Result};

/// A model loaded in this process.
pub struct LocalBackend {
    name: String,
    model: LoadedModel,
    batch_size: usize,
    template_kwargs: serde_json::Map<String, serde_json::Value>,
}

impl LocalBackend {
    /// Loads the model folder `dir`; `batch_size` rows are decoded together (model specs are
    /// resolved to folders by [`crate::ModelSpec::local_dir`]).
    ///
    /// A PEFT LoRA adapter folder (as `retort distill --lora-rank` writes) loads onto the base
    /// model its `adapter_config.json` names, merged for inference.
    pub fn load(dir: impl AsRef<std::path::Path>, batch_size: usize) -> Result<Self> {
        let dir = dir.as_ref();
        let model = match crate::distill::lora::adapter_base(dir)? {
            Some(base) => {
                crate::distill::lora::load_with_adapter(&base, dir, &LoadOptions::default())?
            }
            None => load(&dir.to_string_lossy(), &LoadOptions::default())?,
        };
        Ok(Self::from_loaded(
            &dir.display().to_string(),
            model,
            batch_size,
        ))
    }

    /// Wraps an already loaded model.
    pub fn from_loaded(name: &str, model: LoadedModel, batch_size: usize) -> Self {
        Self {
            name: name.to_string(),
            model,
            batch_size: batch_size.max(1),
            template_kwargs: serde_json::Map::new(),
        }
    }

    /// Renames the backend (the name recorded in traces and manifests).
    pub fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    /// Extra chat-template variables (`enable_thinking`, ...) for rendering chat prompts.
    pub fn set_chat_template_kwargs(&mut self, kwargs: serde_json::Map<String, serde_json::Value>) {
        self.template_kwargs = kwargs;
    }

    /// The loaded model.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// Token ids of a prompt: raw text is encoded as `tokenizer(text)` would (special tokens per the
    /// tokenizer's post-processor); messages are rendered with the chat template
    /// (`add_generation_prompt`, plus the chat-template kwargs) and encoded without adding special
    /// tokens again.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        Ok(render_prompt(&self.model.tokenizer, prompt, &self.template_kwargs)?.1)
    }
}

/// The text a local model is given for `prompt` and its token ids, as [`LocalBackend`] builds
/// them: chat messages rendered with the chat template (`add_generation_prompt`, `kwargs` as extra
/// template variables) and encoded without adding special tokens again; raw text as given, encoded
/// as `tokenizer(text)` would (special tokens per the tokenizer's post-processor); token ids as
/// given, decoded with their special tokens for the text.
pub fn render_prompt(
    tokenizer: &retort_model::Tokenizer,
    prompt: &Prompt,
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> Result<(String, Vec<u32>)> {
    Ok(match prompt {
        Prompt::Ids(ids) => (tokenizer.decode(ids, false)?, ids.clone()),
        Prompt::Text(text) => (text.clone(), tokenizer.encode(text, true)?),
        Prompt::Messages(messages) => {
            let messages: Vec<_> = messages
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            let text = tokenizer.apply_chat_template_with(&messages, true, kwargs)?;
            let ids = tokenizer.encode(&text, false)?;
            (text, ids)
        }
    })
}

/// The random stream of one request: a SplitMix64 mix of the run seed, the request key and the
/// sample index, so (key, sample) pairs draw independent, reproducible streams.
pub fn request_seed(seed: u64, key: usize, sample: usize) -> u64 {
    let mut z = seed
        ^ (key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (sample as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Backend for LocalBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn generate(
        &self,
        requests: Vec<GenerateRequest>,
        params: &SamplingParams,
        sink: &mut dyn FnMut(RequestOutcome),
    ) -> Result<()> {
        let mut encoded = Vec::with_capacity(requests.len());
        for request in requests {
            match self.prompt_ids(&request.prompt) {
                Ok(ids) if !ids.is_empty() => encoded.push((request, ids)),
                Ok(_) => sink(RequestOutcome {
                    key: request.key,
                    sample: request.sample,
                    result: Err("the prompt is empty after tokenization".into()),
                    attempts: 1,
                }),
                Err(e) => sink(RequestOutcome {
                    key: request.key,
                    sample: request.sample,
                    result: Err(e.to_string()),
                    attempts: 1,
                }),
            }
        }
        // Similar lengths share a batch so little compute goes to padding.
        encoded.sort_by_key(|(_, ids)| ids.len());
        let mut eos_ids = self.model.eos_ids();
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let generation = GenerationParams {
            max_new_tokens: params.max_new_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            seed: params.seed.unwrap_or(0),
            eos_ids,
            stop_strings: params.stop.clone(),
        };
        for batch in encoded.chunks(self.batch_size) {
            let prompts: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
            let seeds: Vec<u64> = batch
                .iter()
                .map(|(r, _)| request_seed(generation.seed, r.key, r.sample))
                .collect();
            let outputs = generate_with_seeds(
                &self.model.model,
                &self.model.tokenizer,
                &prompts,
                &seeds,
                &generation,
            )
            .map_err(|e| Error::Backend {
                backend: self.name.clone(),
                message: e.to_string(),
            })?;
            for ((request, ids), output) in batch.iter().zip(outputs) {
                let finish_reason = match output.finish_reason {
                    retort_model::generate::FinishReason::Stop => FinishReason::Stop,
                    retort_model::generate::FinishReason::Length => FinishReason::Length,
                };
                sink(RequestOutcome {
                    key: request.key,
                    sample: request.sample,
                    attempts: 1,
                    result: Ok(Completion {
                        text: output.text,
                        reasoning: None,
                        completion_tokens: output.token_ids.len(),
                        token_ids: Some(output.token_ids),
                        finish_reason,
                        prompt_tokens: ids.len(),
                        logprobs: None,
                    }),
                });
            }
        }
        Ok(())
    }

    fn score(&self, prompt: &Prompt, completion: &str, top_k: usize) -> Result<Scored> {
        if top_k > 0 {
            return Err(Error::Invalid(
                "top-k log-probs from a local model are not supported yet".into(),
            ));
        }
        let prompt_ids = self.prompt_ids(prompt)?;
        let completion_ids = self.model.tokenizer.encode(completion, false)?;
        let scores = score_batch(
            &self.model.model,
            &[(prompt_ids, completion_ids.clone())],
            self.model.pad_id(),
        )?;
        let token_logprobs = scores
            .into_iter()
            .next()
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Scored {
            completion_ids: Some(completion_ids),
            token_logprobs,
            top_logprobs: Vec::new(),
        })
    }
}
