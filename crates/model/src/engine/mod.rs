//! The local generation engine: continuous batching over a block key/value cache, with
//! batch-invariant kernels, behind every caller of [`crate::generate`].
//!
//! [`run`] takes all requests at once (each a prompt and its own random stream) and loops on
//! small named steps: the [`scheduler`] admits waiting requests into free slots, plans the rows of
//! the step (prompt chunks beside decode tokens), the model runs them through a [`PagedStep`],
//! and each row's token is sampled; a finished row frees its blocks and its slot the same step.
//! Identical prompts form a group prefilled once; its samples share the prompt's blocks.
//!
//! **Batch invariance.** Every per-row computation reduces in an order that does not depend on
//! the other rows: projections through [`crate::kernels::linear_fixed`] (entered with
//! [`FixedOrder`]), attention per row over its own blocks
//! ([`crate::kernels::paged_attention`]), and the row-wise norms, RoPE and activation kernels.
//! So a request's tokens are bit-identical whether it runs alone or among hundreds, joins at
//! another step, or shares its prompt's blocks, and `--batch-size`, resumption and shards do not
//! change traces. One assumption: the MLP width is a multiple of 8 (the fused activation's
//! vector body then never splits a row), true of every released Qwen and Llama.
//!
//! The engine runs f32 models on the CPU, their linear weights in f32, bf16 or f16; [`supports`]
//! says so, and [`crate::generate`] falls back to its static batch elsewhere (issue 15 adds a
//! device attention kernel over the same block tables).

mod block_cache;
mod scheduler;
mod sequence;

use candle_core::{DType, Device, Tensor};

pub use block_cache::{BLOCK_SIZE, BlockCache, PagedStep};

use crate::error::{Error, Result};
use crate::generate::{Generated, GenerationParams};
use crate::kernels::{FixedOrder, PagedShape};
use crate::models::CausalLm;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use scheduler::{RowKind, Scheduler, Seq};

/// Sequences in flight when none is asked for: enough rows per step to keep the projections
/// compute-bound on a few cores, within the default key/value budget for prompt + 1k tokens.
pub const AUTO_MAX_SEQS: usize = 256;

/// How the engine batches.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences in flight at most; 0 picks [`AUTO_MAX_SEQS`].
    pub max_seqs: usize,
    /// Bytes of key/value cache that admitted sequences may need at most (their worst case).
    pub kv_budget_bytes: usize,
    /// Prompt tokens prefilled per step at most (beside the decode rows).
    pub prefill_chunk: usize,
    /// Fixed-order projections (on by default). Off, projections take the GEMM for many rows:
    /// faster, but a row's last bits then depend on how many rows run beside it (for measuring
    /// what invariance costs).
    pub batch_invariant: bool,
    /// Polled before each step: when it returns true the run stops, dropping the rows in flight
    /// (unreported, so a caller's journal can resend them); e.g. a Ctrl-C flag.
    pub stop: Option<fn() -> bool>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_seqs: 0,
            kv_budget_bytes: 4 << 30,
            prefill_chunk: 512,
            batch_invariant: true,
            stop: None,
        }
    }
}

/// One request: a prompt and the random stream `(seed, stream)` its samples draw from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Seed of the request's ChaCha8 generator.
    pub seed: u64,
    /// Stream of that generator.
    pub stream: u64,
}

/// What a run did, for `retort bench` and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Forward steps.
    pub steps: usize,
    /// Prompt tokens prefilled (each distinct prompt once).
    pub prefill_tokens: usize,
    /// Tokens decoded.
    pub decode_tokens: usize,
    /// Most blocks held at once.
    pub peak_blocks: usize,
    /// Bytes of one block over all layers.
    pub block_bytes: usize,
    /// Blocks held after the run (0: every block went back).
    pub blocks_in_use_after: usize,
    /// Most sequences in flight at once.
    pub peak_in_flight: usize,
    /// Most blocks held beyond those the live block tables need, over all steps (0 when every
    /// block a finished row held went back at once and none was taken early).
    pub max_blocks_beyond_live: usize,
}

