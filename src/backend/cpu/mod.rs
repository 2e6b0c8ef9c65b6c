//! CPU backend: the embedded default, always available.
//!
//! It models a device of finite compute: a fixed set of execution units (a rayon pool of
//! `units` threads, default = available cores) shared by every stream. A kernel is split into
//! blocks of [`BLOCK`] elements that run on those units, so one large kernel can fill the
//! device while small kernels from several streams run side by side, and throughput
//! saturates when the units are busy, as on a GPU.
//!
//! Results are bit-identical to [`Kernel::reference`]: each element goes through the same f32
//! operations in the same order.

mod matmul;
mod stream;
#[cfg(all(test, not(loom)))]
pub(crate) use stream::fail_for_testing;

use std::any::Any;
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use super::{downcast, Backend, BackendBuffer, BackendEvent, BackendKind, BackendStream};
use super::{BackendSignal, DeviceInfo, DeviceOptions, WaitPolicy};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::runtime::live::StorageToken;
use stream::{CpuStream, StreamQueue, Units};

/// Elements per block: the unit of work an execution unit takes at a time.
pub const BLOCK: usize = 4096;

/// Largest buffer the CPU backend accepts (elements): indices stay far inside `usize`.
const MAX_ELEMENTS: usize = 1 << 34;

/// The CPU device.
pub struct CpuBackend {
    units: usize,
    wait: WaitPolicy,
    exec: Arc<Units>,
    streams: Mutex<Vec<Weak<StreamQueue>>>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("units", &self.units)
            .finish()
    }
}

impl CpuBackend {
    /// Opens a CPU device with `opts.cpu_units` execution units (default: available cores).
    pub(crate) fn new(opts: &DeviceOptions) -> Result<Self> {
        let units = match opts.cpu_units {
            Some(0) => return Err(Error::invalid("CPU execution units must be at least 1")),
            Some(n) if n > 1024 => {
                return Err(Error::invalid(format!(
                    "CPU execution units must be at most 1024, got {n}"
                )))
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(units)
            .thread_name(|i| format!("multiq-cpu-unit-{i}"))
            .build()
            .map_err(|e| Error::BackendUnavailable {
                backend: BackendKind::Cpu,
                reason: format!("cannot start {units} execution-unit threads: {e}"),
            })?;
        Ok(CpuBackend {
            units,
            wait: opts.wait.unwrap_or(WaitPolicy::Block),
            exec: Units::new(pool),
            streams: Mutex::new(Vec::new()),
        })
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: BackendKind::Cpu,
            name: format!("CPU ({} execution units)", self.units),
            units: self.units,
            memory_bytes: meminfo("MemTotal:"),
            driver: None,
            wait: self.wait,
            extra: vec![("block_elements".into(), BLOCK.to_string())],
        }
    }

    fn alloc(&self, len: usize) -> Result<Box<dyn BackendBuffer>> {
        let bytes = (len as u64).saturating_mul(4);
        let oom = |reason: String| Error::OutOfMemory {
            elements: len,
            bytes,
            device: "cpu".into(),
            reason,
        };
        if len > MAX_ELEMENTS {
            return Err(oom(format!(
                "more than the {MAX_ELEMENTS} elements a buffer may hold"
            )));
        }
        // Linux overcommits: a reservation that succeeds can still be killed when touched.
        // Refuse up front what the machine cannot hold.
        if let Some(avail) = self.memory_available() {
            if bytes > avail {
                return Err(oom(format!("only {avail} bytes of memory are available")));
            }
        }
        let mut data = Vec::new();
        data.try_reserve_exact(len)
            .map_err(|e| oom(e.to_string()))?;
        data.resize(len, 0.0f32);
        Ok(Box::new(CpuBuffer {
            data: Arc::new(Storage {
                data: RwLock::new(data),
                _live: StorageToken::new(bytes),
            }),
            len,
        }))
    }

    fn new_stream(&self) -> Result<Arc<dyn BackendStream>> {
        let stream = CpuStream::new(self.exec.clone(), self.wait);
        let mut streams = self.streams.lock();
        streams.retain(|w| w.strong_count() > 0);
        streams.push(Arc::downgrade(stream.queue()));
        Ok(Arc::new(stream))
    }

    fn new_event(&self) -> Result<Box<dyn BackendEvent>> {
        Ok(Box::new(stream::CpuEvent::new(self.wait)))
    }

    fn new_signal(&self) -> Result<Option<Arc<dyn BackendSignal>>> {
        Ok(Some(Arc::new(stream::CpuSignal::new())))
    }

    fn synchronize(&self) -> Result<()> {
        let streams: Vec<_> = self
            .streams
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for s in streams {
            s.wait_all(self.wait)?;
        }
        Ok(())
    }

    fn memory_available(&self) -> Option<u64> {
        meminfo("MemAvailable:")
    }

    fn max_elements(&self) -> usize {
        MAX_ELEMENTS
    }

    fn tolerance(&self, _kernel: Kernel) -> f32 {
        0.0
    }
}

/// A CPU buffer. Kernels lock it for their whole run (writers exclusively, matrix-product
/// inputs shared, so read-only weights serve many streams at once); the runtime's stream
/// ordering makes that lock uncontended in correct programs, and it keeps incorrect ones
/// memory-safe.
pub struct CpuBuffer {
    data: Arc<Storage>,
    /// Fixed at allocation (read without taking the lock).
    len: usize,
}

/// A buffer's elements, shared by the buffer and the queued kernels that use it; freed with
/// the last of them. Counted in [`crate::runtime::live_counts`] while it lives.
pub(super) struct Storage {
    data: RwLock<Vec<f32>>,
    _live: StorageToken,
}

impl std::ops::Deref for Storage {
    type Target = RwLock<Vec<f32>>;

