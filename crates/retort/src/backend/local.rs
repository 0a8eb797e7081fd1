//! The local backend: a [`retort_model`] model on this machine (CPU, or CUDA with the `cuda`
//! feature). All requests go to the generation engine at once ([`retort_model::engine`]:
//! continuous batching, each distinct prompt prefilled once); each request samples from its own
//! random stream derived from (seed, request key, sample), and the engine's kernels are
//! batch-invariant, so its output does not depend on batching, order or resumption, bit for bit.

use retort_model::engine::{self, EngineOptions, Request};
use retort_model::generate::GenerationParams;
use retort_model::load::{LoadedModel, load};
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
    /// Loads the model folder `dir` (model specs are resolved to folders by
    /// [`crate::ModelSpec::local_dir`]); `batch_size` sequences are in flight at once (0: the
    /// engine's default, [`engine::AUTO_MAX_SEQS`] within its memory budget).
    ///
    /// A PEFT LoRA adapter folder (as `retort distill --lora-rank` writes) loads onto the base
    /// model its `adapter_config.json` names, merged for inference.
    pub fn load(dir: impl AsRef<std::path::Path>, batch_size: usize) -> Result<Self> {
        Self::load_on(dir, batch_size, crate::compute::Compute::cpu())
    }

    /// [`LocalBackend::load`] on the device and in the dtype of `compute`.
    pub fn load_on(
        dir: impl AsRef<std::path::Path>,
        batch_size: usize,
        compute: crate::compute::Compute,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let options = compute.load_options()?;
        let model = match crate::distill::lora::adapter_base(dir)? {
            Some(base) => crate::distill::lora::load_with_adapter(&base, dir, &options)?,
            None => load(&dir.to_string_lossy(), &options)?,
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
            batch_size,
            template_kwargs: serde_json::Map::new(),
        }
    }

    /// Renames the backend (the name recorded in traces and manifests).
    pub fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    /// Rows decoded (or scored) together.
    pub fn batch_size(&self) -> usize {
        self.batch_size
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
        if self.model.tokenizer.chat_template().is_none()
            && requests
                .iter()
                .any(|r| matches!(r.prompt, Prompt::Messages(_)))
        {
            // A model-wide problem: one error, not one per record.
            return Err(Error::Invalid(format!(
                "model `{}` has no chat template, so `messages` records cannot be rendered\nhint: \
                 use `prompt` (text) records, or give the model a chat template \
                 (`chat_template` in its tokenizer_config.json, or a chat_template.jinja beside \
                 it)",
                self.name
            )));
        }
        let context = self.model.config.max_position_embeddings;
        let unusable = |request: &GenerateRequest, why: String| RequestOutcome {
            key: request.key,
            sample: request.sample,
            result: Err(why),
            attempts: 1,
            unusable: true,
        };
        let mut encoded = Vec::with_capacity(requests.len());
        for request in requests {
            match self.prompt_ids(&request.prompt) {
                Ok(ids) if ids.is_empty() => sink(unusable(
                    &request,
                    "the prompt is empty after tokenization".into(),
                )),
                Ok(ids) if context > 0 && ids.len() >= context => {
                    let why = format!(
                        "the prompt has {} tokens; the model's context is {context}",
                        ids.len()
                    );
                    sink(unusable(&request, why));
                }
                Ok(ids) => encoded.push((request, ids)),
                Err(e) => sink(unusable(&request, e.to_string())),
            }
        }
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
        let requests: Vec<Request> = encoded
            .iter()
            .map(|(r, ids)| Request {
                prompt: ids.clone(),
                seed: request_seed(generation.seed, r.key, r.sample),
                stream: 0,
            })
            .collect();
        let options = EngineOptions {
            max_seqs: self.batch_size,
            // A stop request (Ctrl-C) ends the run after the current step; unfinished rows are
            // not reported, so the journal resends them on a rerun.
            stop: Some(|| crate::interrupt::requested().is_some()),
            ..EngineOptions::default()
        };
        let to_outcome = |(request, ids): &(GenerateRequest, Vec<u32>),
                          output: retort_model::Generated| {
            let finish_reason = match output.finish_reason {
                retort_model::generate::FinishReason::Stop => FinishReason::Stop,
                retort_model::generate::FinishReason::Length => FinishReason::Length,
            };
            RequestOutcome {
                key: request.key,
                sample: request.sample,
                attempts: 1,
                unusable: false,
                result: Ok(Completion {
                    text: output.text,
                    reasoning: None,
                    completion_tokens: output.token_ids.len(),
                    token_ids: Some(output.token_ids),
                    finish_reason,
                    prompt_tokens: ids.len(),
                    logprobs: None,
                }),
            }
        };
        let backend_error = |e: retort_model::Error| Error::Backend {
            backend: self.name.clone(),
            message: e.to_string(),
        };
        let model = &self.model.model;
        if engine::supports(model) {
            // Each request reaches the sink the step it ends, so a journal records it at once.
            engine::run(
                model,
                &self.model.tokenizer,
                &requests,
                &generation,
                &options,
                &mut |i, output| sink(to_outcome(&encoded[i], output)),
            )
            .map_err(backend_error)?;
        } else {
            let (outputs, _) = retort_model::generate_all(
                model,
                &self.model.tokenizer,
                &requests,
                &generation,
                &options,
            )
            .map_err(backend_error)?;
            for (item, output) in encoded.iter().zip(outputs) {
                sink(to_outcome(item, output));
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
