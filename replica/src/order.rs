//! The order of overlapping writes.
//!
//! A replica runs the requests of its data stream concurrently. Two writes
//! (or unmaps) of the same block in flight at once would race: their data
//! can reach the disk in either order while their CRC entries are stored in
//! the order they were submitted, leaving a block whose data and CRC entry
//! disagree for good, and two replicas could each keep a different version.
//! So every write and unmap takes a [`Ticket`] when it arrives, in the
//! order of the stream, and starts only once every earlier ticket whose
//! byte range overlaps its own has been dropped.
//!
//! Invariant: overlapping writes and unmaps of one store run one after the
//! other, in ticket order; those of disjoint ranges never wait for each
//! other. The engine sends the same requests in the same order to every
//! replica, so every replica ends with the same version of each block.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The live tickets of one store.
#[derive(Debug, Default)]
pub struct WriteOrder {
    state: Mutex<State>,
    /// Notified whenever a ticket is dropped.
    released: Notify,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// `(ticket, first byte, end byte)` of every live ticket, oldest first.
    live: Vec<(u64, u64, u64)>,
}

/// A write's place in the order; dropping it lets later overlapping writes
/// run.
#[derive(Debug)]
pub struct Ticket {
    order: Arc<WriteOrder>,
    seq: u64,
    start: u64,
    end: u64,
    /// No earlier ticket overlapped this one when it was taken (earlier
    /// tickets only go away, so it never has to wait).
    clear: bool,
}

impl WriteOrder {
    /// A ticket for the bytes `[offset, offset + len)`, after every ticket
    /// taken before it.
    pub fn ticket(self: &Arc<Self>, offset: u64, len: u64) -> Ticket {
        let mut s = self.lock();
        let seq = s.next;
        s.next += 1;
        let end = offset.saturating_add(len);
        let clear = !s.live.iter().any(|&(_, a, b)| a < end && offset < b);
        s.live.push((seq, offset, end));
        Ticket {
            order: self.clone(),
            seq,
            start: offset,
            end,
            clear,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Ticket {
    /// Waits until no earlier live ticket overlaps this one.
    pub async fn ready(&self) {
        if self.clear {
            return;
        }
        loop {
            let released = self.order.released.notified();
            let mut released = std::pin::pin!(released);
            // Registered before the check, so a drop between the check and
            // the wait is not missed.
            released.as_mut().enable();
            if !self.blocked() {
                return;
            }
            released.await;
        }
    }

    fn blocked(&self) -> bool {
        self.order
            .lock()
            .live
            .iter()
            .take_while(|&&(seq, _, _)| seq < self.seq)
            .any(|&(_, start, end)| start < self.end && self.start < end)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut s = self.order.lock();
            if let Some(i) = s.live.iter().position(|&(seq, _, _)| seq == self.seq) {
                s.live.remove(i);
            }
        }
        self.order.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    fn poll_once(f: &mut std::pin::Pin<Box<dyn Future<Output = ()> + '_>>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(f.as_mut().poll(&mut cx), Poll::Ready(()))
    }

    #[test]
    fn overlapping_tickets_wait_for_earlier_ones_only() {
        let order = Arc::new(WriteOrder::default());
        let a = order.ticket(0, 8192);
        let b = order.ticket(8192, 4096); // disjoint from a
        let c = order.ticket(4096, 8192); // overlaps a and b
        let d = order.ticket(100_000, 4096);
        for (name, t) in [("a", &a), ("b", &b), ("d", &d)] {
            let mut f: std::pin::Pin<Box<dyn Future<Output = ()>>> = Box::pin(t.ready());
            assert!(poll_once(&mut f), "{name} must not wait");
        }
        let mut fc: std::pin::Pin<Box<dyn Future<Output = ()>>> = Box::pin(c.ready());
        assert!(!poll_once(&mut fc), "c waits for a and b");
        drop(a);
        assert!(!poll_once(&mut fc), "c still waits for b");
        drop(b);
        assert!(poll_once(&mut fc), "c runs once a and b are gone");
        drop(fc);
        // A later ticket overlapping c waits for it, not the other way round.
        let e = order.ticket(0, 4096 * 3);
        let mut fe: std::pin::Pin<Box<dyn Future<Output = ()>>> = Box::pin(e.ready());
        assert!(!poll_once(&mut fe));
        drop(c);
        assert!(poll_once(&mut fe));
        drop(fe);
        drop((d, e));
        assert!(order.lock().live.is_empty());
    }
}
