//! Typed errors. Every fallible call in multiq returns [`Error`]; nothing a caller can do
//! wrong panics. Device errors are returned to the thread whose call observed them.

use crate::backend::BackendKind;

/// Result alias used throughout multiq.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in multiq.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A backend was asked for but cannot be used here (no driver, no device, missing library).
    #[error("backend `{backend}` is not available: {reason}")]
    BackendUnavailable {
        /// The backend that was asked for.
        backend: BackendKind,
        /// What is missing, in words.
        reason: String,
    },

    /// An allocation the device cannot satisfy.
    #[error("cannot allocate {elements} f32 elements ({bytes} bytes) on {device}: {reason}")]
    OutOfMemory {
        /// Elements asked for.
        elements: usize,
        /// Bytes asked for.
        bytes: u64,
        /// The device's name.
        device: String,
        /// Why it failed.
        reason: String,
    },

    /// A caller-supplied value is outside what the API accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A buffer, stream or event from one device was used with another.
    #[error("{what} belongs to another device")]
    WrongDevice {
        /// What was mixed up.
        what: &'static str,
    },

    /// Lock mode `none` needs each stream owned by exactly one thread.
    #[error("lock mode `none` requires a stream owned by one thread: {0}")]
    ExclusiveStreamRequired(String),

    /// A stream index outside the pool.
    #[error("stream {index} does not exist: the pool has {size} streams")]
    NoSuchStream {
        /// Index asked for.
        index: usize,
        /// Pool size.
        size: usize,
    },

    /// The device reported an error for work this thread submitted or waited on.
    #[error("device error in {op}: {message}")]
    Device {
        /// The operation that observed it (launch, record, wait, alloc, copy…).
        op: &'static str,
        /// The device's own description (for CUDA, the CUresult name and text).
        message: String,
    },

    /// The device's driver was shut down under this call: the process is exiting (its
    /// exit handlers tore the driver down while this thread still used it). Nothing is
    /// wrong with the call; no later call on this device can succeed.
    #[error("device error in {op}: the driver is shut down (the process is exiting)")]
    DeviceShutDown {
        /// The operation that observed it.
        op: &'static str,
    },

    /// An operation or element type this build or backend does not implement.
    #[error("not supported: {0}")]
    Unsupported(String),

    /// Tensor shapes that do not fit together (names the tensors and shapes).
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A kernel name that no backend knows.
    #[error("unknown kernel `{0}` (known: simple_compute)")]
    UnknownKernel(String),

    /// A results or anchor file that cannot be read as one (garbage, wrong shape, no runs).
    #[error("{path}: {reason}")]
    BadInput {
        /// The file involved, as given.
        path: String,
        /// What is wrong with it, in words.
        reason: String,
    },

    /// Writing results failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for an [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// True for errors caused by what the caller asked for (bad sizes, absent backends,
    /// misuse of lock modes), as opposed to failures while running.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::BackendUnavailable { .. }
                | Error::OutOfMemory { .. }
                | Error::InvalidArgument(_)
                | Error::WrongDevice { .. }
                | Error::ExclusiveStreamRequired(_)
                | Error::NoSuchStream { .. }
                | Error::UnknownKernel(_)
                | Error::Unsupported(_)
                | Error::Shape(_)
        )
    }
}
