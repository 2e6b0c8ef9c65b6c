//! multiq: many threads sharing one GPU safely.
//!
//! Threads take streams from a [`StreamPool`] (one per thread, round-robin, like PyTorch's
//! CUDA stream pool), submit kernels through a per-pool [`LockMode`], and wait on their own
//! [`Ticket`]s. Backends (CPU always; CUDA when present) sit behind one trait in
//! [`backend`]; nothing else names a backend. See `docs/ARCHITECTURE.md` for how an op flows.
//!
//! ```
//! use multiq::{Device, Kernel, PoolConfig, StreamPool};
//! let device = Device::cpu(2)?;
//! let pool = StreamPool::new(&device, PoolConfig::default())?;
//! let mut buf = device.buffer_from(&[0.5; 1024])?;
//! pool.current()?.launch(Kernel::SimpleCompute { iters: 10 }, &mut buf)?.wait()?;
//! assert_eq!(buf.read()?[0], multiq::kernel::simple_compute(0.5, 10));
//! # Ok::<(), multiq::Error>(())
//! ```

#![warn(missing_docs)]

pub(crate) mod atomic_file;
pub mod backend;
pub mod bench;
pub(crate) mod env_knob;
pub mod error;
pub mod kernel;
pub mod model;
pub mod report;
pub mod runtime;
pub mod stdout;
pub mod stress;
pub(crate) mod sync;
pub mod tensor;

pub use backend::{BackendKind, DType, DeviceInfo, DeviceOptions, Precision, WaitPolicy};
pub use error::{Error, Result};
pub use kernel::Kernel;
pub use model::{Model, ModelOptions};
pub use runtime::{
    Buffer, CoalescePolicy, Device, Inflight, MatmulCoalescer, MatmulCoalescerConfig, PoolConfig,
    Stream, StreamPool, Ticket, QUEUE_MIN_LOAD,
};
pub use sync::submit_lock::LockMode;
pub use tensor::Tensor;
