//! The [`MockServer`](crate::mock_server::MockServer)'s model mode ([`MockModel`]): scoring
//! answers computed by a real [`retort_model`] model, so a test can assert that a remote score
//! equals the local one.
//!
//! It answers, for a token-id (or text) `prompt`:
//! - `POST /v1/completions` with `prompt_logprobs: k` as vLLM does: per position a map from id to
//!   `{logprob, rank, decoded_token}` holding the actual token and the top-k, plus
//!   `prompt_token_ids` (unless [`MockModel::prompt_logprobs`] is off: then the field is absent,
//!   as on servers without it);
//! - `POST /v1/completions` with `echo` + `logprobs: k`: tokens as `token_id:N` (vLLM's
//!   `--return-tokens-as-token-ids`), `token_logprobs`, `top_logprobs`, `text_offset`;
//! - `POST /generate` as SGLang does: `meta_info.input_token_logprobs` (`[logprob, id, null]`
//!   from `logprob_start_len`, null at position 0) and `input_top_logprobs`.
//!
//! [`MockModel::padded_rows`] appends that many output rows with logits far below the rest, as a
//! padded-vocabulary model has (ids past the tokenizer never win).

use candle_core::{DType, Tensor};
use retort_model::load::LoadedModel;
use serde_json::{Map, Value, json};

/// A real model behind the mock server.
#[derive(Debug, Clone)]
pub struct MockModel {
    /// The model that scores.
    pub model: LoadedModel,
    /// Extra output rows (a padded vocabulary), with logits 30 below the smallest real one.
    pub padded_rows: usize,
    /// Whether `prompt_logprobs` is served (off: the echo fallback is exercised).
    pub prompt_logprobs: bool,
}

impl MockModel {
    /// Serves `model` with `prompt_logprobs` and no padding.
    pub fn new(model: LoadedModel) -> Self {
        Self {
            model,
            padded_rows: 0,
            prompt_logprobs: true,
        }
    }