impl EngineStats {
    /// Peak key/value cache memory in bytes.
    pub fn peak_kv_bytes(&self) -> usize {
        self.peak_blocks * self.block_bytes
    }
}

/// Whether the engine runs `model`: f32 on the CPU, its linear weights in f32 or stored in
/// bf16/f16 (widened exactly by [`crate::kernels::linear_fixed`], so invariance holds the same).
pub fn supports(model: &CausalLm) -> bool {
    model.device().is_cpu()
        && model.dtype() == DType::F32
        && matches!(model.weight_dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// Generates every request; `sink(i, generated)` receives request `i` the step it ends.
pub fn run(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    requests: &[Request],
    params: &GenerationParams,
    options: &EngineOptions,
    sink: &mut dyn FnMut(usize, Generated),
) -> Result<EngineStats> {
    let sampling = SamplingParams {
        temperature: params.temperature,
        top_p: params.top_p,
        top_k: params.top_k,
    };
    sampling.validate()?;
    validate(model, requests)?;
    let cfg = model.config();
    let shape = PagedShape {
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        block_size: BLOCK_SIZE,
    };
    let mut cache = BlockCache::new(cfg.num_hidden_layers, shape);
    let mut stats = EngineStats {
        block_bytes: cache.block_bytes(),
        ..EngineStats::default()
    };
    if params.max_new_tokens == 0 {
        for (i, r) in requests.iter().enumerate() {
            sink(
                i,
                sequence::Decoding::new(r.seed, r.stream).finish(tokenizer)?,
            );
        }
        return Ok(stats);
    }
    let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
    let seeds = requests.iter().map(|r| (r.seed, r.stream)).collect();
    let max_seqs = if options.max_seqs == 0 {
        AUTO_MAX_SEQS
    } else {
        options.max_seqs
    };
    let budget_blocks = options.kv_budget_bytes / cache.block_bytes().max(1);
    let mut sched = Scheduler::new(
        &prompts,
        seeds,
        max_seqs,
        budget_blocks,
        params.max_new_tokens,
        options.prefill_chunk,
    );
    // The most blocks the admitted rows can hold at once: their worst cases within the budget.
    let mut needs: Vec<usize> = requests
        .iter()
        .map(|r| (r.prompt.len() + params.max_new_tokens).div_ceil(BLOCK_SIZE))
        .collect();
    needs.sort_unstable_by(|a, b| b.cmp(a));
    let worst: usize = needs.iter().take(max_seqs).sum();
    cache.reserve(worst.min(budget_blocks) + 1);
    let device = model.device().clone();
    let mut finish = |sched: &mut Scheduler, cache: &mut BlockCache, seq: Seq| -> Result<()> {
        let (request, decoding) = sched.retire(seq, cache);
        sink(request, decoding.finish(tokenizer)?);
        Ok(())
    };
    while !sched.is_done() {
        if options.stop.is_some_and(|stop| stop()) {
            break;
        }
        for mut seq in sched.admit(&mut cache) {
            start(
                &mut sched, &mut cache, &mut seq, &sampling, params, tokenizer,
            )?;
            if seq.decoding.is_finished() {
                finish(&mut sched, &mut cache, seq)?;
            } else {
                sched.running.push(seq);
            }
        }
        let in_flight = sched.running.len() + sched.joining.len();
        stats.peak_in_flight = stats.peak_in_flight.max(in_flight);
        let plan = sched.plan(&mut cache);
        let beyond = cache.blocks_in_use().saturating_sub(sched.live_blocks());
        stats.max_blocks_beyond_live = stats.max_blocks_beyond_live.max(beyond);
        if plan.tokens.is_empty() {
            if sched.is_done() {
                break;
            }
            return Err(Error::invalid(
                "generation engine: no row to run while requests wait (scheduler invariant)",
            ));
        }
        let logits = step(model, &mut cache, &plan, &device, options.batch_invariant)?;
        stats.steps += 1;
        let mut decoded = Vec::new();
        let mut li = 0;
        for kind in &plan.kinds {
            match *kind {
                RowKind::Prefill(g, last) => {
                    stats.prefill_tokens += 1;
                    if last {
                        sched.groups[g].logits = Some(logits[li].clone());
                        li += 1;
                        for mut seq in sched.take_joining(g) {
                            start(
                                &mut sched, &mut cache, &mut seq, &sampling, params, tokenizer,
                            )?;
                            if seq.decoding.is_finished() {
                                finish(&mut sched, &mut cache, seq)?;
                            } else {
                                decoded.push(seq);
                            }
                        }
                    }
                }
                RowKind::Decode(i) => {
                    stats.decode_tokens += 1;
                    let seq = &mut sched.running[i];
                    seq.len += 1;
                    seq.decoding
                        .push(&logits[li], &sampling, params, tokenizer)?;
                    li += 1;
                }
            }
        }
        let running = std::mem::take(&mut sched.running);
        for seq in running {
            if seq.decoding.is_finished() {
                finish(&mut sched, &mut cache, seq)?;
            } else {
                sched.running.push(seq);
            }
        }
        sched.running.extend(decoded);
    }
    stats.peak_blocks = cache.peak_blocks();
    stats.blocks_in_use_after = cache.blocks_in_use();
    Ok(stats)
}

/// Forks `seq` off its (prefilled) prompt and samples its first token from the prompt's logits.
fn start(
    sched: &mut Scheduler,
    cache: &mut BlockCache,
    seq: &mut Seq,
    sampling: &SamplingParams,
    params: &GenerationParams,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let logits = sched.groups[seq.group]
        .logits
        .clone()
        .expect("a forked sequence's prompt is prefilled");
    sched.fork(seq, cache);
    seq.decoding.push(&logits, sampling, params, tokenizer)
}

/// Runs the rows of `plan` and returns the f32 logits of the rows that need them (the last
/// prompt token of a group, every decode row), in row order.
fn step(
    model: &CausalLm,
    cache: &mut BlockCache,
    plan: &scheduler::Plan,
    device: &Device,
    batch_invariant: bool,
) -> Result<Vec<Vec<f32>>> {
    let _fixed = batch_invariant.then(FixedOrder::enter);
    let n = plan.tokens.len();
    let input = Tensor::from_vec(plan.tokens.clone(), (n, 1), device)?;
    let positions: Vec<u32> = plan.positions.iter().map(|&p| p as u32).collect();
    let positions = Tensor::from_vec(positions, (n, 1), device)?;
    let mut store = PagedStep {
        cache,
        tables: &plan.tables,
        positions: &plan.positions,
    };
    let hidden = model.forward_step_hidden(&input, &positions, &mut store)?;
    let wanted: Vec<u32> = plan
        .kinds
        .iter()
        .enumerate()
        .filter(|(_, k)| matches!(k, RowKind::Decode(_) | RowKind::Prefill(_, true)))
        .map(|(i, _)| i as u32)
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let hidden = hidden.squeeze(1)?;
    let hidden = if wanted.len() == n {
        hidden
    } else {
        let m = wanted.len();
        hidden.index_select(&Tensor::from_vec(wanted, m, device)?, 0)?
    };
    Ok(model.lm_head(&hidden)?.to_vec2()?)
}

fn validate(model: &CausalLm, requests: &[Request]) -> Result<()> {
    let vocab = model.config().vocab_size as u32;
    for (i, r) in requests.iter().enumerate() {
        if r.prompt.is_empty() {
            return Err(Error::invalid(format!(
                "prompt {i} is empty: generation needs at least one token"
            )));
        }
        if let Some(bad) = r.prompt.iter().find(|&&t| t >= vocab) {
            return Err(Error::invalid(format!(
                "prompt {i}: token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
    }
    Ok(())
}
