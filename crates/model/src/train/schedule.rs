//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay to a floor.
//!
//! [`LrSchedule::lr_at`] takes the 0-based index of the optimizer step about to be taken. Warmup
//! uses `(step + 1) / warmup_steps`, so the first step already moves the weights (transformers'
//! schedulers spend their first step at learning rate 0).

use std::f64::consts::PI;

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Stay at the peak learning rate.
    Constant,
    /// Fall linearly from the peak to `min_lr_ratio * peak` at `total_steps`.
    Linear,
    /// Follow half a cosine from the peak to `min_lr_ratio * peak` at `total_steps`.
    Cosine,
}

/// A learning-rate schedule: `warmup_steps` of linear warmup, then [`Decay`] until `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Number of warmup steps (0 for none).
    pub warmup_steps: usize,
    /// Total number of optimizer steps; the decay ends here and the floor holds after it.
    pub total_steps: usize,
    /// The decay shape after warmup.
    pub decay: Decay,
    /// The floor as a fraction of the peak (0.1 keeps 10% of the peak learning rate at the end).
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// A constant learning rate with no warmup.
    pub fn constant(lr: f64) -> Self {
        Self {
            lr,
            warmup_steps: 0,
            total_steps: 0,
            decay: Decay::Constant,
            min_lr_ratio: 1.0,
        }
    }

    /// Linear warmup then cosine decay to `min_lr_ratio * lr` at `total_steps`.
    pub fn cosine(lr: f64, warmup_steps: usize, total_steps: usize, min_lr_ratio: f64) -> Self {
        Self {
            lr,
            warmup_steps,
            total_steps,
            decay: Decay::Cosine,
            min_lr_ratio,
        }
    }

    /// The learning rate for the optimizer step with 0-based index `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let floor = self.lr * self.min_lr_ratio;
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        let progress = if decay_steps == 0 {
            1.0
        } else {
            ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0)
        };
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => self.lr - (self.lr - floor) * progress,
            Decay::Cosine => floor + (self.lr - floor) * 0.5 * (1.0 + (PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_then_cosine_to_floor() {
        let s = LrSchedule::cosine(1e-3, 4, 14, 0.1);
        assert!(close(s.lr_at(0), 0.25e-3));
        assert!(close(s.lr_at(3), 1e-3));
        assert!(close(s.lr_at(4), 1e-3));
        // Halfway through the decay the cosine sits midway between peak and floor.
        assert!(close(s.lr_at(9), 0.55e-3));
        assert!(close(s.lr_at(14), 1e-4));
        assert!(close(s.lr_at(1000), 1e-4));
        for step in 4..14 {
            assert!(s.lr_at(step + 1) < s.lr_at(step));
        }
    }

    #[test]
    fn linear_and_constant() {
        let s = LrSchedule {
            lr: 2.0,
            warmup_steps: 0,
            total_steps: 10,
            decay: Decay::Linear,
            min_lr_ratio: 0.0,
        };
        assert!(close(s.lr_at(0), 2.0));
        assert!(close(s.lr_at(5), 1.0));
        assert!(close(s.lr_at(10), 0.0));
        let c = LrSchedule::constant(0.5);
        assert!(close(c.lr_at(0), 0.5));
        assert!(close(c.lr_at(99), 0.5));
    }
}