    fn deref(&self) -> &Self::Target {
        &self.data
    }
}

impl BackendBuffer for CpuBuffer {
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

fn cpu_buffer(buf: &dyn BackendBuffer) -> Result<&CpuBuffer> {
    downcast::<CpuBuffer>(buf.as_any(), "buffer")
}

/// Reads a field (in kB) of /proc/meminfo, in bytes. `None` where there is no such file.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(units: usize) -> CpuBackend {
        CpuBackend::new(&DeviceOptions {
            cpu_units: Some(units),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn rejects_zero_units_and_impossible_allocations() {
        let zero = CpuBackend::new(&DeviceOptions {
            cpu_units: Some(0),
            ..Default::default()
        });
        assert!(matches!(zero, Err(Error::InvalidArgument(_))));
        let dev = device(1);
        assert!(matches!(
            dev.alloc(usize::MAX / 2),
            Err(Error::OutOfMemory { .. })
        ));
    }

    #[test]
    fn chained_products_read_what_was_just_written() {
        crate::backend::check_chained_products(&device(2));
    }

    #[test]
    fn staged_copies_round_trip() {
        crate::backend::check_staged_copies(&device(2));
    }

    #[test]
    fn products_whose_sizes_overflow_are_refused() {
        crate::backend::check_overflowing_products(&device(2));
    }

    #[test]
    fn launches_run_in_order_and_match_the_reference() {
        let dev = device(2);
        let s = dev.new_stream().unwrap();
        let n = BLOCK * 3 + 17;
        let buf = dev.alloc(n).unwrap();
        let init: Vec<f32> = (0..n).map(|i| crate::kernel::initial_value(0, i)).collect();
        s.upload(&*buf, &init).unwrap();
        let k = Kernel::SimpleCompute { iters: 3 };
        for _ in 0..5 {
            s.launch(k, &*buf).unwrap();
        }
        let ev = dev.new_event().unwrap();
        s.record(&*ev).unwrap();
        ev.wait().unwrap();
        assert!(ev.is_complete().unwrap());
        let mut out = vec![0.0; n];
        s.download(&*buf, &mut out).unwrap();
        let mut expect = init;
        for _ in 0..5 {
            k.reference(&mut expect);
        }
        assert_eq!(out, expect);
    }

    /// Streams take turns: one op on an idle stream runs after at most a task or two of a
    /// stream with a long queue, not after all of it. (The units' pool runs the jobs a
    /// worker spawns LIFO, and a stream that re-spawned its own drain job kept its unit until
    /// its queue was empty: the lone op waited for all 40 tasks.)
    #[test]
    fn a_stream_with_a_long_queue_does_not_starve_another() {
        let dev = device(1);
        let (busy, idle) = (dev.new_stream().unwrap(), dev.new_stream().unwrap());
        // About a millisecond each on one unit, so the 40 take far longer than it takes to
        // queue them and the lone op.
        let k = Kernel::SimpleCompute { iters: 20 };
        let big = dev.alloc(BLOCK).unwrap();
        let init: Vec<f32> = (0..BLOCK)
            .map(|i| crate::kernel::initial_value(0, i))
            .collect();
        busy.upload(&*big, &init).unwrap();
        let marks: Vec<_> = (0..40)
            .map(|_| {
                busy.launch(k, &*big).unwrap();
                let ev = dev.new_event().unwrap();
                busy.record(&*ev).unwrap();
                ev
            })
            .collect();
        let small = dev.alloc(1).unwrap();
        idle.launch(k, &*small).unwrap();
        let done = dev.new_event().unwrap();
        idle.record(&*done).unwrap();
        done.wait().unwrap();
        let busy_done = marks.iter().filter(|e| e.is_complete().unwrap()).count();
        assert!(
            busy_done <= 20,
            "the lone op waited for {busy_done} of the busy stream's 40 tasks"
        );
        busy.synchronize().unwrap();
        assert!(marks.iter().all(|e| e.is_complete().unwrap()));
        let mut out = vec![0.0; BLOCK];
        busy.download(&*big, &mut out).unwrap();
        let mut expect = init;
        for _ in 0..40 {
            k.reference(&mut expect);
        }
        assert_eq!(
            out, expect,
            "the busy stream's tasks did not all run, in order"
        );
    }
}
