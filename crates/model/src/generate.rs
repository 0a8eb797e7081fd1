//! Generation entry points: [`generate`], [`generate_with_seeds`] and [`generate_all`] hand
//! their requests to the continuous-batching [`crate::engine`], which picks tokens with
//! [`crate::sampling`] and stops each row on an EOS id, a stop string or `max_new_tokens`.
//! Where the engine does not run (not f32 on the CPU) a static left-padded batch through a
//! preallocated [`KvCache`] does the same work.
//!
//! Each request draws from its own ChaCha8 stream, so its tokens depend on its seed, stream and
//! prompt, never on the other requests; on the engine they are bit-identical whatever the
//! batching (see [`crate::engine`]).

use candle_core::{DType, IndexOp, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::engine::{self, EngineOptions, EngineStats, Request};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::models::CausalLm;
use crate::sampling::{SamplingParams, sample};
use crate::score::PaddedBatch;
use crate::tokenizer::Tokenizer;

/// Decoding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// New tokens per row at most.
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Seed of the per-row random streams.
    pub seed: u64,
    /// Ids that end a row (kept in its output).
    pub eos_ids: Vec<u32>,
    /// Strings that end a row; the text is cut before the first match.
    pub stop_strings: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
            eos_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// Why a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`, as OpenAI-style APIs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New token ids (the EOS id is kept when the row stopped on it).
    pub token_ids: Vec<u32>,
    /// Decoded text with special tokens skipped, cut before a matched stop string.
    pub text: String,
    /// Why the row ended.
    pub finish_reason: FinishReason,
}

struct Row {
    ids: Vec<u32>,
    rng: ChaCha8Rng,
    finished: Option<FinishReason>,
    stop_text: Option<String>,
    next_pos: u32,
}

/// Generates a continuation for each prompt in one left-padded batch.
pub fn generate(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
) -> Result<Vec<Generated>> {
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            seed: params.seed,
            stream: i as u64,
        })
        .collect();
    Ok(generate_all(
        model,
        tokenizer,
        &requests,
        params,
        &EngineOptions::default(),
    )?
    .0)
}

/// Like [`generate`], but row `i` draws from stream 0 of `seeds[i]` (ignoring `params.seed`), so a
/// row's tokens depend only on its own seed and prompt, not on its position in the batch.
pub fn generate_with_seeds(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    params: &GenerationParams,
) -> Result<Vec<Generated>> {
    if seeds.len() != prompts.len() {
        return Err(Error::invalid(format!(
            "{} seeds for {} prompts: give one seed per prompt",
            seeds.len(),
            prompts.len()
        )));
    }
    let requests: Vec<Request> = prompts
        .iter()
        .zip(seeds)
        .map(|(p, &seed)| Request {
            prompt: p.clone(),
            seed,
            stream: 0,
        })
        .collect();
    Ok(generate_all(
        model,
        tokenizer,
        &requests,
        params,
        &EngineOptions::default(),
    )?
    .0)
}

/// Generates every request at once on the [`crate::engine`] (sequences in flight and key/value
/// budget from `options`; identical prompts are prefilled once), outputs in request order.
///
/// Where the engine does not run, static batches of `options.max_seqs` rows (16 when 0) do.
pub fn generate_all(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    requests: &[Request],
    params: &GenerationParams,
    options: &EngineOptions,
) -> Result<(Vec<Generated>, EngineStats)> {
    if engine::supports(model) {
        let mut out: Vec<Option<Generated>> = vec![None; requests.len()];
        let stats = engine::run(model, tokenizer, requests, params, options, &mut |i, g| {
            out[i] = Some(g);
        })?;
        let out = out
            .into_iter()
            .map(|g| g.expect("the engine finishes every request"))
            .collect();
        return Ok((out, stats));
    }
    let batch = if options.max_seqs == 0 {
        16
    } else {
        options.max_seqs
    };
    let mut out = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(batch) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|r| r.prompt.clone()).collect();
        let streams: Vec<(u64, u64)> = chunk.iter().map(|r| (r.seed, r.stream)).collect();
        out.extend(generate_rows(model, tokenizer, &prompts, &streams, params)?);
    }
    Ok((out, EngineStats::default()))
}

