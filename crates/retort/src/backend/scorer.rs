//! The scoring seam ([`TokenScorer`]): log-probs of completion tokens given the prompt, and
//! optionally each token's rank and the top-k alternatives at each position, from a local model
//! ([`LocalBackend`]) or a server ([`RemoteScorer`]). Every use of a teacher that needs numbers
//! goes through it: selection, provenance, `check`, KD and on-policy distillation, the teacher
//! cache.
//!
//! The seam speaks token ids: the caller tokenises with the scorer's local tokenizer
//! ([`TokenScorer::tokenizer`], [`TokenScorer::prompt_ids`]) and the scorer returns numbers per
//! id, so a server's answer is matched to the local tokens by id and a disagreement is an error
//! that names the record and the position ([`ScoreRequest::label`]), never a silent shift.
//!
//! [`open_scorer`] opens a spec: a local model, or a server whose tokenizer comes from a local
//! folder (the served model's name when it is a folder or an `hf:` snapshot in the cache, else a
//! fallback the command gives, e.g. the student's).
//!
//! [`RemoteScorer`]: crate::backend::openai::score::RemoteScorer

use std::path::{Path, PathBuf};

use candle_core::{D, DType, IndexOp, Tensor};
use retort_model::score::{
    PaddedBatch, for_each_logits_chunk, head_chunk_rows, token_logprobs_from_logits,
};
use retort_model::tokenizer::Tokenizer;
use serde_json::json;

use super::Prompt;
use super::local::LocalBackend;
use super::open::BackendOptions;
use super::openai::score::{RemoteScorer, ScoreProtocol};
use crate::error::{Error, Result};
use crate::model_spec::ModelSpec;

/// One sequence to score, in the scorer's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreRequest {
    /// Names the record in errors (e.g. `line 12`, `example abc`).
    pub label: String,
    /// Prompt token ids (at least one: the first completion token needs a context).
    pub prompt_ids: Vec<u32>,
    /// Completion token ids: the tokens scored.
    pub completion_ids: Vec<u32>,
}

/// What to compute besides each token's log-prob.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScoreWants {
    /// Alternatives per position, most likely first (0: none).
    pub top_k: usize,
    /// Each completion token's 1-based rank in the vocabulary.
    pub ranks: bool,
}

/// Scores of one sequence's completion tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SequenceScores {
    /// Log-prob of each completion token given everything before it.
    pub logprobs: Vec<f32>,
    /// 1-based rank of each completion token (empty unless asked for).
    pub ranks: Vec<u32>,
    /// The `top_k` most likely (id, log-prob) at each completion position, most likely first
    /// (empty unless asked for).
    pub top: Vec<Vec<(u32, f32)>>,
}

/// Log-probs of completion tokens given a prompt; see the module docs.
pub trait TokenScorer: Send + Sync {
    /// The model spec, for messages and manifests (never a secret).
    fn name(&self) -> &str;
    /// The tokenizer the ids are in (a local copy for a server).
    fn tokenizer(&self) -> &Tokenizer;
    /// Ids that end a generation.
    fn eos_ids(&self) -> Vec<u32>;
    /// Rows of the output embedding (the logits' width) when known; it may exceed the
    /// tokenizer's vocabulary (padded vocabularies).
    fn vocab_rows(&self) -> Option<usize>;
    /// Scores every request (in order); a request with no completion tokens gets empty scores.
    fn score_ids(
        &self,
        requests: &[ScoreRequest],
        wants: ScoreWants,
    ) -> Result<Vec<SequenceScores>>;

    /// Token ids of a prompt, as [`LocalBackend::prompt_ids`] computes them: raw text with the
    /// tokenizer's special tokens, messages through the chat template.
    fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        encode_prompt(self.tokenizer(), prompt)
    }
}

/// Token ids of `prompt` under `tokenizer` (the rules of [`LocalBackend::prompt_ids`]).
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>> {
    Ok(match prompt {
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Text(text) => tokenizer.encode(text, true)?,
        Prompt::Messages(messages) => {
            let messages: Vec<_> = messages
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            let text = tokenizer.apply_chat_template(&messages, true)?;
            tokenizer.encode(&text, false)?
        }
    })
}

