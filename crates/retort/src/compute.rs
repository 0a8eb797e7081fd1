//! Where and in which precision local models run: `--device cpu|cuda[:N]` (or `RETORT_DEVICE`)
//! and `--dtype auto|f32|bf16|f16`.
//!
//! Inference (generate, score, eval, trace, selection scoring, the teacher cache) runs in the
//! chosen dtype: on CUDA the whole model; on the CPU, bf16/f16 store the weights of the linear
//! layers in that type and compute in f32 (decoding reads every weight per token, so this halves
//! the bytes read). `auto` is f32 on the CPU and the checkpoint's `torch_dtype` on CUDA.
//!
//! Training keeps float32 master weights and AdamW state whatever the dtype; bf16/f16 computes the
//! matrix multiplies of the forward and backward pass in that type (as `torch.autocast` does) and
//! the loss and divergences in f32. `auto` trains in f32 on the CPU and with bf16 autocast on CUDA.
//!
//! A device is opened once per process ([`Device`] values are compared by identity, so the
//! teacher and the student must share one): [`DeviceChoice::device`] caches it.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// A device by name: `cpu`, `cuda` (ordinal 0) or `cuda:N`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceChoice {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (needs a `cuda` build).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        match text.as_str() {
            "cpu" => return Ok(Self::Cpu),
            "cuda" | "gpu" => return Ok(Self::Cuda(0)),
            _ => {}
        }
        if let Some(n) = text.strip_prefix("cuda:")
            && let Ok(n) = n.parse()
        {
            return Ok(Self::Cuda(n));
        }
        Err(format!(
            "unknown device `{text}`: expected `cpu`, `cuda` or `cuda:N` (N: the GPU's ordinal)"
        ))
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;

    fn try_from(text: String) -> std::result::Result<Self, String> {
        text.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(device: DeviceChoice) -> Self {
        device.to_string()
    }
}

impl DeviceChoice {
    /// The device, opened on first use and shared by every later call for the same choice.
    pub fn device(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => {
                static OPEN: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
                let mut open = OPEN
                    .get_or_init(|| Mutex::new(HashMap::new()))
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(device) = open.get(&ordinal) {
                    return Ok(device.clone());
                }
                let device = open_cuda(ordinal)?;
                open.insert(ordinal, device.clone());
                Ok(device)
            }
        }
    }

    /// Whether this is the CPU.
    pub fn is_cpu(self) -> bool {
        self == Self::Cpu
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    let hint = "is the NVIDIA driver (libcuda) installed, and are the CUDA libraries (libcublas, \
                libcurand, libnvrtc) on LD_LIBRARY_PATH?";
    // cudarc loads the CUDA libraries at run time and panics when one is missing: keep that
    // panic's message out of the way and answer with an error that names the device.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(previous);
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(Error::Invalid(format!(
            "--device cuda:{ordinal}: cannot open the GPU ({e}); {hint}"
        ))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a CUDA library failed to load");
            let why = why.split(" - searched for").next().unwrap_or(why);
            Err(Error::Invalid(format!(
                "--device cuda:{ordinal}: cannot open the GPU: {why}; {hint}"
            )))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Invalid(format!(
        "--device cuda:{ordinal}: this retort was built without CUDA; build it with \
         `scripts/cuda-build.sh` (cargo feature `cuda`)"
    )))
}

/// The numeric type of a run: `auto` or a fixed one (see the module docs for what each means
/// for inference and for training).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 on the CPU; on CUDA the checkpoint's dtype for inference and bf16 autocast for training.
    #[default]
    Auto,
    /// float32 throughout.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

impl Precision {
    /// Whether this is `auto`.
    pub fn is_auto(&self) -> bool {
        *self == Self::Auto
    }

    /// The fixed dtype, `None` for `auto`.
    pub fn dtype(self) -> Option<DType> {
        match self {
            Self::Auto => None,
            Self::F32 => Some(DType::F32),
            Self::Bf16 => Some(DType::BF16),
            Self::F16 => Some(DType::F16),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// Device and dtype of a command's local models.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Compute {
    /// Where the models run.
    pub device: DeviceChoice,
    /// In which precision.
    pub precision: Precision,
}

impl Compute {
    /// The CPU in f32 (the default).
    pub fn cpu() -> Self {
        Self::default()
    }

    /// How to load a model for inference.
    pub fn load_options(&self) -> Result<retort_model::LoadOptions> {
        Ok(retort_model::LoadOptions {
            device: self.device.device()?,
            dtype: self.precision.dtype(),
            hf_cache: None,
        })
    }

    /// The dtype of training's matrix multiplies (`None`: f32, no autocast).
    pub fn autocast(&self) -> Option<DType> {
        match (self.precision, self.device) {
            (Precision::Auto, DeviceChoice::Cpu) | (Precision::F32, _) => None,
            (Precision::Auto, DeviceChoice::Cuda(_)) => Some(DType::BF16),
            (fixed, _) => fixed.dtype(),
        }
    }

    /// Whether this is the default (CPU, auto), which manifests leave out of a run's identity so
    /// that outputs written before these settings existed still resume.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.device, self.precision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for (text, device) in [
            ("cpu", DeviceChoice::Cpu),
            ("CUDA", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(device));
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("`cpu`, `cuda` or `cuda:N`"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_refuses_cuda_with_the_way_to_get_it() {
        let err = DeviceChoice::Cuda(1).device().unwrap_err().to_string();
        assert!(
            err.contains("cuda:1") && err.contains("scripts/cuda-build.sh"),
            "{err}"
        );
    }

    #[test]
    fn training_autocasts_only_when_asked_or_on_a_gpu() {
        let on = |device, precision| Compute { device, precision }.autocast();
        assert_eq!(on(DeviceChoice::Cpu, Precision::Auto), None);
        assert_eq!(on(DeviceChoice::Cpu, Precision::F32), None);
        assert_eq!(on(DeviceChoice::Cpu, Precision::Bf16), Some(DType::BF16));
        assert_eq!(
            on(DeviceChoice::Cuda(0), Precision::Auto),
            Some(DType::BF16)
        );
        assert_eq!(on(DeviceChoice::Cuda(0), Precision::F32), None);
    }
}
