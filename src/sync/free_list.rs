//! `FreeList`: a bounded list of reusable items, the core of a stream's event pool.
//!
//! Protocol (the event pool's): a submission takes an event (a free one, or a new one when
//! none is free), records it, and the ticket owns it; waiting on the ticket or dropping it
//! gives the event back.
//!
//! Invariants:
//! - An item taken is held by its taker alone until given back: no two takers hold one item.
//! - Giving an item back happens-before its next take, so the next holder sees everything
//!   the previous one did with it.
//! - Taking never blocks: an empty list makes a new item (counted in [`FreeList::created`]);
//!   an item given back to a full list is dropped.
//!
//! The list is crossbeam's lock-free `ArrayQueue`, whose push and pop give exactly these
//! guarantees. Under `cfg(loom)` it is a loom mutex around a `VecDeque` with the same
//! interface: the models check multiq's protocol (tickets taking, using and giving back
//! events, dropped tickets included), not crossbeam's internals.

use super::{AtomicU64, Ordering};

#[cfg(not(loom))]
type Queue<T> = crossbeam::queue::ArrayQueue<T>;

#[cfg(loom)]
struct Queue<T> {
    items: super::Mutex<std::collections::VecDeque<T>>,
    capacity: usize,
}

#[cfg(loom)]
impl<T> Queue<T> {
    fn new(capacity: usize) -> Self {
        Queue {
            items: super::Mutex::new(std::collections::VecDeque::new()),
            capacity,
        }
    }
    fn pop(&self) -> Option<T> {
        self.items.lock().pop_front()
    }
    fn push(&self, item: T) -> Result<(), T> {
        let mut items = self.items.lock();
        if items.len() >= self.capacity {
            return Err(item);
        }
        items.push_back(item);
        Ok(())
    }
}

/// A bounded list of reusable items.
pub struct FreeList<T> {
    free: Queue<T>,
    created: AtomicU64,
}

impl<T> FreeList<T> {
    /// An empty list keeping at most `capacity` free items.
    pub fn new(capacity: usize) -> Self {
        FreeList {
            free: Queue::new(capacity),
            created: AtomicU64::new(0),
        }
    }

    /// A free item, or a new one from `make` when none is free.
    pub fn take_or<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        match self.free.pop() {
            Some(item) => Ok(item),
            None => {
                let item = make()?;
                self.created.fetch_add(1, Ordering::Relaxed);
                Ok(item)
            }
        }
    }

    /// Gives `item` back for reuse (dropped if the list is full).
    pub fn give_back(&self, item: T) {
        let _ = self.free.push(item);
    }

    /// Items this list has ever made.
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    /// An event: its "recorded" mark is plain memory, so two holders at once (or a holder
    /// that does not see the previous holder's record) is a data race loom reports.
    struct Event(UnsafeCell<u64>);

    /// A ticket's life: take an event, record it, wait on it, give it back (a dropped ticket
    /// gives it back the same way, without the wait).
    fn ticket(list: &FreeList<Box<Event>>, me: u64, wait: bool) {
        let ev = list
            .take_or(|| Ok::<_, ()>(Box::new(Event(UnsafeCell::new(0)))))
            .unwrap();
        // SAFETY: the ticket holds the event alone (the invariant under test: loom reports
        // a race if another ticket holds it too).
        ev.0.with_mut(|p| unsafe { *p = me });
        if wait {
            // SAFETY: as above.
            let seen = ev.0.with(|p| unsafe { *p });
            assert_eq!(seen, me, "another ticket recorded this event meanwhile");
        }
        list.give_back(ev);
    }

    /// Two tickets on one stream's pool, one waited and one dropped: never one event for
    /// both at once, events are reused only after being given back, and no more than two
    /// are ever made.
    #[test]
    fn an_event_belongs_to_one_ticket_at_a_time() {
        loom::model(|| {
            let list = Arc::new(FreeList::new(4));
            let l2 = list.clone();
            let t = loom::thread::spawn(move || {
                ticket(&l2, 1, true);
                ticket(&l2, 1, false);
            });
            ticket(&list, 2, true);
            t.join().unwrap();
            let made = list.created();
            assert!((1..=2).contains(&made), "{made} events for two tickets");
            // Afterwards every event is free again: a new ticket makes none.
            ticket(&list, 3, true);
            assert_eq!(list.created(), made);
        });
    }

    /// A list that is full drops the event given back instead of keeping it, and a later
    /// take makes a new one: bounded, never blocking.
    #[test]
    fn a_full_list_drops_what_is_given_back() {
        loom::model(|| {
            let list = Arc::new(FreeList::new(1));
            let a = list.take_or(|| Ok::<_, ()>(Box::new(Event(UnsafeCell::new(0)))));
            let b = list.take_or(|| Ok::<_, ()>(Box::new(Event(UnsafeCell::new(0)))));
            let (a, b) = (a.unwrap(), b.unwrap());
            let l2 = list.clone();
            let t = loom::thread::spawn(move || l2.give_back(a));
            list.give_back(b);
            t.join().unwrap();
            assert_eq!(list.created(), 2);
            ticket(&list, 1, true);
            assert_eq!(list.created(), 2, "the kept event is reused");
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn items_are_reused_and_the_list_is_bounded() {
        let l: FreeList<u32> = FreeList::new(1);
        let a = l.take_or(|| Ok::<_, ()>(1)).unwrap();
        let b = l.take_or(|| Ok::<_, ()>(2)).unwrap();
        assert_eq!(l.created(), 2);
        l.give_back(a);
        l.give_back(b); // full: dropped
        assert_eq!(l.take_or(|| Ok::<_, ()>(9)).unwrap(), 1);
        assert_eq!(l.take_or(|| Ok::<_, ()>(9)).unwrap(), 9);
        assert!(l.take_or(|| Err::<u32, _>("no")).is_err());
        assert_eq!(l.created(), 3, "a failed make is not counted");
    }
}