/// Checks the common preconditions of a request: a prompt, and ids below `limit` when known.
pub(crate) fn check_request(
    scorer: &str,
    request: &ScoreRequest,
    limit: Option<usize>,
) -> Result<()> {
    if request.prompt_ids.is_empty() && !request.completion_ids.is_empty() {
        return Err(Error::Invalid(format!(
            "model `{scorer}`, {}: the prompt is empty; scoring needs at least one prompt token",
            request.label
        )));
    }
    if let Some(limit) = limit {
        let all = request.prompt_ids.iter().chain(&request.completion_ids);
        if let Some((position, id)) = all.enumerate().find(|(_, id)| **id as usize >= limit) {
            return Err(Error::Invalid(format!(
                "model `{scorer}`, {}, position {position}: token id {id} is out of range for a \
                 vocabulary of {limit}",
                request.label
            )));
        }
    }
    Ok(())
}

impl TokenScorer for LocalBackend {
    fn name(&self) -> &str {
        super::Backend::name(self)
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.model().tokenizer
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.model().eos_ids()
    }

    fn vocab_rows(&self) -> Option<usize> {
        Some(self.model().config.vocab_size)
    }

    fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        // The inherent method (path resolution prefers it over this trait method).
        Self::prompt_ids(self, prompt)
    }

    fn score_ids(
        &self,
        requests: &[ScoreRequest],
        wants: ScoreWants,
    ) -> Result<Vec<SequenceScores>> {
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(self.batch_size()) {
            out.extend(score_local_chunk(self, chunk, wants)?);
        }
        Ok(out)
    }
}

/// One left-padded forward pass over `requests`; the lm head runs on completion positions only,
/// in chunks of positions (log-probs, ranks and top-k reduced per chunk).
fn score_local_chunk(
    backend: &LocalBackend,
    requests: &[ScoreRequest],
    wants: ScoreWants,
) -> Result<Vec<SequenceScores>> {
    let model = backend.model();
    let vocab = model.config.vocab_size;
    for request in requests {
        check_request(TokenScorer::name(backend), request, Some(vocab))?;
    }
    let live: Vec<&ScoreRequest> = requests
        .iter()
        .filter(|r| !r.completion_ids.is_empty())
        .collect();
    if live.is_empty() {
        return Ok(vec![SequenceScores::default(); requests.len()]);
    }
    let seqs: Vec<Vec<u32>> = live
        .iter()
        .map(|r| {
            r.prompt_ids
                .iter()
                .chain(&r.completion_ids)
                .copied()
                .collect()
        })
        .collect();
    let net = &model.model;
    let batch = PaddedBatch::left(&seqs, model.pad_id(), net.device())?;
    let mask = batch.has_padding().then_some(&batch.attention_mask);
    let hidden = net.forward_hidden(&batch.input_ids, mask, Some(&batch.position_ids))?;
    let chunk_rows = head_chunk_rows(vocab);
    let mut scored = Vec::with_capacity(live.len());
    for (row, request) in live.iter().enumerate() {
        let n = request.completion_ids.len();
        // Position p predicts token p + 1.
        let start = batch.pad_lens[row] + request.prompt_ids.len() - 1;
        let h = hidden.i((row, start..start + n))?;
        let mut logprobs = Vec::with_capacity(n);
        let mut ranks = Vec::with_capacity(if wants.ranks { n } else { 0 });
        let mut top = Vec::with_capacity(if wants.top_k > 0 { n } else { 0 });
        for_each_logits_chunk(net, &h, chunk_rows, |first, logits| -> Result<()> {
            let len = logits.dim(0)?;
            let ids = &request.completion_ids[first..first + len];
            let logits = logits.unsqueeze(0)?;
            let targets = Tensor::from_slice(ids, (1, len), net.device())?;
            logprobs.extend(
                token_logprobs_from_logits(&logits, &targets)?
                    .squeeze(0)?
                    .to_vec1::<f32>()?,
            );
            if wants.ranks {
                // Rank = 1 + the number of tokens with a strictly larger logit than the target.
                let target_logits =
                    logits.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
                let above = logits
                    .broadcast_gt(&target_logits)?
                    .to_dtype(DType::F32)?
                    .sum(D::Minus1)?;
                ranks.extend(
                    above
                        .squeeze(0)?
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(|n| n as u32 + 1),
                );
            }
            if wants.top_k > 0 {
                let rows = retort_model::train::log_softmax(&logits.squeeze(0)?)?
                    .to_device(&candle_core::Device::Cpu)?
                    .to_vec2::<f32>()?;
                top.extend(rows.iter().map(|row| top_k(row, wants.top_k)));
            }
            Ok(())
        })?;
        scored.push(SequenceScores {
            logprobs,
            ranks,
            top,
        });
    }
    let mut scored = scored.into_iter();
    Ok(requests
        .iter()
        .map(|r| {
            if r.completion_ids.is_empty() {
                SequenceScores::default()
            } else {
                scored.next().unwrap_or_default()
            }
        })
        .collect())
}

