//! Choosing the libtorch device. One binary serves machines with and without CUDA: the
//! normal link leaves `libtorch_cuda.so` out (rust-lld drops it as not needed), so when
//! CUDA is asked for it is loaded at run time, which registers libtorch's CUDA backend.
use crate::TrainError;
use std::ffi::{CStr, CString};
use tch::Device;

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

/// The device named `cpu`, `cuda` or `cuda:N`.
///
/// # Errors
/// An unknown name; CUDA asked for but its library cannot be loaded or no device is
/// visible (the reason is given).
///
/// ```
/// assert_eq!(rankstab_train::device::parse_device("cpu").unwrap(), tch::Device::Cpu);
/// assert!(rankstab_train::device::parse_device("tpu").is_err());
/// ```
pub fn parse_device(name: &str) -> Result<Device, TrainError> {
    let index = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
        {
            Some(i) => i,
            None => {
                return Err(TrainError::Invalid(format!(
                    "device {other:?} is not known: use cpu or cuda (or cuda:N)"
                )))
            }
        },
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_absent_is_a_clear_error_not_a_panic() {
        match parse_device("cuda") {
            Ok(Device::Cuda(0)) => {} // a machine with a GPU
            Ok(d) => panic!("unexpected device {d:?}"),
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("--device cpu") && m.contains("cuda"), "{m}");
            }
        }
        assert!(parse_device("cuda:x").is_err());
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