fn generate_rows(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    streams: &[(u64, u64)],
    params: &GenerationParams,
) -> Result<Vec<Generated>> {
    let sampling = SamplingParams {
        temperature: params.temperature,
        top_p: params.top_p,
        top_k: params.top_k,
    };
    sampling.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = model.config().vocab_size as u32;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::invalid(format!(
                "prompt {i} is empty: generation needs at least one token"
            )));
        }
        if let Some(bad) = p.iter().find(|&&t| t >= vocab) {
            return Err(Error::invalid(format!(
                "prompt {i}: token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
    }
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (seed, stream) = streams[i];
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(stream);
            Row {
                ids: Vec::new(),
                rng,
                finished: None,
                stop_text: None,
                next_pos: p.len() as u32,
            }
        })
        .collect();
    if params.max_new_tokens == 0 {
        return Ok(rows
            .into_iter()
            .map(|_| Generated {
                token_ids: Vec::new(),
                text: String::new(),
                finish_reason: FinishReason::Length,
            })
            .collect());
    }
    let device = model.device().clone();
    let b_sz = prompts.len();
    let pad_id = params.eos_ids.first().copied().unwrap_or(0);
    let batch = PaddedBatch::left(prompts, pad_id, &device)?;
    let max_len = batch.len + params.max_new_tokens;
    let mut cache = KvCache::new(model.config(), b_sz, max_len, model.dtype(), &device)?;
    let padded = batch.has_padding();
    // Host copy of the mask; decoding steps append ones.
    let mut mask_host: Vec<Vec<u32>> = batch
        .pad_lens
        .iter()
        .map(|&pad| {
            let mut m = vec![0u32; pad];
            m.resize(batch.len, 1);
            m
        })
        .collect();
    let prefill_mask = padded.then_some(&batch.attention_mask);
    let hidden = model.forward_cached_hidden(
        &batch.input_ids,
        &batch.position_ids,
        prefill_mask,
        &mut cache,
    )?;
    let mut logits = last_logits(model, &hidden)?;
    let max_stop = params
        .stop_strings
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0);
    for step in 0..params.max_new_tokens {
        // One device -> host transfer per step for the whole batch.
        let host: Vec<Vec<f32>> = logits.to_vec2()?;
        for (row, row_logits) in rows.iter_mut().zip(host.iter()) {
            if row.finished.is_some() {
                continue;
            }
            let token = sample(row_logits, &sampling, &mut row.rng);
            row.ids.push(token);
            if params.eos_ids.contains(&token) {
                row.finished = Some(FinishReason::Stop);
            } else if max_stop > 0 {
                // A stop string completed by this token lies within the last `max_stop + 4`
                // tokens (every token decodes to at least one byte, special tokens aside), so
                // only that tail is decoded each step; the full text is decoded on a hit.
                let tail_start = row.ids.len().saturating_sub(max_stop + 4);
                let tail = tokenizer.decode(&row.ids[tail_start..], true)?;
                if earliest_stop(&tail, &params.stop_strings).is_some() {
                    let text = tokenizer.decode(&row.ids, true)?;
                    if let Some(cut) = earliest_stop(&text, &params.stop_strings) {
                        row.stop_text = Some(text[..cut].to_string());
                        row.finished = Some(FinishReason::Stop);
                    }
                }
            }
            if row.finished.is_none() && row.ids.len() >= params.max_new_tokens {
                row.finished = Some(FinishReason::Length);
            }
        }
        if rows.iter().all(|r| r.finished.is_some()) || step + 1 == params.max_new_tokens {
            break;
        }
        let next: Vec<u32> = rows
            .iter()
            .map(|r| r.ids.last().copied().unwrap_or(pad_id))
            .collect();
        let pos: Vec<u32> = rows.iter().map(|r| r.next_pos).collect();
        for r in &mut rows {
            r.next_pos += 1;
        }
        let input = Tensor::from_vec(next, (b_sz, 1), &device)?;
        let positions = Tensor::from_vec(pos, (b_sz, 1), &device)?;
        let hidden = if padded {
            for m in &mut mask_host {
                m.push(1);
            }
            let flat: Vec<u32> = mask_host.iter().flatten().copied().collect();
            let width = mask_host[0].len();
            let mask = Tensor::from_vec(flat, (b_sz, width), &device)?;
            model.forward_cached_hidden(&input, &positions, Some(&mask), &mut cache)?
        } else {
            model.forward_cached_hidden(&input, &positions, None, &mut cache)?
        };
        logits = last_logits(model, &hidden)?;
    }
    rows.into_iter()
        .map(|row| {
            let text = match row.stop_text {
                Some(t) => t,
                None => tokenizer.decode(&row.ids, true)?,
            };
            Ok(Generated {
                token_ids: row.ids,
                text,
                finish_reason: row.finished.unwrap_or(FinishReason::Length),
            })
        })
        .collect()
}

/// f32 logits `[b, vocab]` of the last position of `hidden` `[b, t, h]`.
fn last_logits(model: &CausalLm, hidden: &Tensor) -> Result<Tensor> {
    let t = hidden.dim(1)?;
    let last = hidden.i((.., t - 1..t, ..))?;
    Ok(model.lm_head(&last)?.squeeze(1)?.to_dtype(DType::F32)?)
}

/// Byte offset of the earliest match of any stop string.
pub(crate) fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_stop_picks_first_match() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(earliest_stop("abc\n\nxEND", &stops), Some(3));
        assert_eq!(earliest_stop("abc", &stops), None);
    }
}
