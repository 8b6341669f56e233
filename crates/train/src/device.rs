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
