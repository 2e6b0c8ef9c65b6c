//! Property tests (proptest) over what callers can get wrong in the public API: buffer
//! lengths, writes, pool sizes, stream indices, coalescing limits, window depths, kernel
//! names, CPU units, and launch shapes. Whatever the values, every call returns a value or
//! the documented typed error, never panics, and launches that are accepted give exactly
//! the serial reference (CPU backend). Weights files of any content parse into the right
//! shapes or fail as bad input. Round plans drawn from any seed and settings keep their
//! invariants. `PROPTEST_CASES` sets how many cases each property tries.

use std::time::Duration;

use multiq::kernel::simple_compute;
use multiq::model::weights::{self, HostWeights, MlpSpec};
use multiq::stress::plan::{Body, CoalesceKind, PlanSettings, RoundKind, RoundPlan};
use multiq::{
    BackendKind, CoalescePolicy, Device, DeviceOptions, Error, Inflight, Kernel, LockMode,
    PoolConfig, StreamPool, WaitPolicy,
};
use proptest::prelude::*;

fn device() -> Device {
    Device::cpu(2).unwrap()
}

fn lock() -> impl Strategy<Value = LockMode> {
    prop_oneof![
        Just(LockMode::Global),
        Just(LockMode::PerStream),
        Just(LockMode::None)
    ]
}

/// Buffer lengths: small real ones, zero, and ones no machine can hold.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..70_000,
        1 => (1usize << 40)..=usize::MAX,
    ]
}

fn coalesce() -> impl Strategy<Value = CoalescePolicy> {
    let n = prop_oneof![0usize..70, 4000usize..5000, Just(usize::MAX)];
    let depth = prop_oneof![0usize..5, 60usize..70, Just(usize::MAX)];
    (0u8..4, n, depth, 0u64..200).prop_map(|(k, max_batch, depth, us)| {
        let max_delay = Duration::from_micros(us);
        match k {
            0 => CoalescePolicy::Off,
            3 => CoalescePolicy::Persistent,
            1 => CoalescePolicy::Fixed {
                max_batch,
                max_delay,
                depth,
            },
            _ => CoalescePolicy::Adaptive {
                max_batch,
                max_delay,
                latency_target: Duration::from_micros(100),
                depth,
            },
        }
    })
}

/// Coalescing policies the pool accepts.
fn valid_coalesce() -> impl Strategy<Value = CoalescePolicy> {
    (0u8..4, 1usize..=64, 1usize..=8, 0u64..200).prop_map(|(k, max_batch, depth, us)| {
        let max_delay = Duration::from_micros(us);
        match k {
            0 => CoalescePolicy::Off,
            1 => CoalescePolicy::Fixed {
                max_batch,
                max_delay,
                depth,
            },
            2 => CoalescePolicy::Adaptive {
                max_batch,
                max_delay,
                latency_target: Duration::from_micros(100),
                depth,
            },
            _ => CoalescePolicy::Persistent,
        }
    })
}

