//! Scoring: per-token log-probabilities of completions given prompts ([`score_batch`]), the
//! left-padded batch layout shared with generation ([`PaddedBatch`]), and the differentiable
//! [`token_logprobs_from_logits`] used by training losses.
//!
//! The LM head runs on chunks of positions ([`for_each_logits_chunk`], [`head_chunk_rows`]), each
//! reduced before the next, so a long sequence never holds its whole `[tokens, vocab]` logits.

use candle_core::{D, DType, Device, IndexOp, Tensor};

use crate::error::{Error, Result};
use crate::models::CausalLm;

/// Logits per chunk of positions through the LM head: 32 Mi (128 MiB in f32), about 220
/// positions at a 151,936-entry vocabulary.
pub const HEAD_CHUNK_ELEMENTS: usize = 1 << 25;

/// Positions per chunk of the LM head for a vocabulary of `vocab` entries: at most
/// [`HEAD_CHUNK_ELEMENTS`] logits at once, at least one position.
pub fn head_chunk_rows(vocab: usize) -> usize {
    (HEAD_CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

/// Applies the LM head to `hidden` (`[n, hidden]`, read without gradient) `chunk_rows`
/// positions at a time and hands each chunk's f32 logits `[len, vocab]` to `visit` with the
/// index of its first position; the chunk is dropped before the next is computed.
pub fn for_each_logits_chunk<E: From<Error>>(
    model: &CausalLm,
    hidden: &Tensor,
    chunk_rows: usize,
    mut visit: impl FnMut(usize, &Tensor) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let hidden = hidden.detach();
    let rows = hidden.dim(0).map_err(Error::from)?;
    let chunk_rows = chunk_rows.max(1);
    let mut start = 0;
    while start < rows {
        let len = chunk_rows.min(rows - start);
        let logits = hidden
            .narrow(0, start, len)
            .map_err(Error::from)
            .and_then(|h| model.lm_head(&h))?;
        visit(start, &logits)?;
        start += len;
    }
    Ok(())
}

/// `log p(targets[i])` at each row of `hidden` (`[n, hidden]`, position `i` predicting
/// `targets[i]`), through the LM head in chunks of `chunk_rows` positions.
pub fn target_logprobs_chunked(
    model: &CausalLm,
    hidden: &Tensor,
    targets: &[u32],
    chunk_rows: usize,
) -> Result<Vec<f32>> {
    let rows = hidden.dim(0)?;
    if rows != targets.len() {
        return Err(Error::invalid(format!(
            "{rows} hidden rows for {} targets",
            targets.len()
        )));
    }
    let mut out = Vec::with_capacity(rows);
    for_each_logits_chunk(model, hidden, chunk_rows, |start, logits| -> Result<()> {
        let len = logits.dim(0)?;
        let chunk = Tensor::from_slice(&targets[start..start + len], (1, len), logits.device())?;
        let lp = token_logprobs_from_logits(&logits.unsqueeze(0)?, &chunk)?;
        out.extend(lp.squeeze(0)?.to_vec1::<f32>()?);
        Ok(())
    })?;
    Ok(out)
}

/// Left-padded sequences with their attention mask and position ids.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// `[b, len]` u32, padding on the left.
    pub input_ids: Tensor,
    /// `[b, len]` u32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[b, len]` u32: `cumsum(mask) - 1`, padding set to 1 (as transformers' `generate`).
    pub position_ids: Tensor,
    /// Padding before each row.
    pub pad_lens: Vec<usize>,
    /// Padded length.
    pub len: usize,
}

impl PaddedBatch {
    /// Pads `seqs` on the left with `pad_id` to the longest length.
    pub fn left(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let b_sz = seqs.len();
        let mut ids = Vec::with_capacity(b_sz * len);
        let mut mask = Vec::with_capacity(b_sz * len);
        let mut pos = Vec::with_capacity(b_sz * len);
        let mut pad_lens = Vec::with_capacity(b_sz);
        for seq in seqs {
            let pad = len - seq.len();
            pad_lens.push(pad);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(seq);
            mask.extend(std::iter::repeat_n(0u32, pad));
            mask.extend(std::iter::repeat_n(1u32, seq.len()));
            pos.extend(std::iter::repeat_n(1u32, pad));
            pos.extend(0..seq.len() as u32);
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b_sz, len), device)?,
            attention_mask: Tensor::from_vec(mask, (b_sz, len), device)?,
            position_ids: Tensor::from_vec(pos, (b_sz, len), device)?,
            pad_lens,
            len,
        })
    }

    /// Whether any row is padded.
    pub fn has_padding(&self) -> bool {
        self.pad_lens.iter().any(|&p| p > 0)
    }
}

/// `log_softmax(logits)[target]` per position: `logits` `[b, t, vocab]`, `targets` `[b, t]` u32
/// -> `[b, t]` f32. Differentiable with respect to `logits`.
pub fn token_logprobs_from_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    if crate::kernels::supported(&logits) {
        return Ok(crate::kernels::target_logprobs(&logits, targets)?);
    }
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = targets.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?;
    Ok(logp
        .gather(&targets.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// Per-token log-probs of each completion given its prompt, from one left-padded batch.
///
/// Rows are padded with `pad_id` (masked out) and use `position_ids = cumsum(mask) - 1`, so each
/// row equals its unbatched score up to float rounding. Only the completion positions go
/// through `lm_head`, [`head_chunk_rows`] positions at a time. Every prompt needs at least one
/// token.
pub fn score_batch(
    model: &CausalLm,
    items: &[(Vec<u32>, Vec<u32>)],
    pad_id: u32,
) -> Result<Vec<Vec<f32>>> {
    let chunk_rows = head_chunk_rows(model.config().vocab_size);
    score_batch_chunked(model, items, pad_id, chunk_rows)
}

/// [`score_batch`] with `chunk_rows` positions per chunk of the LM head.
pub fn score_batch_chunked(
    model: &CausalLm,
    items: &[(Vec<u32>, Vec<u32>)],
    pad_id: u32,
    chunk_rows: usize,
) -> Result<Vec<Vec<f32>>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    for (i, (prompt, _)) in items.iter().enumerate() {
        if prompt.is_empty() {
            return Err(Error::invalid(format!(
                "item {i}: the prompt is empty; scoring needs at least one prompt token (e.g. BOS) to condition the first completion token"
            )));
        }
    }
    let vocab = model.config().vocab_size as u32;
    let seqs: Vec<Vec<u32>> = items
        .iter()
        .map(|(p, c)| p.iter().chain(c.iter()).copied().collect())
        .collect();
    for (i, seq) in seqs.iter().enumerate() {
        if let Some(bad) = seq.iter().find(|&&t| t >= vocab) {
            return Err(Error::invalid(format!(
                "item {i}: token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
    }
    let batch = PaddedBatch::left(&seqs, pad_id, model.device())?;
    let mask = batch.has_padding().then_some(&batch.attention_mask);
    let hidden = model.forward_hidden(&batch.input_ids, mask, Some(&batch.position_ids))?;
    let mut out = Vec::with_capacity(items.len());
    for (row, (prompt, completion)) in items.iter().enumerate() {
        if completion.is_empty() {
            out.push(Vec::new());
            continue;
        }
        // Position p predicts token p + 1.
        let start = batch.pad_lens[row] + prompt.len() - 1;
        let h = hidden.i((row, start..start + completion.len()))?;
        out.push(target_logprobs_chunked(model, &h, completion, chunk_rows)?);
    }
    Ok(out)
}
