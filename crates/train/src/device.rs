//! Where and in what a model runs: the device (`cpu`, `cuda`, `cuda:N`, [`DeviceName`])
//! and the base model's dtype ([`Dtype`]), each parsed once from its spelling.
//!
//! One binary serves machines with and without CUDA: the normal link leaves
//! `libtorch_cuda.so` out (rust-lld drops it as not needed), so when CUDA is asked for it
//! is loaded at run time, which registers libtorch's CUDA backend.
use crate::TrainError;
use rankstab_records::ParseError;
use std::ffi::{CStr, CString};
use std::fmt;
use std::str::FromStr;
use tch::{Device, Kind};

/// Loads `libtorch_cuda.so` with `RTLD_NOW | RTLD_GLOBAL`: first by name (the binary's
/// run path points at the libtorch it was linked with), then from `$LIBTORCH/lib`.
///
/// # Errors
/// The loader's message for every place tried (e.g. a missing `libcusparse.so.12` on a
/// CPU-only libtorch install).
#[allow(unsafe_code)]
pub fn load_cuda_backend() -> Result<(), String> {
    let mut tried = vec!["libtorch_cuda.so".to_string()];
    if let Ok(dir) = std::env::var("LIBTORCH") {
        tried.push(format!("{dir}/lib/libtorch_cuda.so"));
    }
    let mut errors = Vec::new();
    for name in &tried {
        let c =
            CString::new(name.as_str()).map_err(|_| format!("{name}: path contains a NUL byte"))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call; dlopen has no
        // other preconditions. The handle is deliberately never closed: the library must
        // stay loaded for libtorch's CUDA backend to remain registered. dlerror returns
        // either null or a valid C string owned by the loader, copied out at once.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            return Ok(());
        }
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        errors.push(msg);
    }
    Err(errors.join("; "))
}

rankstab_records::named_enum! {
    /// The dtype of a base model's weights (`--dtype`, a sweep's `dtype`); adapters stay
    /// f32 whatever it is.
    Dtype, "dtype" {
        /// 32-bit floats.
        #[default]
        F32 => "f32",
        /// bfloat16 (half the memory; for large models on accelerators).
        Bf16 => "bf16",
    }
}

impl Dtype {
    /// The libtorch kind of the weights.
    ///
    /// ```
    /// use rankstab_train::device::Dtype;
    /// assert_eq!("bf16".parse::<Dtype>().unwrap().kind(), tch::Kind::BFloat16);
    /// assert_eq!("f8".parse::<Dtype>().unwrap_err().to_string(), "unknown dtype 'f8' (allowed: f32, bf16)");
    /// ```
    pub fn kind(self) -> Kind {
        match self {
            Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
        }
    }
}

/// A device as named on the command line and in sweep files: `cpu`, `cuda`, `cuda:N` or
/// `auto` (the first GPU libtorch sees, which on a cluster is the one the scheduler
/// assigned through `CUDA_VISIBLE_DEVICES`, else the CPU). Parsing checks the spelling
/// only; [`DeviceName::device`] checks that it is there.
///
/// ```
/// use rankstab_train::device::DeviceName;
/// let d: DeviceName = "cuda:1".parse().unwrap();
/// assert_eq!((d, d.to_string()), (DeviceName::Cuda(Some(1)), "cuda:1".to_string()));
/// assert_eq!("cpu".parse::<DeviceName>().unwrap().device().unwrap(), tch::Device::Cpu);
/// assert!("tpu".parse::<DeviceName>().unwrap_err().to_string().contains("cpu, cuda"));
/// assert_eq!("auto".parse::<DeviceName>().unwrap().to_string(), "auto");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceName {
    /// The CPU.
    #[default]
    Cpu,
    /// A CUDA device: `cuda` (None, the first one) or `cuda:N`.
    Cuda(Option<usize>),
    /// The first visible GPU when libtorch has CUDA and sees one, else the CPU.
    Auto,
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceName::Cpu => f.pad("cpu"),
            DeviceName::Cuda(None) => f.pad("cuda"),
            DeviceName::Cuda(Some(i)) => f.pad(&format!("cuda:{i}")),
            DeviceName::Auto => f.pad("auto"),
        }
    }
}

impl FromStr for DeviceName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "cpu" => Ok(DeviceName::Cpu),
            "cuda" => Ok(DeviceName::Cuda(None)),
            "auto" => Ok(DeviceName::Auto),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .map(|i| DeviceName::Cuda(Some(i)))
                .ok_or_else(|| ParseError {
                    axis: "device",
                    value: s.to_string(),
                    allowed: "cpu, cuda, cuda:N, auto".into(),
                }),
        }
    }
}