proptest! {
    #[test]
    fn allocations_succeed_or_fail_typed(len in length()) {
        let dev = device();
        match dev.alloc(len) {
            Ok(b) => prop_assert_eq!(b.len(), len),
            Err(Error::InvalidArgument(_)) => prop_assert!(len == 0 || len >= 1 << 40),
            Err(Error::OutOfMemory { .. }) => prop_assert!(len >= 1 << 40),
            Err(e) => prop_assert!(false, "alloc({len}): unexpected {e}"),
        }
    }

    #[test]
    fn writes_of_the_wrong_length_are_refused_and_change_nothing(
        len in 1usize..5000,
        other in 0usize..5000,
        v in any::<f32>(),
    ) {
        let dev = device();
        let init: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let mut buf = dev.buffer_from(&init).unwrap();
        let r = buf.write(&vec![v; other]);
        if other == len {
            prop_assert!(r.is_ok());
            let back = buf.read().unwrap();
            prop_assert!(back.iter().all(|x| x.to_bits() == v.to_bits()));
        } else {
            prop_assert!(matches!(r, Err(Error::InvalidArgument(_))));
            prop_assert_eq!(buf.read().unwrap(), init);
        }
    }

    #[test]
    fn pools_accept_exactly_their_documented_range(
        streams in prop_oneof![0usize..40, 1000usize..1100, Just(usize::MAX)],
        lock in lock(),
        coalesce in coalesce(),
        index in prop_oneof![0usize..64, Just(usize::MAX)],
    ) {
        let dev = device();
        let (batch_ok, depth_ok) = match coalesce {
            CoalescePolicy::Off | CoalescePolicy::Persistent => (true, true),
            CoalescePolicy::Fixed { max_batch, depth, .. }
            | CoalescePolicy::Adaptive { max_batch, depth, .. } => {
                ((1..=4096).contains(&max_batch), (1..=64).contains(&depth))
            }
        };
        let valid = (1..=1024).contains(&streams) && batch_ok && depth_ok;
        match StreamPool::new(&dev, PoolConfig { streams, lock, coalesce }) {
            Ok(p) => {
                prop_assert!(valid);
                match p.acquire(index) {
                    Ok(s) => prop_assert!(index < streams && s.index() == index),
                    Err(Error::NoSuchStream { index: i, size }) => {
                        prop_assert!(index >= streams && i == index && size == streams)
                    }
                    Err(e) => prop_assert!(false, "acquire({index}): {e}"),
                }
            }
            Err(Error::InvalidArgument(_)) => prop_assert!(!valid),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    #[test]
    fn windows_kernels_and_units_are_checked(
        depth in prop_oneof![0usize..10, 4090usize..4100, Just(usize::MAX)],
        name in prop_oneof![Just("simple_compute".to_string()), any::<String>()],
        iters in any::<u32>(),
        units in prop_oneof![Just(0usize), 1usize..4, 1025usize..2000, Just(usize::MAX)],
    ) {
        let w = Inflight::new(depth);
        prop_assert_eq!(w.is_ok(), (1..=4096).contains(&depth));
        match Kernel::by_name(&name, iters) {
            Ok(k) => prop_assert_eq!(k, Kernel::SimpleCompute { iters }),
            Err(Error::UnknownKernel(n)) => prop_assert_eq!(n, name),
            Err(e) => prop_assert!(false, "{e}"),
        }
        let opened = Device::open(&DeviceOptions {
            backend: Some(BackendKind::Cpu),
            cpu_units: Some(units),
            ..Default::default()
        });
        match opened {
            Ok(d) => prop_assert_eq!(d.info().units, units),
            Err(Error::InvalidArgument(_)) => prop_assert!(units == 0 || units > 1024),
            Err(e) => prop_assert!(false, "{e}"),
        }
    }

    /// Random shapes, single and grouped launches, several streams, random waits: every
    /// buffer ends bit-identical to the serial reference.
    #[test]
    fn any_launch_shape_matches_the_reference(
        lens in proptest::collection::vec(1usize..9000, 1..5),
        steps in proptest::collection::vec((0usize..5, 0u32..3, 0usize..3, any::<bool>()), 1..12),
        lock in lock(),
        coalesce in valid_coalesce(),
    ) {
        // Coalescing with blocking waits hangs when nobody waits for a launched batch (the
        // known coalescer bug, tests/stress.rs, ignored test): yielding waits there until fixed.
        let wait = if coalesce == CoalescePolicy::Off { WaitPolicy::Block } else { WaitPolicy::Yield };
        let dev = Device::open(&DeviceOptions {
            backend: Some(BackendKind::Cpu),
            cpu_units: Some(2),
            wait: Some(wait),
            ..Default::default()
        })
        .unwrap();
        let pool = StreamPool::new(&dev, PoolConfig { streams: 3, lock, coalesce }).unwrap();
        let init = |b: usize, i: usize| 0.01 + (b * 7 + i % 13) as f32 * 1e-3;
        let mut bufs: Vec<_> = lens
            .iter()
            .enumerate()
            .map(|(b, &n)| dev.buffer_from(&(0..n).map(|i| init(b, i)).collect::<Vec<_>>()).unwrap())
            .collect();
        let mut total = vec![0u32; bufs.len()];
        let streams: Vec<_> = (0..3).map(|i| pool.acquire(i).unwrap()).collect();
        for (b, iters, s, wait) in steps {
            let k = Kernel::SimpleCompute { iters };
            let stream = &streams[s];
            let ticket = if b >= bufs.len() {
                let mut all: Vec<&mut multiq::Buffer> = bufs.iter_mut().collect();
                let t = stream.launch_many(k, &mut all).unwrap();
                total.iter_mut().for_each(|t| *t += iters);
                t
            } else {
                total[b] += iters;
                stream.launch(k, &mut bufs[b]).unwrap()
            };
            if wait {
                ticket.wait().unwrap();
            }
        }
        for (b, buf) in bufs.iter_mut().enumerate() {
            let out = buf.read().unwrap();
            for (i, &v) in out.iter().enumerate() {
                let want = simple_compute(init(b, i), total[b]);
                prop_assert_eq!(v.to_bits(), want.to_bits(), "buffer {} element {}", b, i);
            }
        }
    }

    #[test]
    fn any_seed_and_settings_draw_a_sound_plan(
        seed in any::<u64>(),
        threads in 1usize..64,
        kinds in proptest::sample::subsequence(RoundKind::ALL.to_vec(), 1..=4),
        coalesce in proptest::sample::subsequence(CoalesceKind::ALL.to_vec(), 1..=3),
        backend in prop_oneof![Just(None), Just(Some(BackendKind::Cpu)), Just(Some(BackendKind::Cuda))],
    ) {
        let settings = PlanSettings { backend, threads, kinds: kinds.clone(), units: None, wait: None, coalesce, queue_chain: None };
        let plan = RoundPlan::draw(seed, &settings);
        prop_assert!(kinds.contains(&plan.kind));
        prop_assert!(!plan.describe().is_empty());
        if let Body::Mixed(p) = &plan.body {
            let want = if plan.kind == RoundKind::Oversubscribe { 256 } else { threads };
            prop_assert_eq!(p.threads.len(), want);
            prop_assert!(p.trigger >= 1);
            prop_assert!((1..=1024).contains(&p.pool.streams));
        }
    }

    /// Arbitrary bytes, and real weights files cut short or with bytes changed: parsing gives
    /// weights of exactly the expected shapes, or a bad-input error naming the file; a file
    /// written by multiq reads back equal.
    #[test]
    fn weights_files_parse_or_fail_as_bad_input(
        junk in proptest::collection::vec(any::<u8>(), 0..600),
        widths in proptest::collection::vec(1usize..9, 2..5),
        seed in any::<u64>(),
        cut in any::<proptest::sample::Index>(),
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let spec = MlpSpec { widths };
        let path = std::path::Path::new("fuzz.safetensors");
        let judge = |bytes: &[u8]| -> Result<(), TestCaseError> {
            match weights::parse(path, bytes, &spec) {
                Ok(w) => {
                    prop_assert_eq!(&w.spec, &spec);
                    for ((inp, out), (wt, b)) in spec.layers().into_iter().zip(&w.layers) {
                        prop_assert_eq!(wt.len(), inp * out);
                        prop_assert_eq!(b.len(), out);
                    }
                }
                Err(Error::BadInput { path: p, .. }) => prop_assert_eq!(p, "fuzz.safetensors"),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
            Ok(())
        };
        judge(&junk)?;
        let w = HostWeights::random(&spec, seed).unwrap();
        let good = weights::serialize(&w).unwrap();
        prop_assert_eq!(weights::parse(path, &good, &spec).unwrap(), w);
        judge(&good[..cut.index(good.len() + 1)])?;
        let mut bent = good.clone();
        for (at, v) in flips {
            let i = at.index(bent.len());
            bent[i] = v;
        }
        judge(&bent)?;
    }
}
