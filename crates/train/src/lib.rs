//! Training of Llama 2 / GPT-J architectures with LoRA / rsLoRA adapters on libtorch.
//!
//! Models (`llama`, `gptj`, `random` presets, one entry point `model::CausalLm`) and their
//! loaders (`weights`, `gguf`, `load`); adapters (`lora`: one adapter and its PEFT file
//! format; `linear`: the layer that carries it; `inject`: which modules get adapters),
//! probes (`probe`), data (`data`), the loss (`loss`), optimizers (`optim`), checkpoints
//! (`checkpoint`), the instrumented training loop (`trainer`), one run's lifecycle
//! (`run`: model, run directory, manifest) and sweeps of runs (`sweep`).

pub mod audit;
mod checkpoint;
pub mod data;
pub mod device;
mod error;
pub mod generate;
pub mod gguf;
pub mod gptj;
pub mod inject;
mod law;
pub mod limits;
pub mod linear;
pub mod llama;
pub mod load;
pub mod lora;
mod loss;
pub mod memory;
pub mod model;
pub mod optim;
pub mod peft;
pub mod probe;
pub mod random;
pub mod run;
pub mod stop;
pub mod sweep;
pub mod sweep_lr;
pub mod text;
pub mod trainer;
pub mod weights;

pub use error::TrainError;
pub use model::CausalLm;

// jemalloc serves every allocation of every binary that links this crate, libtorch's
// included (`memory::ALLOCATOR` says why); naming the crate is what links it.
#[cfg(not(target_env = "msvc"))]
use tikv_jemalloc_sys as _;

#[cfg(test)]
mod tests {
    /// A small matmul through libtorch, checked against a closed form: proves tch links and
    /// runs (the rpath from build.rs finds libtorch_cpu.so).
    #[test]
    fn libtorch_matmul_runs() {
        let a = tch::Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]);
        let b = a.matmul(&a);
        let v: Vec<f32> = Vec::<f32>::try_from(b.flatten(0, 1)).expect("f32 tensor");
        assert_eq!(v, vec![7., 10., 15., 22.]);
    }
}