    /// Log-probs `[n, rows]` of every position of `ids` (row i predicts token i + 1).
    fn logprobs(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>, String> {
        let run = || -> crate::Result<Vec<Vec<f32>>> {
            let net = &self.model.model;
            let input = Tensor::from_slice(ids, (1, ids.len()), net.device())?;
            let hidden = net.forward_hidden(&input, None, None)?;
            let mut logits = net.lm_head(&hidden)?.to_dtype(DType::F32)?.squeeze(0)?;
            if self.padded_rows > 0 {
                let low = (logits.min_keepdim(1)? - 30.0)?;
                let pad = low.broadcast_as((ids.len(), self.padded_rows))?;
                logits = Tensor::cat(&[&logits, &pad.contiguous()?], 1)?;
            }
            Ok(retort_model::train::log_softmax(&logits)?.to_vec2::<f32>()?)
        };
        run().map_err(|e| format!("mock model: {e}"))
    }

    fn ids(&self, body: &Value, field: &str) -> Result<Vec<u32>, String> {
        match body.get(field) {
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| format!("`{field}` must hold token ids"))
                })
                .collect(),
            Some(Value::String(text)) => self
                .model
                .tokenizer
                .encode(text, true)
                .map_err(|e| e.to_string()),
            _ => Err(format!("missing `{field}`")),
        }
    }

    /// `POST /v1/completions` for scoring (or tokenizing: `return_token_ids`); `None` when the
    /// body asks for none of `prompt_logprobs`, `echo`, `return_token_ids` (the synthetic
    /// generator answers those).
    pub(crate) fn completions(&self, body: &Value) -> Option<Result<Value, String>> {
        let prompt_k = body.get("prompt_logprobs").and_then(Value::as_u64);
        let echo = body.get("echo").and_then(Value::as_bool) == Some(true);
        let return_ids = body.get("return_token_ids").and_then(Value::as_bool) == Some(true);
        if prompt_k.is_none() && !echo && !return_ids {
            return None;
        }
        Some(self.score_completions(body, prompt_k, echo, return_ids))
    }

    fn score_completions(
        &self,
        body: &Value,
        prompt_k: Option<u64>,
        echo: bool,
        return_ids: bool,
    ) -> Result<Value, String> {
        let ids = self.ids(body, "prompt")?;
        if ids.is_empty() {
            return Err("empty prompt".to_owned());
        }
        let rows = self.logprobs(&ids)?;
        // The one generated token: greedy after the prompt.
        let next = argmax(&rows[ids.len() - 1]);
        let mut choice = json!({"index": 0, "text": "", "finish_reason": "length",
            "prompt_token_ids": ids, "token_ids": [next]});
        if let Some(k) = prompt_k.filter(|_| self.prompt_logprobs) {
            let entries: Vec<Value> = (0..ids.len())
                .map(|i| match i {
                    0 => Value::Null,
                    _ => Value::Object(self.entry_map(&rows[i - 1], ids[i], k as usize)),
                })
                .collect();
            choice["prompt_logprobs"] = Value::Array(entries);
        } else if !echo && !return_ids {
            // A server without `prompt_logprobs` ignores the field.
            choice.as_object_mut().map(|c| c.remove("prompt_token_ids"));
        }
        if echo {
            let k = body.get("logprobs").and_then(Value::as_u64).unwrap_or(0) as usize;
            let all: Vec<u32> = ids.iter().copied().chain([next]).collect();
            let tokens: Vec<String> = all.iter().map(|id| format!("token_id:{id}")).collect();
            let token_logprobs: Vec<Value> = (0..all.len())
                .map(|i| match i {
                    0 => Value::Null,
                    _ => json!(rows[i - 1][all[i] as usize]),
                })
                .collect();
            let top: Vec<Value> = (0..all.len())
                .map(|i| match i {
                    0 => Value::Null,
                    _ => {
                        let mut map = Map::new();
                        for (id, lp) in crate::backend::scorer::top_k(&rows[i - 1], k) {
                            map.insert(format!("token_id:{id}"), json!(lp));
                        }
                        map.insert(
                            format!("token_id:{}", all[i]),
                            json!(rows[i - 1][all[i] as usize]),
                        );
                        Value::Object(map)
                    }
                })
                .collect();
            choice["logprobs"] = json!({"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top, "text_offset": (0..all.len()).collect::<Vec<_>>()});
        }
        Ok(
            json!({"id": "cmpl-mock", "object": "text_completion", "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": ids.len(), "completion_tokens": 1,
                "total_tokens": ids.len() + 1}}),
        )
    }

    /// vLLM's map for one position: the actual token and the top-k, each with its rank.
    fn entry_map(&self, row: &[f32], actual: u32, k: usize) -> Map<String, Value> {
        let rank = |id: u32| 1 + row.iter().filter(|&&x| x > row[id as usize]).count();
        let mut map = Map::new();
        let decoded = |id: u32| {
            self.model
                .tokenizer
                .decode(&[id], false)
                .unwrap_or_default()
        };
        for (id, lp) in crate::backend::scorer::top_k(row, k)
            .into_iter()
            .chain([(actual, row[actual as usize])])
        {
            map.insert(
                id.to_string(),
                json!({"logprob": lp, "rank": rank(id), "decoded_token": decoded(id)}),
            );
        }
        map
    }

    /// SGLang's `POST /generate` with `return_logprob`.
    pub(crate) fn sglang_generate(&self, body: &Value) -> Result<Value, String> {
        let ids = self.ids(body, "input_ids")?;
        if ids.is_empty() {
            return Err("empty input_ids".to_owned());
        }
        let start = body
            .get("logprob_start_len")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let k = body
            .get("top_logprobs_num")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let rows = self.logprobs(&ids)?;
        let at = |i: usize| (i > 0).then(|| rows[i - 1][ids[i] as usize]);
        let tokens: Vec<Value> = (start..ids.len())
            .map(|i| json!([at(i), ids[i], null]))
            .collect();
        let tops: Vec<Value> = (start..ids.len())
            .map(|i| match i {
                0 => Value::Null,
                _ => crate::backend::scorer::top_k(&rows[i - 1], k)
                    .into_iter()
                    .map(|(id, lp)| json!([lp, id, null]))
                    .collect(),
            })
            .collect();
        Ok(json!({"text": "", "meta_info": {"prompt_tokens": ids.len(),
            "completion_tokens": 0, "input_token_logprobs": tokens,
            "input_top_logprobs": tops}}))
    }
}

fn argmax(row: &[f32]) -> u32 {
    crate::backend::scorer::top_k(row, 1)
        .first()
        .map_or(0, |(id, _)| *id)
}