/// The `k` largest entries of `row` as (id, value), largest first (ties: lower id first).
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    let descending = |a: &u32, b: &u32| {
        row[*b as usize]
            .total_cmp(&row[*a as usize])
            .then_with(|| a.cmp(b))
    };
    if k < order.len() {
        // Partition first, then sort only the k kept.
        order.select_nth_unstable_by(k - 1, descending);
        order.truncate(k);
    }
    order.sort_unstable_by(descending);
    order.into_iter().map(|id| (id, row[id as usize])).collect()
}

/// How to open a scorer.
#[derive(Debug, Clone, Default)]
pub struct ScorerOptions {
    /// Backend settings (local batch size; server concurrency, timeouts, retries).
    pub backend: BackendOptions,
    /// How a server is asked for log-probs.
    pub protocol: ScoreProtocol,
    /// The tokenizer folder of a server whose model name is not a local folder or `hf:` snapshot.
    pub fallback_tokenizer: Option<PathBuf>,
}

/// Opens `spec` as a scorer: a local model, or a server with a local tokenizer (see the module
/// docs).
pub fn open_scorer(spec: &ModelSpec, options: &ScorerOptions) -> Result<Box<dyn TokenScorer>> {
    match spec {
        ModelSpec::Server(server) => {
            let dir = server_tokenizer_dir(spec, options.fallback_tokenizer.as_deref())?;
            Ok(Box::new(RemoteScorer::connect(
                server,
                &dir,
                options.protocol,
                &options.backend,
            )?))
        }
        local => Ok(Box::new(super::open::open_local(
            local,
            options.backend.batch_size,
            options.backend.compute,
        )?)),
    }
}

/// The folder holding a server model's tokenizer: its name as a folder or `hf:` snapshot, else
/// `fallback`.
pub fn server_tokenizer_dir(spec: &ModelSpec, fallback: Option<&Path>) -> Result<PathBuf> {
    let Some(server) = spec.server() else {
        return spec.local_dir();
    };
    let named = ModelSpec::parse(&server.model)
        .ok()
        .and_then(|named| match named {
            ModelSpec::Server(_) => None,
            ModelSpec::Folder(_) => named.local_path(),
            _ => named.local_path().or_else(|| {
                ModelSpec::parse(&format!("hf:{}", server.model))
                    .ok()?
                    .local_path()
            }),
        })
        .filter(|dir| dir.join("tokenizer.json").is_file());
    let hub = ModelSpec::parse(&format!("hf:{}", server.model))
        .ok()
        .and_then(|s| s.local_path())
        .filter(|dir| dir.join("tokenizer.json").is_file());
    named
        .or(hub)
        .or_else(|| fallback.map(Path::to_path_buf))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "server `{spec}`: scoring needs the model's tokenizer on this machine, and `{}` is \
                 neither a local folder nor in the Hugging Face cache\nhint: serve the model under \
                 its folder or hub name, or give a local model of the same tokenizer beside it",
                server.model
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_sorts_and_breaks_ties_by_id() {
        let row = [0.1f32, 0.5, 0.5, -1.0, 0.3];
        assert_eq!(top_k(&row, 3), vec![(1, 0.5), (2, 0.5), (4, 0.3)]);
        assert_eq!(top_k(&row, 9).len(), 5);
        assert!(top_k(&row, 0).is_empty());
    }
}
