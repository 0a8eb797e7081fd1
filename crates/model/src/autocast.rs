//! Mixed precision for training, as `torch.autocast` does it: inside [`enter`]`(Some(dtype))` the
//! linear layers compute their matrix multiply in `dtype` (input and weight cast, the product
//! cast back to the input's dtype), while the weights stay f32 [`candle_core::Var`]s and every
//! other op (norms, softmax, the loss) keeps the input's dtype. The casts are differentiable, so
//! the backward pass runs the same multiplies in `dtype` and the gradients reach the f32 weights.
//!
//! The setting is per thread, like PyTorch's.

use std::cell::Cell;

use candle_core::DType;

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// The autocast dtype of this thread (`None`: off).
pub fn dtype() -> Option<DType> {
    AUTOCAST.with(Cell::get)
}

/// Sets this thread's autocast dtype until the guard is dropped (then the previous one returns).
pub fn enter(dtype: Option<DType>) -> Guard {
    let previous = AUTOCAST.with(|cell| cell.replace(dtype));
    Guard { previous }
}

/// Restores the previous autocast setting when dropped.
#[must_use = "autocast ends when the guard is dropped"]
pub struct Guard {
    previous: Option<DType>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        AUTOCAST.with(|cell| cell.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_nest_and_restore() {
        assert_eq!(dtype(), None);
        {
            let _outer = enter(Some(DType::BF16));
            assert_eq!(dtype(), Some(DType::BF16));
            {
                let _inner = enter(None);
                assert_eq!(dtype(), None);
            }
            assert_eq!(dtype(), Some(DType::BF16));
        }
        assert_eq!(dtype(), None);
    }
}
