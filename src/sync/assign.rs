//! `Slots`: a pool's fixed set of lazily made streams, and how a thread is given one.
//!
//! Invariants:
//! - A slot's value is made at most once, under the slot's own mutex; every caller of
//!   [`Slots::get_or_try_init`] for that slot gets that same value. A failed make leaves the
//!   slot empty for a later try.
//! - [`Slots::next_index`] hands out indices round-robin with one atomic add: concurrent
//!   callers get consecutive indices, so threads spread over the slots.
//! - [`Slots::claim_any`] (lock mode `none`) visits every slot once, from a round-robin
//!   start, and returns the first whose claim the caller took. Claims are taken by
//!   compare-and-swap from free ([`OwnerClaim`]), so it returns a slot no other thread owns,
//!   and returns none only if each slot was owned by another thread when it was visited.

use std::sync::Arc;

use super::claim::OwnerClaim;
use super::{AtomicUsize, Mutex, Ordering};

/// A fixed number of lazily made values, handed out round-robin.
#[derive(Debug)]
pub struct Slots<T> {
    slots: Box<[Mutex<Option<Arc<T>>>]>,
    next: AtomicUsize,
}

impl<T> Slots<T> {
    /// `n` empty slots.
    pub fn new(n: usize) -> Self {
        Slots {
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Slot `i`'s value, if it was made.
    pub fn get(&self, i: usize) -> Option<Arc<T>> {
        self.slots.get(i).and_then(|s| s.lock().clone())
    }

    /// Slot `i`'s value, made by `make` if it was not yet; `None` if `i` is out of range.
    pub fn get_or_try_init<E>(
        &self,
        i: usize,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Option<Result<Arc<T>, E>> {
        let slot = self.slots.get(i)?;
        let mut slot = slot.lock();
        if let Some(v) = &*slot {
            return Some(Ok(v.clone()));
        }
        Some(make().map(|v| {
            let v = Arc::new(v);
            *slot = Some(v.clone());
            v
        }))
    }

    /// Slots whose value was made.
    pub fn created(&self) -> usize {
        self.slots.iter().filter(|s| s.lock().is_some()).count()
    }

    /// The next round-robin position (an ever-growing count; take it modulo [`Slots::len`]).
    pub fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Lock mode `none`: from position `start`, the first slot whose claim thread `me` takes
    /// (`get` makes or fetches slot `i`'s value, `claim` is that value's claim). `Ok(None)`
    /// when every slot was owned by another thread when visited.
    pub fn claim_any<E>(
        &self,
        me: u64,
        start: usize,
        mut get: impl FnMut(usize) -> Result<Arc<T>, E>,
        claim: impl Fn(&T) -> Option<&OwnerClaim>,
    ) -> Result<Option<Arc<T>>, E> {
        let n = self.len();
        for k in 0..n {
            let v = get((start + k) % n)?;
            if claim(&v).is_some_and(|c| c.try_claim(me)) {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize as Count;
    use loom::sync::Arc as LArc;

    struct Stream {
        claim: OwnerClaim,
    }

    fn make(made: &Count) -> impl FnOnce() -> Result<Stream, ()> + '_ {
        move || {
            made.fetch_add(1, Ordering::SeqCst);
            Ok(Stream {
                claim: OwnerClaim::new(),
            })
        }
    }

    /// Two threads race to make the same slot: it is made once and both get that value.
    #[test]
    fn a_slot_is_made_once_and_shared() {
        loom::model(|| {
            let slots = LArc::new(Slots::<Stream>::new(1));
            let made = LArc::new(Count::new(0));
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let (slots, made) = (slots.clone(), made.clone());
                    loom::thread::spawn(move || {
                        let v = slots.get_or_try_init(0, make(&made)).unwrap().unwrap();
                        Arc::as_ptr(&v) as usize
                    })
                })
                .collect();
            let ptrs: Vec<usize> = hs.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(ptrs[0], ptrs[1], "two values for one slot");
            assert_eq!(made.load(Ordering::SeqCst), 1);
            assert_eq!(slots.created(), 1);
            assert!(slots.get_or_try_init(1, make(&made)).is_none());
        });
    }

    /// Lock mode `none`, three threads on two slots, the pool's own assignment code: exactly
    /// two threads get a stream, never the same one, and the third is refused.
    #[test]
    fn lock_none_never_gives_one_stream_to_two_threads() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(2);
        model.check(|| {
            let slots = LArc::new(Slots::<Stream>::new(2));
            let made = LArc::new(Count::new(0));
            let hs: Vec<_> = (1..=3u64)
                .map(|me| {
                    let (slots, made) = (slots.clone(), made.clone());
                    loom::thread::spawn(move || {
                        let start = slots.next_index();
                        let got = slots
                            .claim_any(
                                me,
                                start,
                                |i| slots.get_or_try_init(i, make(&made)).unwrap(),
                                |s| Some(&s.claim),
                            )
                            .unwrap();
                        got.map(|s| {
                            assert_eq!(s.claim.owner(), me);
                            Arc::as_ptr(&s) as usize
                        })
                    })
                })
                .collect();
            let got: Vec<Option<usize>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<usize> = got.iter().flatten().copied().collect();
            assert_eq!(winners.len(), 2, "{got:?}");
            assert_ne!(winners[0], winners[1], "one stream given to two threads");
            assert_eq!(made.load(Ordering::SeqCst), 2, "a slot made twice");
        });
    }

    /// Shutdown of a thread: it gives its claim back as it exits (what the thread-local
    /// table's destructor does) while another thread looks for a stream; that thread gets
    /// it only after the release, and sees everything the first did with the stream.
    #[test]
    fn a_leaving_thread_hands_its_stream_to_the_next() {
        loom::model(|| {
            let slots = LArc::new(Slots::<Stream>::new(1));
            let made = LArc::new(Count::new(0));
            let data = LArc::new(loom::cell::UnsafeCell::new(0u32));
            let s = slots.get_or_try_init(0, make(&made)).unwrap().unwrap();
            assert!(s.claim.try_claim(1));
            let (slots2, data2) = (slots.clone(), data.clone());
            let next = loom::thread::spawn(move || {
                let got = slots2
                    .claim_any(
                        2,
                        slots2.next_index(),
                        |i| Ok::<_, ()>(slots2.get(i).unwrap()),
                        |s| Some(&s.claim),
                    )
                    .unwrap();
                if let Some(s) = got {
                    // SAFETY: thread 2 owns the stream now; thread 1 released it after its
                    // last write (loom checks the ordering).
                    assert_eq!(data2.with(|p| unsafe { *p }), 5);
                    assert!(s.claim.release(2));
                }
            });
            // SAFETY: thread 1 owns the stream; thread 2 touches `data` only after claiming.
            data.with_mut(|p| unsafe { *p = 5 });
            assert!(
                s.claim.release(1),
                "the exiting thread gives its claim back"
            );
            next.join().unwrap();
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn slots_are_made_lazily_and_handed_out_round_robin() {
        let s: Slots<u32> = Slots::new(3);
        assert_eq!(s.created(), 0);
        assert!(s.get(0).is_none());
        let v = s.get_or_try_init(1, || Ok::<_, ()>(7)).unwrap().unwrap();
        assert_eq!(*v, 7);
        assert_eq!(
            *s.get_or_try_init(1, || Err(())).unwrap().unwrap(),
            7,
            "made once"
        );
        assert!(s
            .get_or_try_init(2, || Err::<u32, _>("no"))
            .unwrap()
            .is_err());
        assert_eq!(s.created(), 1, "a failed make leaves the slot empty");
        assert!(s.get_or_try_init(3, || Ok::<_, ()>(1)).is_none());
        let idx: Vec<usize> = (0..4).map(|_| s.next_index() % s.len()).collect();
        assert_eq!(idx, vec![0, 1, 2, 0]);
    }
}