rankstab_records::serde_via_str!(DeviceName);

impl DeviceName {
    /// The libtorch device, once it is known to be there.
    ///
    /// # Errors
    /// CUDA asked for but its library cannot be loaded or no device (or not that many) is
    /// visible (the reason is given).
    pub fn device(self) -> Result<Device, TrainError> {
        let index = match self {
            DeviceName::Cpu => return Ok(Device::Cpu),
            DeviceName::Cuda(i) => i.unwrap_or(0),
            DeviceName::Auto => {
                let gpu = tch::Cuda::is_available()
                    || (load_cuda_backend().is_ok() && tch::Cuda::device_count() > 0);
                return Ok(if gpu { Device::Cuda(0) } else { Device::Cpu });
            }
        };
        let name = self.to_string();
        if !tch::Cuda::is_available() {
            if let Err(why) = load_cuda_backend() {
                return Err(TrainError::Invalid(format!(
                    "device {name:?} was asked for, but libtorch's CUDA library could not be loaded ({why}); \
                     this libtorch is CPU-only here: use --device cpu, or run with LD_LIBRARY_PATH set to a CUDA torch's lib folder"
                )));
            }
        }
        let n = tch::Cuda::device_count();
        if n <= 0 {
            return Err(TrainError::Invalid(format!(
                "device {name:?} was asked for, but libtorch's CUDA backend sees no GPU (no device or no driver): use --device cpu"
            )));
        }
        if index as i64 >= n {
            return Err(TrainError::Invalid(format!(
                "device {name:?} was asked for, but only {n} CUDA device(s) are visible"
            )));
        }
        Ok(Device::Cuda(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// auto is the first GPU where libtorch sees one, else the CPU (never an error).
    #[test]
    fn auto_is_the_gpu_when_there_is_one_else_the_cpu() {
        let gpu = DeviceName::Cuda(None).device().ok();
        assert_eq!(
            DeviceName::Auto.device().expect("never an error"),
            gpu.unwrap_or(Device::Cpu)
        );
    }

    #[test]
    fn cuda_absent_is_a_clear_error_not_a_panic() {
        match DeviceName::Cuda(None).device() {
            Ok(Device::Cuda(0)) => {} // a machine with a GPU
            Ok(d) => panic!("unexpected device {d:?}"),
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("--device cpu") && m.contains("cuda"), "{m}");
            }
        }
        assert!("cuda:x".parse::<DeviceName>().is_err());
    }

    #[test]
    fn device_names_round_trip() {
        for name in ["cpu", "cuda", "cuda:0", "cuda:3", "auto"] {
            let d: DeviceName = name.parse().expect("known");
            assert_eq!(d.to_string(), name);
            let json = serde_json::to_string(&d).expect("serialise");
            assert_eq!(
                serde_json::from_str::<DeviceName>(&json).expect("read back"),
                d
            );
        }
        assert_eq!(
            "tpu"
                .parse::<DeviceName>()
                .expect_err("unknown")
                .to_string(),
            "unknown device 'tpu' (allowed: cpu, cuda, cuda:N, auto)"
        );
    }
}

/// Turns on flush-to-zero and denormals-are-zero for f32/f64 arithmetic on this thread
/// and on every thread it starts afterwards (threads inherit the control register), as
/// `torch.set_flush_denormal(True)` does. Call it first thing in `main`, before libtorch
/// starts its thread pool.
///
/// Why: LoRA training with small learning rates produces gradients and Adam moments
/// around 1e-20 whose squares are subnormal; x86 processes subnormal operands up to a
/// hundred times slower (a SmolLM2 step went from 2 s to 30 s). Flushing them to zero
/// changes results by less than 1e-38 per value. Returns whether the mode was set (only
/// on x86-64).
#[allow(unsafe_code, deprecated)]
pub fn flush_denormals() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        // SAFETY: reading and writing MXCSR only changes how this thread rounds subnormal
        // numbers (bit 15 FTZ, bit 6 DAZ); it is the documented way to set these modes.
        unsafe { _mm_setcsr(_mm_getcsr() | 0x8040) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod denormal_tests {
    /// After the call, a subnormal product is flushed to zero, on this thread and on a
    /// thread started afterwards.
    #[test]
    fn flush_denormals_flushes() {
        if !super::flush_denormals() {
            return;
        }
        let tiny = std::hint::black_box(1e-30f32);
        assert_eq!(tiny * std::hint::black_box(1e-10f32), 0.0);
        let other = std::thread::spawn(move || tiny * std::hint::black_box(1e-10f32))
            .join()
            .expect("thread");
        assert_eq!(other, 0.0);
    }
}
