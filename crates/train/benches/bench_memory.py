"""Memory helpers shared by the transformers sides of the benchmarks (forward_transformers.py,
train_step_transformers.py), the same measures as benches/common/mod.rs on the Rust side.
Each script is run as `python3 SCRIPT`, so its folder, and this module, is on sys.path.
"""


def rss_mb(field):
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MB; NaN if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak():
    """Returns the heap's free pages to the system (glibc's malloc_trim, as the Rust side
    does at the same point), then resets the peak resident set (VmHWM), so that it
    measures what runs from here on and not the loader's or the warm-up's freed buffers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
