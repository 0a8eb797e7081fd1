//! One generated continuation while it decodes: [`Decoding`] keeps its tokens and its own random
//! stream and decides when it ends (EOS id, stop string, `max_new_tokens`).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::generate::{FinishReason, Generated, GenerationParams, earliest_stop};
use crate::sampling::{SamplingParams, sample};
use crate::tokenizer::Tokenizer;

/// The decoding state of one request.
#[derive(Debug)]
pub struct Decoding {
    ids: Vec<u32>,
    rng: ChaCha8Rng,
    finished: Option<FinishReason>,
    stop_text: Option<String>,
}

impl Decoding {
    /// A continuation drawing from stream `stream` of `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self {
            ids: Vec::new(),
            rng,
            finished: None,
            stop_text: None,
        }
    }

    /// The last token, to be fed at the next step.
    pub fn last(&self) -> Option<u32> {
        self.ids.last().copied()
    }

    /// Whether the continuation has ended.
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// Picks the next token from `logits` and checks the stop conditions.
    pub fn push(
        &mut self,
        logits: &[f32],
        sampling: &SamplingParams,
        params: &GenerationParams,
        tokenizer: &Tokenizer,
    ) -> Result<()> {
        let token = sample(logits, sampling, &mut self.rng);
        self.ids.push(token);
        let max_stop = params
            .stop_strings
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        if params.eos_ids.contains(&token) {
            self.finished = Some(FinishReason::Stop);
        } else if max_stop > 0 {
            // A stop string completed by this token lies within the last `max_stop + 4` tokens
            // (every token decodes to at least one byte, special tokens aside), so only that tail
            // is decoded each step; the full text is decoded on a hit.
            let tail_start = self.ids.len().saturating_sub(max_stop + 4);
            let tail = tokenizer.decode(&self.ids[tail_start..], true)?;
            if earliest_stop(&tail, &params.stop_strings).is_some() {
                let text = tokenizer.decode(&self.ids, true)?;
                if let Some(cut) = earliest_stop(&text, &params.stop_strings) {
                    self.stop_text = Some(text[..cut].to_string());
                    self.finished = Some(FinishReason::Stop);
                }
            }
        }
        if self.finished.is_none() && self.ids.len() >= params.max_new_tokens {
            self.finished = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// The finished continuation with its text.
    pub fn finish(self, tokenizer: &Tokenizer) -> Result<Generated> {
        let text = match self.stop_text {
            Some(t) => t,
            None => tokenizer.decode(&self.ids, true)?,
        };
        Ok(Generated {
            token_ids: self.ids,
            text,
            finish_reason: self.finished.unwrap_or(FinishReason::Length),
        })
    }
}
